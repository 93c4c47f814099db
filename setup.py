"""Distribution `perceptiongpt`: the top-level folders map into one namespace (see DESIGN.md, "Layout")."""

from setuptools import setup


setup(
    name="perceptiongpt",
    version="0.1.0",
    description="PerceptionGPT: boxes and masks from a <vis> token, as a Hugging Face transformers plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "perceptiongpt",
        "perceptiongpt.processing",
        "perceptiongpt.trainer",
        "perceptiongpt.hub_cards",
    ],
    package_dir={
        "perceptiongpt": "modeling_perceptiongpt",
        "perceptiongpt.processing": "processing",
        "perceptiongpt.trainer": "trainer",
        "perceptiongpt.hub_cards": "hub_cards",
    },
    package_data={
        "perceptiongpt.processing": ["metric_modules/*/*.py"],
        "perceptiongpt.hub_cards": ["*.md"],
    },
    # torch is deliberately unpinned here: the README/CI install step pins the CPU wheel.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "huggingface-hub>=1.0",
        "safetensors",
        "tokenizers",
        "numpy",
        "pillow",
        "scipy",
        "datasets>=3.0",
        "evaluate>=0.4.6",
        "pycocotools",
        "tqdm",
    ],
    extras_require={
        "train": ["peft>=0.17", "accelerate>=1.0", "matplotlib"],
        "test": [
            "pytest",
            "pytest-randomly",
            "hypothesis",
            "ruff==0.17.6",
            "peft>=0.17",
            "accelerate>=1.0",
            "matplotlib",
            "gradio==6.31.0",
            "selenium==4.45.0",
        ],
        "app": ["gradio==6.31.0"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["perceptiongpt=perceptiongpt.trainer.cli:main"]},
)

"""Shared fixtures: tiny random models and hand-built inputs. No network."""

import os
import random
import textwrap

import numpy as np
import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
torch.set_num_threads(1)

import perceptiongpt  # noqa: E402, F401  (registers the Auto classes once, before any test snapshots the registries)


IMAGE, VIS = 4, 5  # SPECIAL_TOKEN_IDS of the tiny preset

# Floats computed in two processes agree to rounding only: with the same weights, inputs and thread count, the
# kernels picked at run time (vector width, reduction order) still move fp32 results by a few ulps (~1e-7 on the
# O(1) logits and boxes of the tiny model). 1e-6 is ten times that, and far below a real defect (one wrong weight
# moves the logits by > 1e-2). Token ids and tensors read from the same file stay exactly equal.
CROSS_PROCESS_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}

# Prepended to subprocess scripts: `import perceptiongpt` fails, so only shipped remote code can load the model, and
# torch runs on one thread as in this process.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    import torch
    torch.set_num_threads(1)
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "perceptiongpt" or name.startswith("perceptiongpt."):
                raise ImportError("perceptiongpt is blocked in this test")
    sys.meta_path.insert(0, _Block())
    """
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: builds or installs the package (runs in CI; deselect with -m 'not slow')"
    )


def pytest_terminal_summary(terminalreporter, config):
    if config.pluginmanager.hasplugin("randomly"):  # printed even under -q, so that a failing order can be replayed
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"shuffled with pytest-randomly: replay with -p randomly --randomly-seed={seed}")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test subprocess: offline, one OpenMP thread, nothing from this checkout on the path."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": "", **extra}


@pytest.fixture(autouse=True)
def isolated_global_state():
    """Every test starts from the same seeds and leaves threads, env vars and Auto registrations as it found them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_MAPPING

    threads, environ = torch.get_num_threads(), dict(os.environ)
    registries = [CONFIG_MAPPING, MODEL_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING]
    registered = [dict(registry._extra_content) for registry in registries]
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)
    for registry, content in zip(registries, registered):
        registry._extra_content.clear()
        registry._extra_content.update(content)


@pytest.fixture
def tiny_config():
    from perceptiongpt import PerceptionGPTConfig

    return PerceptionGPTConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from perceptiongpt import PerceptionGPTForConditionalGeneration

    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(tiny_config).eval()
    with torch.no_grad():  # a non-trivial box decoder, and `<vis>` likely enough to be generated
        model.box_decoder.mlp[-1].weight.normal_(0, 0.5)
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    return model


def training_arguments(output_dir, **overrides):
    """The tests' TrainingArguments: CPU, 2 steps, constant learning rate, no saving, no reporting."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    return TrainingArguments(**{**defaults, **overrides})


def make_batch(batch_size=2, length=30, vis_at=((20,), (20, 25)), image=True, seed=0):
    """Rows of random text with one 16-token `<image>` block at 2..17 and `<vis>` at the given positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (batch_size, length), generator=g)
    if image:
        ids[:, 2:18] = IMAGE
    for row, positions in enumerate(vis_at[:batch_size]):
        for p in positions:
            ids[row, p] = VIS
    pixel_values = torch.randn(batch_size, 3, 16, 16, generator=g) if image else None
    return ids, pixel_values

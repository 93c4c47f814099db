"""The `visual-grounding` pipeline saved with the model: in-process and as remote code without the package."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import BLOCK_PACKAGE, VIS, subprocess_env
from PIL import Image
from transformers import pipeline

import perceptiongpt
from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.tokenization_factory import build_tokenizer


def _saved(tmp_path):
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # `<vis>` likely, so that objects come out
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    folder = tmp_path / "model"
    perceptiongpt.save_grounding_pipeline(model, folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def _expected(model, processor, image, prompt):
    messages = [{"role": "user", "content": processor.user_content(prompt, image)}]
    inputs = processor.apply_chat_template(
        [messages], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    return processor.post_process_generation(out, [(image.height, image.width)])[0]


def test_pipeline_returns_the_generated_objects_in_pixels(tmp_path):
    model, processor, folder = _saved(tmp_path)
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"]["visual-grounding"]["impl"] == (
        "pipeline_visual_grounding.VisualGroundingPipeline"
    )
    image = Image.new("RGB", (40, 24), (90, 30, 200))
    pipe = pipeline("visual-grounding", model=str(folder), trust_remote_code=True)
    out = pipe(image, prompt="Where is the circle?", max_new_tokens=6, do_sample=False)
    expected = _expected(model, processor, image, "Where is the circle?")
    assert out["generated_text"] == expected["text"] and len(out["objects"]) == len(expected["boxes"]) >= 1
    for found, box, score in zip(out["objects"], expected["boxes"].tolist(), expected["scores"].tolist()):
        assert [found["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == [int(round(v)) for v in box]
        assert abs(found["score"] - score) < 1e-6 and found["mask"].size == (40, 24) and found["mask"].mode == "L"
    batched = pipe([image, image], prompt="Where is the circle?", max_new_tokens=6, do_sample=False)
    inferred = pipeline(model=str(folder), trust_remote_code=True)  # the one custom task of the folder
    assert type(inferred).__name__ == "VisualGroundingPipeline"
    assert (
        inferred(image, prompt="Where is the circle?", max_new_tokens=6, do_sample=False)["objects"] == out["objects"]
    )
    with pytest.raises(ValueError, match="has 1 `<vis>` tokens but 0 regions"):  # the processor's own error
        pipe(image, prompt="What is in <vis>?")
    with pytest.raises(ValueError, match="`prompt` must be a non-empty question"):
        pipe(image)
    for each in batched:  # a list of images: one result per image, each the single call's
        assert each["generated_text"] == out["generated_text"]
        assert [o["box"] for o in each["objects"]] == [o["box"] for o in out["objects"]]


_REMOTE = """
import json, sys
try:
    import perceptiongpt  # noqa: F401
    sys.exit("perceptiongpt must not be importable here")
except ImportError:
    pass
from PIL import Image
from transformers import pipeline

pipe = pipeline("visual-grounding", model=sys.argv[1], trust_remote_code=True)
out = pipe(Image.new("RGB", (40, 24), (90, 30, 200)), prompt="Where is the circle?", max_new_tokens=6, do_sample=False)
print(json.dumps({"module": type(pipe).__module__, "text": out["generated_text"],
                  "boxes": [o["box"] for o in out["objects"]]}))
"""


def test_pipeline_loads_as_remote_code_without_the_package(tmp_path):
    model, processor, folder = _saved(tmp_path)
    command = [sys.executable, "-c", BLOCK_PACKAGE + _REMOTE, str(folder)]
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = json.loads(completed.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules")
    expected = _expected(model, processor, Image.new("RGB", (40, 24), (90, 30, 200)), "Where is the circle?")
    assert remote["text"] == expected["text"] and len(remote["boxes"]) == len(expected["boxes"]) >= 1
    for found, box in zip(remote["boxes"], expected["boxes"].tolist()):
        assert all(abs(found[k] - round(v)) <= 1 for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))

"""The `visual-grounding` pipeline saved with the model: in-process and as remote code without the package."""

import json
import subprocess
import sys

import numpy as np
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


def _boxes(result):
    return [[o["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for o in result["objects"]]


def test_batched_requests_equal_one_by_one(tmp_path):
    """Images of different sizes, prompts of different lengths, a region question among them: batch_size=3 pads
    them in the processor and gives each request its single call's answer."""
    _, _, folder = _saved(tmp_path)
    pipe = pipeline("visual-grounding", model=str(folder), trust_remote_code=True)
    images = [Image.new("RGB", (40, 24), (90, 30, 200)), Image.new("RGB", (30, 50), (10, 130, 20))] * 2
    prompts = ["Where is the circle?", "Find the square.", "What is in <vis>?", "Where?"]
    requests = [{"image": im, "prompt": p} for im, p in zip(images, prompts)]
    requests[2]["boxes"] = [[2, 3, 20, 20]]
    single = [pipe(**{k: v for k, v in r.items()}, max_new_tokens=6) for r in requests]
    batched = pipe(requests, max_new_tokens=6, batch_size=3)
    assert len(batched) == 4
    for one, many in zip(single, batched):
        assert many["generated_text"] == one["generated_text"] and _boxes(many) == _boxes(one)
        assert [o["score"] for o in many["objects"]] == pytest.approx([o["score"] for o in one["objects"]], abs=1e-5)
    pairs = pipe(images[:2], prompt=prompts[:2], max_new_tokens=6, batch_size=2)  # lists of images and prompts
    assert [_boxes(r) for r in pairs] == [_boxes(r) for r in single[:2]]
    assert [r["generated_text"] for r in pipe(images[:2], prompt=prompts[0], max_new_tokens=6)] == [
        pipe(im, prompt=prompts[0], max_new_tokens=6)["generated_text"] for im in images[:2]
    ]
    with pytest.raises(ValueError, match="same length when both are lists, got 2 images and 3 prompts"):
        pipe(images[:2], prompt=prompts[:3])
    with pytest.raises(TypeError, match="A list of 2 prompts needs a list of as many images"):
        pipe(images[0], prompt=prompts[:2])
    with pytest.raises(ValueError, match="got \\['box'\\]"):
        pipe([{"image": images[0], "prompt": "Where?", "box": [1, 2, 3, 4]}])


def assert_batched_pipeline_equals_one_by_one(model, processor, folder, images, prompt):
    """Saves `model` + `processor` with the pipeline into `folder`; its answers for `images`, batched, are the
    single calls' (the family's processor pads the batch: image grids, tiles, `<vis>` regions)."""
    perceptiongpt.save_grounding_pipeline(model, folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    pipe = pipeline("visual-grounding", model=str(folder), trust_remote_code=True)
    single = [pipe(image, prompt=prompt, max_new_tokens=4) for image in images]
    batched = pipe(images, prompt=prompt, max_new_tokens=4, batch_size=len(images))
    assert sum(len(one["objects"]) for one in single) >= 1
    for one, many in zip(single, batched):
        assert many["generated_text"] == one["generated_text"]
        for a, b in zip(many["objects"], one["objects"]):
            assert all(abs(a["box"][k] - b["box"][k]) <= 1 for k in a["box"])
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_streamed_objects_equal_the_returned_ones(tmp_path):
    _, _, folder = _saved(tmp_path)
    pipe = pipeline("visual-grounding", model=str(folder), trust_remote_code=True)
    image, streamed = Image.new("RGB", (40, 24), (90, 30, 200)), []
    out = pipe(image, prompt="Where is the circle?", max_new_tokens=6, on_object=streamed.append)
    assert len(streamed) == len(out["objects"]) >= 2
    for got, returned in zip(streamed, out["objects"]):
        assert got["box"] == returned["box"] and got["score"] == pytest.approx(returned["score"], abs=1e-6)
        assert np.array_equal(np.asarray(got["mask"]), np.asarray(returned["mask"]))
    with pytest.raises(TypeError, match="`on_object` must be callable, got str"):
        pipe(image, prompt="Where?", on_object="print")


def test_generation_device_and_dtype_arguments_pass_through(tmp_path):
    model, processor, folder = _saved(tmp_path)
    image = Image.new("RGB", (40, 24), (90, 30, 200))
    pipe = pipeline("visual-grounding", model=str(folder), trust_remote_code=True, device="cpu", dtype=torch.bfloat16)
    assert pipe.model.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    out = pipe(image, prompt="Where is the circle?", max_new_tokens=6)
    expected = _expected(model.to(torch.bfloat16), processor, image, "Where is the circle?")
    assert out["generated_text"] == expected["text"]
    assert _boxes(out) == [[int(round(v)) for v in box] for box in expected["boxes"].tolist()]
    short = pipe(image, prompt="Where is the circle?", max_new_tokens=2)
    assert len(short["objects"]) < len(out["objects"])
    sampled = pipe(image, prompt="Where is the circle?", max_new_tokens=6, do_sample=True, num_return_sequences=2)
    assert isinstance(sampled, list) and len(sampled) == 2 and all("objects" in each for each in sampled)


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

"""Idefics3 and SmolVLM end to end offline (no num2words, no torchvision): from_base on a Hub-like folder, tiles plus
the global image, pixel boxes in and out, save / load, the collator's labels."""

import numpy as np
import pytest
import torch
from family_training import accumulation_error, box_losses_of_a_short_run, square_image
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    AutoProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

import perceptiongpt
from perceptiongpt.processing.tokenization_factory import build_tokenizer


FAMILIES = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil),
}
PROMPT = "User:<image>Where is the square? <vis><end_of_utterance>\nAssistant:"


def _tokenizer():
    tokenizer = build_tokenizer()
    names = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>"]
    names += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokens = [AddedToken(name, special=True, normalized=False) for name in names]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def folder(request, tmp_path_factory):
    config_class, model_class, image_processor_class = FAMILIES[request.param]
    tokenizer = _tokenizer()
    text = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text.update(num_attention_heads=2, num_key_value_heads=2, vocab_size=320, pad_token_id=0, bos_token_id=1)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = config_class(
        vision_config={**vision, "image_size": 16, "patch_size": 4}, text_config=text, image_token_id=4
    )
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor_class(size={"longest_edge": 32}, max_image_size={"longest_edge": 16}).save_pretrained(path)
    return request.param, path


def _converted(path):
    torch.manual_seed(0)
    model, processor = perceptiongpt.from_base(str(path), mask_grid_size=4)
    processor.image_seq_len = 4  # (16 / 4)^2 patches / 2^2 pixel shuffle, the tiny model's tokens per tile
    return model.eval(), processor


def test_tiles_then_the_global_image_and_pixel_boxes_round_trip(folder):
    family, path = folder
    model, processor = _converted(path)
    assert type(processor).__name__ == {"idefics3": "PerceptionGPTIdefics3Processor"}.get(
        family, "PerceptionGPTSmolVLMProcessor"
    )
    box = [5.0, 3.0, 21.0, 25.0]
    image = square_image(30, 40, (5, 3, 21, 25))
    inputs = processor(images=[[image]], text=[PROMPT], boxes=[[box]], return_tensors="pt")
    tiles = inputs["pixel_values"].shape[1]
    assert tiles == 5 and (inputs["input_ids"] == 4).sum() == 4 * tiles  # 2 x 2 tiles, then the global image
    torch.testing.assert_close(inputs["vis_boxes"][0, 0], torch.tensor([5 / 40, 3 / 30, 21 / 40, 25 / 30]))
    with torch.no_grad():  # `<vis>` generated right after the prompt
        model.lm_head.weight[processor.vis_token_id] = model(**inputs).last_hidden_state[0, -1] * 10
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    results = processor.post_process_generation(out, image_sizes=[(30, 40)])
    assert len(results[0]["boxes"]) == len(out.pred_boxes[0]) >= 1
    torch.testing.assert_close(results[0]["boxes"], out.pred_boxes[0] * torch.tensor([40, 30, 40, 30]))
    assert results[0]["masks"].shape == (len(out.pred_boxes[0]), 30, 40)
    fake = type("Out", (), {})()
    fake.sequences, fake.pred_boxes, fake.vis_scores = inputs["input_ids"], [inputs["vis_boxes"][0]], [torch.ones(1)]
    fake.pred_masks, fake.prompt_length = None, inputs["input_ids"].shape[1]
    back = processor.post_process_generation(fake, image_sizes=[(30, 40)])[0]["boxes"]
    assert (back[0] - torch.tensor(box)).abs().max() <= 0.5


def test_saves_loads_and_labels_only_the_answer(folder, tmp_path):
    from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
    from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset

    family, path = folder
    model, processor = _converted(path)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(processor) and reloaded.mask_size == processor.mask_size
    image = square_image(30, 40, (5, 3, 21, 25))
    a = processor(images=[[image]], text=[PROMPT], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
    b = reloaded(images=[[image]], text=[PROMPT], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = build_synthetic_dataset(SyntheticConfig.demo(), "train", 2, seed=0)
    batch = DataCollatorForPerceptionGPT(processor)([rows[0], rows[1]])
    answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert processor.vis_token_id in answer and 4 not in answer
    out = model(**batch)
    assert out.loss.isfinite() and out.box_l1_loss > 0


_REMOTE = """
import json, sys
try:
    import perceptiongpt  # noqa: F401
    sys.exit("perceptiongpt must not be importable here")
except ImportError:
    pass
import numpy as np
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
image = Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8))
inputs = processor(images=[[image]], text=[sys.argv[2]], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
print(json.dumps({"modules": [type(processor).__module__, type(model).__module__],
                  "input_ids": inputs["input_ids"][0].tolist(), "vis_boxes": inputs["vis_boxes"][0].tolist(),
                  "logits": model(**inputs).logits[0, -1, :8].tolist()}))
"""


def test_model_and_processor_folder_load_as_remote_code(folder, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import BLOCK_PACKAGE, CROSS_PROCESS_TOLERANCE, subprocess_env

    _, path = folder
    model, processor = _converted(path)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-c", BLOCK_PACKAGE + _REMOTE, str(tmp_path / "model"), PROMPT]
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = json.loads(completed.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules") for module in remote["modules"])
    image = Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8))
    inputs = processor(images=[[image]], text=[PROMPT], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
    assert remote["input_ids"] == inputs["input_ids"][0].tolist()
    assert remote["vis_boxes"] == inputs["vis_boxes"][0].tolist()
    with torch.no_grad():
        local = model(**inputs).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(remote["logits"]), local, **CROSS_PROCESS_TOLERANCE)


def test_without_image_splitting_the_global_image_is_the_only_tile(folder):
    _, path = folder
    model, processor = _converted(path)
    processor.image_processor.do_image_splitting = False
    image = square_image(30, 40, (5, 3, 21, 25))
    inputs = processor(images=[[image]], text=[PROMPT], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 1 and (inputs["input_ids"] == 4).sum() == 4
    torch.testing.assert_close(inputs["vis_boxes"][0, 0], torch.tensor([5 / 40, 3 / 30, 21 / 40, 25 / 30]))
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    assert out.image_outputs.mask_features.shape[0] == 1 and out.box_l1_loss > 0


def test_pipeline_batches_images_with_different_tile_counts(folder, tmp_path):
    from test_pipeline import assert_batched_pipeline_equals_one_by_one

    model, processor = _converted(folder[1])
    with torch.no_grad():  # `<vis>` likely, so that boxes come out
        model.lm_head.weight[processor.vis_token_id] = model.model.text_model.norm.weight * 3
    images = [square_image(30, 50, (5, 3, 21, 25)), square_image(12, 12, (2, 2, 8, 10))]  # 2x1 tiles + global; 1
    assert_batched_pipeline_equals_one_by_one(model, processor, tmp_path / "model", images, "Find it:")


def test_accumulation_matches_one_big_batch_and_the_box_loss_falls(folder, tmp_path):
    from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset

    _, path = folder
    rows = build_synthetic_dataset(SyntheticConfig.demo(), "train", 8, seed=0)
    assert accumulation_error(lambda: _converted(path), rows, tmp_path) < 1e-6
    model, processor = _converted(path)
    processor.image_processor.do_image_splitting = False  # one tile per image: a short run
    losses = box_losses_of_a_short_run(model, processor, PROMPT, steps=200, size=(32, 32), nest_images=True)
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    assert last < 0.7 * first, (first, last)

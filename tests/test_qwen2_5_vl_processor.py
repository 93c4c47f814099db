"""Qwen2.5-VL end to end without torchvision: from_base on a Hub-like folder, pixel boxes in and out, learning."""

import numpy as np
import pytest
import torch
from family_training import accumulation_error, box_losses_of_a_short_run, square_image
from tokenizers import AddedToken
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import perceptiongpt
from perceptiongpt import PerceptionGPTQwen2_5_VLProcessor
from perceptiongpt.processing.tokenization_factory import build_tokenizer


QWEN_TEMPLATE = (
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><image><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
PROMPT = "<|vision_start|><image><|vision_end|>Where is the square? <vis>"


def _tokenizer():
    """The byte-level tokenizer plus Qwen's video and vision start/end tokens (ids 262-264 of the tiny preset)."""
    tokenizer = build_tokenizer()
    names = ("<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")
    tokens = [AddedToken(name, special=True, normalized=False) for name in names]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A Hub-like Qwen2.5-VL folder: native weights, tokenizer, image processor; no video processor."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_qwen2_5_vl import native_config

    folder = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(native_config()).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=48 * 48
    )
    image_processor.save_pretrained(folder)
    return folder


def test_from_base_on_a_folder_gives_the_family_processor(qwen_folder):
    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    assert type(processor) is PerceptionGPTQwen2_5_VLProcessor
    tokens = len(processor.tokenizer)  # 267: they fit in the 272-row vocabulary, no resize
    assert model.config.vis_token_id == processor.vis_token_id == 5  # the byte-level tokenizer has `<vis>` at 5
    embed, native = (
        model.get_input_embeddings().weight,
        Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_folder),
    )
    assert embed.shape[0] == 272 and torch.equal(embed[6:], native.get_input_embeddings().weight[6:])
    torch.testing.assert_close(embed[5], native.get_input_embeddings().weight[:tokens].mean(0), rtol=0, atol=1e-6)
    assert processor.mask_size == model.config.mask_head_config.mask_size


def test_boxes_round_trip_through_the_dynamic_resize(qwen_folder):
    """A 30x50 image is resized to 32x48 (multiples of 8): boxes map into that frame and back within 0.5 px."""
    _, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    box = [5.0, 3.0, 21.0, 25.0]
    out = processor(images=[square_image(30, 50, (5, 3, 21, 25))], text=[PROMPT], boxes=[[box]], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]] and (out["input_ids"] == 4).sum() == 24
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == 4).long())
    expected = torch.tensor([5 / 50, 3 / 30, 21 / 50, 25 / 30])
    torch.testing.assert_close(out["vis_boxes"][0, 0], expected)
    fake = type("Out", (), {})()
    fake.sequences, fake.pred_boxes, fake.vis_scores = out["input_ids"], [out["vis_boxes"][0]], [torch.ones(1)]
    fake.pred_masks, fake.prompt_length = None, out["input_ids"].shape[1]
    pixel = processor.post_process_generation(fake, image_sizes=[(30, 50)])[0]["boxes"]
    assert (pixel[0] - torch.tensor(box)).abs().max() <= 0.5


def test_processor_saves_and_loads_without_a_video_processor(qwen_folder, tmp_path):
    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    processor.image_position = "after_text"
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is PerceptionGPTQwen2_5_VLProcessor and getattr(reloaded, "video_processor", None) is None
    assert reloaded.image_position == "after_text" and reloaded.mask_size == processor.mask_size
    image = square_image(30, 50, (5, 3, 21, 25))
    a = processor(images=[image], text=[PROMPT], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
    b = reloaded(images=[image], text=[PROMPT], boxes=[[[5, 3, 21, 25]]], return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="`videos` are not supported"):
        processor(videos=[np.zeros((2, 16, 16, 3), dtype=np.uint8)], text=["<|video_pad|>"])


def test_generate_returns_pixel_boxes_on_the_originalsquare_image(qwen_folder):
    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    model.eval()
    with torch.no_grad():  # `<vis>` likely, so that boxes come out
        model.lm_head.weight[processor.vis_token_id] = model.model.language_model.norm.weight * 3
    image = square_image(30, 50, (5, 3, 21, 25))
    inputs = processor(images=[image], text=["<|vision_start|><image><|vision_end|>Find it:"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    results = processor.post_process_generation(out, image_sizes=[(30, 50)])
    assert len(results[0]["boxes"]) == len(out.pred_boxes[0]) >= 1
    scale = torch.tensor([50, 30, 50, 30])
    torch.testing.assert_close(results[0]["boxes"], out.pred_boxes[0] * scale, rtol=1e-5, atol=1e-4)
    assert results[0]["masks"].shape == (len(out.pred_boxes[0]), 30, 50)


def test_pipeline_batches_images_of_different_sizes(qwen_folder, tmp_path):
    from test_pipeline import assert_batched_pipeline_equals_one_by_one

    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    with torch.no_grad():  # `<vis>` likely, so that boxes come out
        model.lm_head.weight[processor.vis_token_id] = model.model.language_model.norm.weight * 3
    images = [square_image(30, 50, (5, 3, 21, 25)), square_image(40, 24, (2, 2, 12, 20))]  # different grids
    assert_batched_pipeline_equals_one_by_one(model.eval(), processor, tmp_path / "model", images, "Find it:")


def test_box_loss_falls_in_a_short_training_run(qwen_folder):
    """A few hundred steps of synthetic REC (one white square per image) on the tiny Qwen2.5-VL."""
    torch.manual_seed(0)
    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    losses = box_losses_of_a_short_run(model, processor, PROMPT)
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    assert last < 0.6 * first, (first, last)


def test_collator_and_trainer_accumulation_match_one_big_batch(qwen_folder, tmp_path):
    """The collator keeps Qwen's patch grids and token types and labels only the answer (the marked template); under
    PerceptionGPTTrainer, batch 4 == 2 x batch 2 with gradient accumulation (SGD), though Qwen's own class sets
    `accepts_loss_kwargs = False`."""
    from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
    from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset

    rows = build_synthetic_dataset(SyntheticConfig.demo(), "train", 8, seed=0)
    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    batch = DataCollatorForPerceptionGPT(processor)([rows[0], rows[1]])
    assert batch["image_grid_thw"].shape == (2, 3)
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == 4).long())
    answer = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.vis_token_id in answer.tolist() and 4 not in answer.tolist()
    make = lambda: perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)  # noqa: E731
    assert accumulation_error(make, rows, tmp_path) < 1e-6


def test_evaluation_by_generation_runs_on_qwen(qwen_folder):
    from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
    from perceptiongpt.trainer import evaluate_grounding
    from perceptiongpt.trainer.evaluation import SCORED_TASKS

    torch.manual_seed(0)
    model, processor = perceptiongpt.from_base(str(qwen_folder), mask_grid_size=4)
    rows = build_synthetic_dataset(SyntheticConfig.demo(), "validation", 6, seed=1)
    evaluation = evaluate_grounding(model.eval(), processor, rows, batch_size=3, max_new_tokens=4)
    counted = {row["task"] for row in rows} & set(SCORED_TASKS)
    assert len(evaluation.scored) == sum(row["task"] in counted for row in rows) > 0
    assert all(0.0 <= value <= 1.0 for key, value in evaluation.metrics.items() if key.startswith(("rec_", "res_")))


def test_cli_fine_tunes_a_base_qwen_folder(qwen_folder, tmp_path):
    """`perceptiongpt train --model <a Qwen2.5-VL folder>` adds the heads, trains, and saves a folder that loads."""
    from transformers import AutoModelForImageTextToText

    from perceptiongpt.trainer.cli import main

    output = tmp_path / "out"
    main(
        ["train", "--model", str(qwen_folder), "--output_dir", str(output), "--max_steps", "2"]
        + ["--per_device_train_batch_size", "2", "--num_samples", "4", "--warmup_steps", "0", "--use_cpu", "true"]
    )
    model = AutoModelForImageTextToText.from_pretrained(output / "final")
    assert type(model).__name__ == "PerceptionGPTQwen2_5_VLForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(output / "final")).__name__ == "PerceptionGPTQwen2_5_VLProcessor"

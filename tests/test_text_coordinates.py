"""The text-coordinate baseline: answer boxes as `[x1,y1,x2,y2]` text, parsed back exactly."""

import pytest
import torch
from PIL import Image

from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.text_coordinates import (
    box_xyxy_normalized_to_text,
    parse_boxes_xyxy_normalized,
    row_with_text_coordinates,
    text_boxes_to_pixel,
)
from perceptiongpt.processing.tokenization_factory import build_tokenizer


@pytest.fixture(scope="module")
def processor():
    return build_processor(16, 4, 16, build_tokenizer("char"), resize_mode="pad")


def test_format_and_parse():
    assert box_xyxy_normalized_to_text([0.1234, 0.5, 1.2, -0.1]) == "[0.123,0.500,1.000,0.000]"
    text = "Answer: [0.100,0.200,0.300,0.400] and [0.5, 0.5, 0.9, 1.0]; bad [0.6,0.1,0.5,0.2] [1.5,0,1,1] [0.1,0.2]"
    assert parse_boxes_xyxy_normalized(text) == [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0]]
    assert parse_boxes_xyxy_normalized("no box here") == []


def test_row_conversion_keeps_prompt_regions(processor):
    image = Image.new("RGB", (200, 100))  # wide: padded to 200 x 200, so y shifts by 50 px
    row = {
        "image": image,
        "task": "reg",
        "messages": [{"role": "user", "content": "What is <vis>?"}, {"role": "assistant", "content": "It is <vis>."}],
        "boxes": [[0.0, 0.0, 100.0, 50.0], [100.0, 50.0, 200.0, 100.0]],
        "masks": None,
    }
    converted = row_with_text_coordinates(row, processor)
    assert converted["messages"][0]["content"] == "What is <vis>?"
    assert converted["messages"][1]["content"] == "It is [0.500,0.500,1.000,0.750]."
    assert converted["boxes"] == [[0.0, 0.0, 100.0, 50.0]]
    back = text_boxes_to_pixel(converted["messages"][1]["content"], processor, (100, 200))
    assert torch.allclose(back, torch.tensor([[100.0, 50.0, 200.0, 100.0]]), atol=0.5)


def test_collator_text_mode_labels_the_coordinates(processor):
    image = Image.new("RGB", (64, 64))
    row = {
        "image": image,
        "task": "rec",
        "messages": [
            {"role": "user", "content": "Where is the red circle?"},
            {"role": "assistant", "content": "<vis>"},
        ],
        "boxes": [[16.0, 16.0, 48.0, 32.0]],
        "masks": None,
    }
    vis_batch = DataCollatorForPerceptionGPT(processor)([row])
    text_batch = DataCollatorForPerceptionGPT(processor, coordinate_format="text")([row])
    labels = text_batch["labels"][0]
    answer = processor.tokenizer.decode(labels[labels != -100])
    assert answer == " [0.250,0.250,0.750,0.500]</s>"
    assert torch.isnan(text_batch["vis_boxes"]).all() and text_batch["vis_boxes"].shape[1] == 0
    assert (vis_batch["labels"] != -100).sum() == 2  # "<vis>", "</s>": 1 token per object vs 26 + eos
    assert (labels != -100).sum() == len(" [0.250,0.250,0.750,0.500]") + 1
    with pytest.raises(ValueError, match="coordinate_format"):
        DataCollatorForPerceptionGPT(processor, coordinate_format="json")

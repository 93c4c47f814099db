"""DataCollatorForPerceptionGPT: exact labels, packed targets, overflow policy, validation, the datasets schema."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from pycocotools import mask as mask_utils

from perceptiongpt.processing.collator import IGNORE_INDEX, DataCollatorForPerceptionGPT, decode_rle
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.tokenization_factory import build_tokenizer


TOKENIZER = build_tokenizer("char")
PROCESSOR = build_processor(16, 4, 8, TOKENIZER, resize_mode="pad")
IMAGE_TOKENS = [TOKENIZER.image_token_id] * 16
BOS, EOS, PAD, VIS = 1, 2, 0, 5


def _bytes(text):
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _mask():
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 0:16] = True
    return mask


def _rows():
    image = Image.new("RGB", (32, 32))
    return [
        {
            "image": image,
            "task": "rec",
            "messages": [{"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "<vis>"}],
            "boxes": [[0, 0, 16, 16]],
            "masks": None,
        },
        {
            "image": image,
            "task": "multi",
            "messages": [{"role": "user", "content": "Find all."}, {"role": "assistant", "content": "<vis> <vis>"}],
            "boxes": [[0, 8, 16, 24], [16, 0, 32, 8]],
            "masks": [_rle(_mask()), None],
        },
    ]


def test_two_sample_batch_equals_hand_built_expectation():
    batch = DataCollatorForPerceptionGPT(PROCESSOR)(_rows())
    prompt_a = [BOS, *_bytes("USER: "), *IMAGE_TOKENS, *_bytes("\nWhere is it? ASSISTANT:")]
    answer_a = [VIS, EOS]  # `<vis>` absorbs the space before it: one token per object
    prompt_b = [BOS, *_bytes("USER: "), *IMAGE_TOKENS, *_bytes("\nFind all. ASSISTANT:")]
    answer_b = [VIS, VIS, EOS]
    length = max(len(prompt_a) + len(answer_a), len(prompt_b) + len(answer_b))

    def padded(values, fill):
        return values + [fill] * (length - len(values))

    assert batch["input_ids"].tolist() == [padded(prompt_a + answer_a, PAD), padded(prompt_b + answer_b, PAD)]
    assert batch["labels"].tolist() == [
        padded([IGNORE_INDEX] * len(prompt_a) + answer_a, IGNORE_INDEX),
        padded([IGNORE_INDEX] * len(prompt_b) + answer_b, IGNORE_INDEX),
    ]
    assert batch["attention_mask"].sum(1).tolist() == [len(prompt_a) + 2, len(prompt_b) + 3]
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    nan = float("nan")
    expected_boxes = [[[0, 0, 0.5, 0.5], [nan] * 4], [[0, 0.25, 0.5, 0.75], [0.5, 0, 1, 0.25]]]
    torch.testing.assert_close(batch["vis_boxes"], torch.tensor(expected_boxes), equal_nan=True)
    assert batch["vis_mask_valid"].tolist() == [[False, False], [True, False]]
    expected_mask = torch.zeros(8, 8, dtype=torch.bool)
    expected_mask[2:6, 0:4] = True
    assert torch.equal(batch["vis_masks"][1, 0], expected_mask) and batch["vis_masks"][0].sum() == 0


def test_image_after_text_moves_the_image_block():
    batch = DataCollatorForPerceptionGPT(PROCESSOR, image_position="after_text")(_rows()[:1])
    expected = [BOS, *_bytes("USER: Where is it?\n"), *IMAGE_TOKENS, *_bytes(" ASSISTANT:"), VIS, EOS]
    assert batch["input_ids"].tolist() == [expected]
    assert "vis_masks" not in batch  # no row of this batch has a mask


def test_conversation_places_the_image_part():
    row = _rows()[0]
    first = DataCollatorForPerceptionGPT(PROCESSOR).conversation(row, 0)
    after = DataCollatorForPerceptionGPT(PROCESSOR, image_position="after_text").conversation(row, 0)
    image, question = {"type": "image", "image": row["image"]}, {"type": "text", "text": "Where is it?"}
    assert first[0] == {"role": "user", "content": [image, question]}
    assert after[0] == {"role": "user", "content": [question, image]}
    assert first[1] == after[1] == {"role": "assistant", "content": [{"type": "text", "text": "<vis>"}]}


def test_rows_from_a_datasets_table_and_grayscale_images():
    rows = _rows()
    rows[0]["image"] = Image.new("L", (32, 32))
    dataset = Dataset.from_list(rows)
    batch = DataCollatorForPerceptionGPT(PROCESSOR)([dataset[0], dataset[1]])
    reference = DataCollatorForPerceptionGPT(PROCESSOR)(_rows())
    for key in reference:
        torch.testing.assert_close(batch[key], reference[key], equal_nan=True)


def test_overflow_raises_or_drops_and_never_truncates():
    rows = _rows()
    length_a, length_b = (int(DataCollatorForPerceptionGPT(PROCESSOR)([row])["attention_mask"].sum()) for row in rows)
    assert length_a == length_b + 2  # "Where is it?" + 1 `<vis>` vs "Find all." + 2 `<vis>`
    with pytest.raises(ValueError, match=f"`rows\\[0\\]` has {length_a} tokens, more than `max_length` = {length_b}"):
        DataCollatorForPerceptionGPT(PROCESSOR, max_length=length_b)(rows)
    with pytest.warns(UserWarning, match="Dropped"):
        batch = DataCollatorForPerceptionGPT(PROCESSOR, max_length=length_b, on_overflow="drop")(rows)
    assert batch["input_ids"].shape == (1, length_b) and batch["vis_boxes"].shape == (1, 2, 4)
    torch.testing.assert_close(batch["vis_boxes"][0], torch.tensor([[0, 0.25, 0.5, 0.75], [0.5, 0, 1, 0.25]]))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="All 2 rows of the batch exceed"):
        DataCollatorForPerceptionGPT(PROCESSOR, max_length=10, on_overflow="drop")(rows)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"boxes": [[0, 0, 4, 4]]}, ValueError, "`rows\\[1\\]\\['boxes'\\]` has 1 boxes but its messages have 2"),
        ({"boxes": [[0, 0, 4, 4], [4, 4, 2, 8]]}, ValueError, "`boxes\\[0\\]\\[1\\]` must have x2 > x1"),
        ({"masks": [None, None, _rle(_mask())]}, ValueError, "`rows\\[1\\]\\['masks'\\]` has 3 entries but its"),
        ({"masks": ["rle", None]}, TypeError, "`rows\\[1\\]\\['masks'\\]\\[0\\]` must be an RLE dict"),
        ({"masks": [_rle(np.ones((8, 8), bool)), None]}, ValueError, "the image's size \\(H, W\\) = \\(32, 32\\)"),
        ({"messages": [{"role": "user", "content": " "}]}, ValueError, "\\[0\\]\\['content'\\]` must be non-empty"),
        ({"messages": [{"role": "user", "content": "<image> hi"}]}, ValueError, "must not contain '<image>'"),
        ({"messages": [{"role": "assistant", "content": "<vis> <vis>"}]}, ValueError, "must contain a user message"),
        ({"image": None}, ValueError, "`rows\\[1\\]\\['image'\\]` is missing"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            ValueError,
            "\\['role'\\]` must be one of \\('system', 'user'",
        ),
    ],
)
def test_invalid_rows_raise_clear_errors(change, error, message):
    rows = _rows()
    rows[1].update(change)
    with pytest.raises(error, match=message):
        DataCollatorForPerceptionGPT(PROCESSOR)(rows)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="`on_overflow` must be one of \\('raise', 'drop'\\), got 'cut'"):
        DataCollatorForPerceptionGPT(PROCESSOR, on_overflow="cut")
    with pytest.raises(ValueError, match="`image_position` must be one of"):
        DataCollatorForPerceptionGPT(PROCESSOR, image_position="last")
    with pytest.raises(ValueError, match="`max_length` must be a positive int or None, got 0"):
        DataCollatorForPerceptionGPT(PROCESSOR, max_length=0)


def test_decode_rle_accepts_compressed_and_uncompressed_counts():
    mask = _mask()
    compressed = _rle(mask)
    assert np.array_equal(decode_rle(compressed, "m"), mask)
    assert np.array_equal(decode_rle({**compressed, "counts": compressed["counts"].encode()}, "m"), mask)
    # uncompressed (COCO iscrowd) counts: runs of 0s and 1s in column-major order
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    assert np.array_equal(decode_rle({"size": [32, 32], "counts": counts}, "m"), mask)


def test_batch_trains_the_tiny_model_with_every_loss_part():
    from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration

    config = PerceptionGPTConfig.from_preset("tiny")
    processor = build_processor(
        config.vision_config.image_size, config.vision_config.patch_size, config.mask_head_config.mask_size, TOKENIZER
    )
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(config)
    outputs = model(**DataCollatorForPerceptionGPT(processor)(_rows()))
    parts = [
        outputs.lm_loss,
        outputs.box_l1_loss,
        outputs.box_giou_loss,
        outputs.mask_dice_loss,
        outputs.mask_bce_loss,
    ]
    assert all(torch.isfinite(part) and part > 0 for part in parts)
    outputs.loss.backward()
    assert model.box_decoder.mlp[-1].weight.grad.abs().sum() > 0


def test_pre_encoded_rows_collate_like_raw_rows():
    collator = DataCollatorForPerceptionGPT(PROCESSOR)
    rows = _rows()
    raw = collator(rows)
    encoded = collator([collator.encode(row, i) for i, row in enumerate(rows)])
    assert raw.keys() == encoded.keys()
    for key in raw:
        assert torch.equal(raw[key].nan_to_num(-7), encoded[key].nan_to_num(-7)), key

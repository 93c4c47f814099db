"""Collator from DESIGN.md's grounding rows to model inputs, with labels on the assistant answers only.

A row: `image` (PIL), `messages` ([{"role", "content": str}] with `<vis>` in the text, no `<image>`), `boxes` (pixel
xyxy, one per `<vis>` in order of appearance over all messages), `masks` (pycocotools RLE dict or None per `<vis>`, or
None).
Other columns (e.g. `task`) are ignored, so it works with `remove_unused_columns=False`.
"""

import warnings

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .templates import IMAGE_POSITIONS, user_content
from .text_coordinates import COORDINATE_FORMATS, row_with_text_coordinates


IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
PER_IMAGE_KEYS = ("image_grid_thw",)
PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
OVERFLOW_ACTIONS = ("raise", "drop")


def decode_rle(rle: dict, name: str) -> np.ndarray:
    """A pycocotools RLE dict (compressed str/bytes counts or uncompressed list counts) -> (H, W) bool."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise TypeError(f"`{name}` must be an RLE dict with 'size' and 'counts', got {type(rle).__name__}.")
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def _is_encoded(row) -> bool:
    return "input_ids" in row and "labels" in row


def _as_tensors(row: dict) -> dict:
    """A pre-encoded row as tensors with their shapes: `encode`'s own output, or a row of
    `encode_grounding_dataset` (numpy, where an empty slot axis lost its trailing sizes)."""
    if isinstance(row["input_ids"], torch.Tensor):
        return row
    out = {key: torch.from_numpy(np.array(value)) for key, value in row.items()}  # copies: Arrow's are read-only
    out["vis_boxes"] = out["vis_boxes"].reshape(1, -1, 4).float()  # (1, K, 4)
    if "vis_masks" in out and not out["vis_mask_valid"].any():  # the all-invalid placeholder of a maskless row
        del out["vis_masks"], out["vis_mask_valid"]
    elif "vis_masks" in out:
        side = out["vis_masks"].shape[-1]
        out["vis_masks"] = out["vis_masks"].reshape(1, -1, side, side).bool()  # (1, K, m, m)
        out["vis_mask_valid"] = out["vis_mask_valid"].reshape(1, -1).bool()  # (1, K)
    return out


class DataCollatorForPerceptionGPT:
    """Turn grounding rows into `input_ids`, `attention_mask`, `labels`, `pixel_values` and the `<vis>` targets.

    Args:
        processor: a `PerceptionGPTProcessor` (its chat template marks the assistant answers).
        max_length: longest allowed sequence, image tokens included; None = no limit. A sample is never truncated
            (that could cut a `<vis>` or an `<image>` block): it raises or is dropped, per `on_overflow`.
        on_overflow: "raise" or "drop" (with a warning) for samples longer than `max_length`.
        image_position: "first" puts the image before the first user text, "after_text" after it; None (default)
            takes the processor's `image_position`, the layout the model is trained and queried with.
        coordinate_format: "vis" (one `<vis>` per answer object) or "text" (the Shikra-style baseline: answer boxes
            written as `[x1,y1,x2,y2]` normalized text, see `text_coordinates.py`).

    Returns (from `__call__`): `input_ids`, `attention_mask` (B, T) right-padded; `labels` (B, T) = input_ids on the
    assistant answers (text, `<vis>` and eos), -100 elsewhere; `pixel_values` (B, 3, S, S); `vis_boxes` (B, K, 4)
    normalized xyxy, NaN = absent; with any mask in the batch, `vis_masks` (B, K, m, m) bool and `vis_mask_valid`
    (B, K).
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        on_overflow: str = "raise",
        image_position: str | None = None,
        coordinate_format: str = "vis",
    ):
        if on_overflow not in OVERFLOW_ACTIONS:
            raise ValueError(f"`on_overflow` must be one of {OVERFLOW_ACTIONS}, got {on_overflow!r}.")
        image_position = processor.image_position if image_position is None else image_position
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"`image_position` must be one of {IMAGE_POSITIONS}, got {image_position!r}.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"`max_length` must be a positive int or None, got {max_length!r}.")
        if coordinate_format not in COORDINATE_FORMATS:
            raise ValueError(f"`coordinate_format` must be one of {COORDINATE_FORMATS}, got {coordinate_format!r}.")
        self.coordinate_format = coordinate_format
        self.processor = processor
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.image_position = image_position

    def conversation(self, row: dict, index: int) -> list[dict]:
        """The row's messages as a chat with the image part placed per `image_position` (index names the row)."""
        messages = row.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"`rows[{index}]['messages']` must be a non-empty list of messages, got {messages!r}.")
        conversation, image_placed = [], False
        for turn, message in enumerate(messages):
            name = f"rows[{index}]['messages'][{turn}]"
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise ValueError(f"`{name}['role']` must be one of {ROLES}, got {role!r}.")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"`{name}['content']` must be non-empty text, got {content!r}.")
            if self.processor.image_token in content:
                raise ValueError(f"`{name}` must not contain {self.processor.image_token!r}; the collator places it.")
            parts = [{"type": "text", "text": content}]
            if message.get("role") == "user" and not image_placed:
                parts = user_content(content, row.get("image"), self.image_position)
                image_placed = True
            conversation.append({"role": message.get("role"), "content": parts})
        if not image_placed:
            raise ValueError(f"`rows[{index}]['messages']` must contain a user message to attach the image to.")
        return conversation

    def encode(self, row: dict, index: int = 0) -> dict:
        """One row -> its unpadded tensors (batch dim 1). A list of these is a valid, pre-encoded training set: the
        collator then only pads, which keeps slow chat templating out of the training loop."""
        if row.get("image") is None:
            raise ValueError(f"`rows[{index}]['image']` is missing.")
        self.conversation(row, index)  # validates the messages
        n_vis = sum(message["content"].count(self.processor.vis_token) for message in row["messages"])
        boxes = [] if row.get("boxes") is None else list(row["boxes"])
        if len(boxes) != n_vis:
            raise ValueError(f"`rows[{index}]['boxes']` has {len(boxes)} boxes but its messages have {n_vis} `<vis>`.")
        if self.coordinate_format == "text":
            row = row_with_text_coordinates(row, self.processor)
            n_vis, boxes = len(row["boxes"]), list(row["boxes"])
        conversation = self.conversation(row, index)
        rles, masks = row.get("masks"), None
        if rles is not None and any(rle is not None for rle in rles):
            name = f"rows[{index}]['masks']"
            if len(rles) != n_vis:
                raise ValueError(f"`{name}` has {len(rles)} entries but its messages have {n_vis} `<vis>`.")
            masks = [None if rle is None else decode_rle(rle, f"{name}[{k}]") for k, rle in enumerate(rles)]
        encoded = self.processor.apply_chat_template(
            [conversation],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            processor_kwargs={"boxes": [boxes], "masks": None if masks is None else [masks]},
        )
        input_ids = encoded["input_ids"][0]
        encoded["labels"] = torch.where(encoded["assistant_masks"][0].bool(), input_ids, IGNORE_INDEX)
        return encoded

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        samples = []
        for index, row in enumerate(rows):
            encoded = _as_tensors(row) if _is_encoded(row) else self.encode(row, index)
            length = encoded["input_ids"].shape[1]
            if self.max_length is not None and length > self.max_length:
                message = f"`rows[{index}]` has {length} tokens, more than `max_length` = {self.max_length}."
                if self.on_overflow == "raise":
                    raise ValueError(message + " Raise `max_length` or pass on_overflow='drop'.")
                warnings.warn(message + " Dropped (on_overflow='drop').")
                continue
            samples.append(encoded)
        if not samples:
            raise ValueError(f"All {len(rows)} rows of the batch exceed `max_length` = {self.max_length}.")
        return self._pad(samples)

    def _pad(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch_size = len(samples)
        length = max(sample["input_ids"].shape[1] for sample in samples)
        slots = max(sample["vis_boxes"].shape[1] for sample in samples)
        pad_id = self.processor.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.full((batch_size, length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((batch_size, length), dtype=torch.long),
            "labels": torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long),
            "pixel_values": torch.cat(
                [sample["pixel_values"] for sample in samples]
            ),  # (B, 3, S, S) or Qwen's patches
            "vis_boxes": torch.full((batch_size, slots, 4), float("nan")),  # (B, K, 4)
        }
        with_masks = any("vis_masks" in sample for sample in samples)
        if with_masks:
            size = self.processor.mask_size
            batch["vis_masks"] = torch.zeros((batch_size, slots, size, size), dtype=torch.bool)  # (B, K, m, m)
            batch["vis_mask_valid"] = torch.zeros((batch_size, slots), dtype=torch.bool)  # (B, K)
        for key in PER_IMAGE_KEYS:  # the family's per-image inputs (Qwen's patch grids), in image order
            if key in samples[0]:
                batch[key] = torch.cat([sample[key] for sample in samples])
        for key in PER_TOKEN_KEYS:  # and its per-token inputs, right-padded with 0 (text)
            if key in samples[0]:
                batch[key] = torch.zeros((batch_size, length), dtype=samples[0][key].dtype)
                for row, sample in enumerate(samples):
                    batch[key][row, : sample[key].shape[1]] = sample[key][0]
        for row, sample in enumerate(samples):
            n_tokens, n_slots = sample["input_ids"].shape[1], sample["vis_boxes"].shape[1]
            batch["input_ids"][row, :n_tokens] = sample["input_ids"][0]
            batch["attention_mask"][row, :n_tokens] = sample["attention_mask"][0]
            batch["labels"][row, :n_tokens] = sample["labels"]
            batch["vis_boxes"][row, :n_slots] = sample["vis_boxes"][0]
            if "vis_masks" in sample:
                batch["vis_masks"][row, :n_slots] = sample["vis_masks"][0]
                batch["vis_mask_valid"][row, :n_slots] = sample["vis_mask_valid"][0]
        return batch


__all__ = ["DataCollatorForPerceptionGPT", "decode_rle", "IGNORE_INDEX"]

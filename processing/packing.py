"""Padding-free packed batches: the whole batch as one row `[1, T]`, with `position_ids` restarting per sample.

transformers' `DataCollatorWithFlattening` concatenates `input_ids` and `labels` (the first label of each sample set
to -100, so no sample is trained to predict the next one's first token) and restarts `position_ids`, but it drops
every other key. Here `pixel_values` and the `<vis>` targets are re-attached in token order:
- `pixel_values` (N_img, 3, S, S): the samples' images concatenated in order, which is the order of the `<image>`
  blocks in the packed row, so LLaVA's in-order scatter puts each image into its own sample;
- `vis_boxes` (1, K_total, 4), and `vis_masks` (1, K_total, m, m) with `vis_mask_valid` (1, K_total): each sample's
  slots, one per `<vis>`, concatenated, so slot k is still the row's k-th `<vis>`.

The model then computes exactly what it computes on the padded batch, provided that:
- there is no `attention_mask` (none is returned): sdpa/eager build their block-diagonal mask from `position_ids`
  only when `attention_mask` is None and there is no cache;
- `use_cache=False` is passed to forward (`PerceptionGPTTrainer.compute_loss` does). The composite config's
  `text_config.use_cache` stays True under Trainer, the LM then builds a cache and the samples attend across
  their boundaries without any error;
- mask targets map each `<vis>` to its own sample's image (the model's per-token image index). A model that maps a
  row to its FIRST image would read sample 0's image for every packed mask target.
FlashAttention detects the packing from `position_ids` as well. `cu_seq_lens_*` kwargs are not returned: LLaVA
forwards extra kwargs to the vision tower too, where text boundaries would be wrong.
Shapes: B rows, T tokens, K slots, m mask side.
"""

import torch
from transformers import DataCollatorWithFlattening

from .collator import IGNORE_INDEX, DataCollatorForPerceptionGPT


PACKED_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "vis_boxes", "vis_masks", "vis_mask_valid")


def _row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """(B, T) right-padded mask -> each row's length; refuses left padding, whose tokens the packing would drop."""
    lengths = attention_mask.sum(-1)  # (B,)
    positions = torch.arange(attention_mask.shape[1])[None]  # (1, T)
    right_padded = attention_mask.bool() == (positions < lengths[:, None])  # (B, T)
    if not right_padded.all():
        row = int((~right_padded).any(-1).nonzero()[0, 0])
        raise ValueError(f"`attention_mask` row {row} is not right-padded (ones then zeros); packing needs that.")
    return lengths.tolist()


def _pack_slots(tensor: torch.Tensor, counts: list[int], fill) -> torch.Tensor:
    """(B, K, ...) slots -> (1, sum(counts), ...): the first `counts[b]` slots of each row, in row order."""
    parts = []
    for row, count in enumerate(counts):
        part = tensor[row, :count]  # (<= count, ...)
        missing = count - part.shape[0]  # a row with more `<vis>` than slots: those slots are absent
        if missing:
            part = torch.cat([part, part.new_full((missing, *part.shape[1:]), fill)])
        parts.append(part)
    return torch.cat(parts)[None]


def pack_batch(batch: dict, vis_token_id: int, return_seq_idx: bool = False) -> dict:
    """A right-padded batch (`DataCollatorForPerceptionGPT`'s output) -> one packed row.

    Returns `input_ids`, `labels`, `position_ids` (1, T_total); `pixel_values` (B, 3, S, S) unchanged;
    `vis_boxes` (1, K_total, 4); `vis_masks` (1, K_total, m, m) and `vis_mask_valid` (1, K_total) when given;
    `seq_idx` (1, T_total) int32 when `return_seq_idx`. No `attention_mask`: see the module docstring.
    """
    unknown = sorted(set(batch) - set(PACKED_KEYS))
    if unknown:  # DataCollatorWithFlattening drops unknown keys silently; refuse instead
        raise ValueError(f"`batch` has keys that packing cannot place: {unknown}; known keys: {list(PACKED_KEYS)}.")
    if "vis_masks" in batch and "vis_mask_valid" not in batch:
        raise ValueError("`batch` has `vis_masks` without `vis_mask_valid`.")
    input_ids = batch["input_ids"]  # (B, T)
    if "attention_mask" in batch:
        lengths = _row_lengths(batch["attention_mask"])
    else:
        lengths = [input_ids.shape[1]] * input_ids.shape[0]
    labels = batch.get("labels")
    features = [
        {"input_ids": input_ids[row, :length], **({} if labels is None else {"labels": labels[row, :length]})}
        for row, length in enumerate(lengths)
    ]
    flattening = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_seq_idx=return_seq_idx)
    packed = flattening(features, return_tensors="pt")  # input_ids, labels, position_ids (1, T_total)
    if labels is None:  # DataCollatorWithFlattening invents labels from input_ids; keep "no labels" as given
        del packed["labels"]
    if "pixel_values" in batch:
        packed["pixel_values"] = batch["pixel_values"]  # (N_img, 3, S, S): already in `<image>` block order
    counts = [int((input_ids[row, :length] == vis_token_id).sum()) for row, length in enumerate(lengths)]
    if "vis_boxes" in batch:
        packed["vis_boxes"] = _pack_slots(batch["vis_boxes"], counts, float("nan"))  # (1, K_total, 4)
    if "vis_masks" in batch:
        packed["vis_masks"] = _pack_slots(batch["vis_masks"], counts, False)  # (1, K_total, m, m)
        packed["vis_mask_valid"] = _pack_slots(batch["vis_mask_valid"], counts, False)  # (1, K_total)
    return packed


class DataCollatorForPackedPerceptionGPT(DataCollatorForPerceptionGPT):
    """`DataCollatorForPerceptionGPT` whose batch is packed into one row through `DataCollatorWithFlattening`.

    Same arguments as `DataCollatorForPerceptionGPT` (`max_length` applies per sample), plus `return_seq_idx`.
    Returns `pack_batch`'s keys. Train with `use_cache=False` (the module docstring says why); the Trainer's
    `num_items_in_batch` and the `<vis>` target counts are unchanged by packing.
    """

    def __init__(self, processor, max_length=None, on_overflow="raise", image_position=None, return_seq_idx=False):
        super().__init__(processor, max_length=max_length, on_overflow=on_overflow, image_position=image_position)
        self.return_seq_idx = return_seq_idx

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pack_batch(super().__call__(rows), self.processor.vis_token_id, self.return_seq_idx)


__all__ = ["DataCollatorForPackedPerceptionGPT", "pack_batch"]

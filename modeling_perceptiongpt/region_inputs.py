"""Indexing and validation of the batch-first region tensors (`vis_boxes`, `vis_masks`, `vis_mask_valid`).

Shapes: B rows, T tokens, K slots, S mask side. Boxes are normalized xyxy in [0, 1]; NaN marks an absent slot.
"""

import contextlib

import torch
from transformers.utils import is_torchdynamo_compiling


def heads_inference_mode():
    """`torch.inference_mode()` for the heads' work inside a no-grad generate() step: a quarter to a third less
    dispatch per op on CPU, where the per-step heads are dispatch-bound (benchmarks/generate_overhead.py). A no-op
    where gradients are on or under torch.compile. Its outputs are inference tensors: consume them with out-of-place
    ops, or clone them before they leave generate()."""
    if torch.is_grad_enabled() or is_torchdynamo_compiling():
        return contextlib.nullcontext()
    return torch.inference_mode()


def vis_slot_index(input_ids: torch.Tensor, vis_token_id: int) -> torch.Tensor:
    """(B, T) -> (B, T): at each `<vis>`, its slot (0 for the row's first `<vis>`, 1 for the second, ...)."""
    return (input_ids == vis_token_id).long().cumsum(-1) - 1


def image_starts_by_count(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int) -> torch.Tensor:
    """(B, T) -> (B, T) bool: the first placeholder of each image, for families with a fixed token count per image
    (LLaVA), where two images back to back form one placeholder run."""
    is_image = input_ids == image_token_id  # (B, T)
    return is_image & ((is_image.long().cumsum(-1) - 1) % tokens_per_image == 0)


def image_starts_by_run(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) -> (B, T) bool: the first placeholder of each run, for families that delimit every image (Qwen's
    vision start/end tokens), whatever its token count."""
    is_image = input_ids == image_token_id  # (B, T)
    before = torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)  # (B, T)
    return is_image & ~before


def last_image_index_per_row(image_starts: torch.Tensor) -> torch.Tensor:
    """(B, T) image starts -> (B,): index into the batch's images of each row's LAST image, -1 for rows without one.

    Images are numbered in row order, as the families scatter them into their placeholders. This is the image of
    every `<vis>` generated after the row (the latest image at or before it: the rule `image_index_per_token`
    applies in training), since an image placeholder is never generated.
    """
    images_per_row = image_starts.sum(-1)  # (B,)
    last = images_per_row.cumsum(0) - 1  # (B,)
    return torch.where(images_per_row > 0, last, torch.full_like(last, -1))


def image_index_per_token(image_starts: torch.Tensor, num_images: int | None = None) -> torch.Tensor:
    """(B, T) image starts -> (B, T): index into the batch's images of the latest image begun at or before each
    position of its row (the row's first image before any), -1 for rows without one.

    In a packed row (several samples, each with its image before its `<vis>`) each `<vis>` thus gets its own
    sample's image; in a one-image row every position gets that image. `num_images`: how many images were encoded,
    when generate() repeated each sample's rows (beams, returned sequences) but encoded its images once: the rows
    then index the unrepeated images.
    """
    repeats = 1 if num_images is None else max(int(image_starts.sum()) // max(num_images, 1), 1)
    if repeats > 1:
        return image_index_per_token(image_starts[::repeats]).repeat_interleave(repeats, 0)
    images_per_row = image_starts.sum(-1)  # (B,)
    first = images_per_row.cumsum(0) - images_per_row  # (B,)
    begun = image_starts.long().cumsum(-1)  # (B, T) images begun up to t
    index = first[:, None] + (begun - 1).clamp(min=0)  # (B, T)
    return torch.where(images_per_row[:, None] > 0, index, torch.full_like(index, -1))


def embed_boxes_branch_free(box_encoder, input_ids, inputs_embeds, vis_boxes, vis_token_id, mode):
    """`embed_regions` for boxes without data-dependent shapes or branches, so that `torch.compile(fullgraph=True)`
    traces it (a generate step feeds at most one `<vis>` per row). Every position is encoded: meant for short inputs.

    input_ids (B, T), inputs_embeds (B, T, D), vis_boxes (B, K, 4) normalized xyxy, NaN = absent -> (B, T, D).
    """
    with heads_inference_mode():  # the output (below) is a normal tensor
        is_vis = input_ids == vis_token_id  # (B, T)
        boxes = vis_boxes.to(inputs_embeds.device)  # (B, K, 4)
        if boxes.shape[1] != 1 or input_ids.shape[1] != 1:  # else a decode step: its token, its one slot
            slots = vis_slot_index(input_ids, vis_token_id).clamp(0, vis_boxes.shape[1] - 1)  # (B, T)
            boxes = boxes.gather(1, slots[..., None].expand(-1, -1, 4))  # (B, T, 4)
        valid = is_vis & (boxes == boxes).all(-1)  # (B, T): no NaN (checked boxes are NaN or finite)
        region = box_encoder(boxes.nan_to_num(0.0).to(inputs_embeds.dtype)).to(inputs_embeds)  # (B, T, D)
    if mode == "add":
        region = region + inputs_embeds
    return torch.where(valid[..., None], region, inputs_embeds)


def vis_targets(vis_token_id, input_ids, labels, vis_boxes, vis_mask_valid=None, image_index=None):
    """The supervised `<vis>` tokens (labels == `<vis>`, never position 0, which nothing predicts).

    image_index (B, T): `image_index_per_token`, needed with `vis_mask_valid`. Returns rows, cols, slots (N,) and
    has_box, has_mask (N,) bool: a box target needs a finite slot box, a mask target a valid slot mask and an image
    in its row. The trainer counts these over the global batch (through the model's `vis_targets`).
    """
    is_target = labels == vis_token_id  # (B, T)
    is_target[:, 0] = False
    rows, cols = is_target.nonzero(as_tuple=True)  # (N,)
    slots = vis_slot_index(input_ids, vis_token_id)[rows, cols]  # (N,)
    known = slots < vis_boxes.shape[1]
    boxes = torch.full((len(rows), 4), float("nan"), device=labels.device)
    boxes[known] = vis_boxes.to(boxes)[rows[known], slots[known]]
    has_box = torch.isfinite(boxes).all(-1)  # (N,)
    has_mask = torch.zeros_like(has_box)
    if vis_mask_valid is not None:
        known = slots < vis_mask_valid.shape[1]
        has_mask[known] = vis_mask_valid.to(labels.device)[rows[known], slots[known]]
        has_mask &= image_index[rows, cols] >= 0
    return rows, cols, slots, has_box, has_mask


def check_region_inputs(config, input_ids, vis_boxes, vis_masks, vis_mask_valid) -> None:
    """Raises a ValueError/TypeError naming the argument, the expected and the actual value."""
    if vis_boxes is not None:
        _check_boxes(config, input_ids, vis_boxes)
    if vis_masks is None:
        if vis_mask_valid is not None:
            raise ValueError("`vis_mask_valid` was given without `vis_masks`.")
        return
    if not isinstance(vis_masks, torch.Tensor):
        raise TypeError(f"`vis_masks` must be a torch.Tensor, got {type(vis_masks).__name__}.")
    side = config.mask_head_config.mask_size
    if vis_masks.dim() != 4 or tuple(vis_masks.shape[-2:]) != (side, side):
        raise ValueError(f"`vis_masks` must have shape (B, K, {side}, {side}), got {tuple(vis_masks.shape)}.")
    if vis_mask_valid is None or tuple(vis_mask_valid.shape) != tuple(vis_masks.shape[:2]):
        got = None if vis_mask_valid is None else tuple(vis_mask_valid.shape)
        raise ValueError(f"`vis_mask_valid` must have shape {tuple(vis_masks.shape[:2])} (B, K), got {got}.")
    if input_ids is not None:
        _check_slot_counts(config, input_ids, vis_mask_valid.bool(), "vis_masks")


# Set on the `vis_boxes` that generate() builds from its own decoded boxes (valid by construction): a decode step
# then skips their validation (one host sync and ~20 small ops per step). A moved or copied tensor loses the mark.
DECODED_BY_GENERATE = "_perceptiongpt_decoded_by_generate"


def _check_boxes(config, input_ids, vis_boxes) -> None:
    if getattr(vis_boxes, DECODED_BY_GENERATE, False):
        return
    if not isinstance(vis_boxes, torch.Tensor):
        raise TypeError(f"`vis_boxes` must be a torch.Tensor, got {type(vis_boxes).__name__}.")
    if vis_boxes.dim() != 3 or vis_boxes.shape[-1] != 4:
        raise ValueError(f"`vis_boxes` must have shape (B, K, 4), got {tuple(vis_boxes.shape)}.")
    if input_ids is not None and vis_boxes.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"`vis_boxes` must have one row per `input_ids` row ({input_ids.shape[0]}), got {vis_boxes.shape[0]}."
        )
    nan = torch.isnan(vis_boxes)
    given = ~nan.all(-1)  # (B, K)
    partial = nan.any(-1) & given  # (B, K)
    boxes = vis_boxes.nan_to_num(0.0, posinf=2.0, neginf=-1.0)  # (B, K, 4): NaN slots pass, +-inf fail below
    bad = (boxes < 0).any(-1) | (boxes > 1).any(-1) | (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    bad &= given & ~partial  # (B, K)
    extra = _extra_slots(config, input_ids, given)  # (B, K)
    if not (partial | bad | extra).any():  # one host sync per forward (generate() calls this at every step)
        return
    if partial.any():
        raise ValueError("`vis_boxes` has a partly-NaN box: a slot must be all NaN (absent) or a full xyxy box.")
    if bad.any():
        raise ValueError(
            "`vis_boxes` must be normalized xyxy boxes with 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1, got "
            f"{vis_boxes[bad][0].tolist()}."
        )
    _check_slot_counts(config, input_ids, given, "vis_boxes")


def _extra_slots(config, input_ids, given) -> torch.Tensor:
    """(B, K) regions given past the row's `<vis>` count (none without `input_ids`)."""
    if input_ids is None:
        return torch.zeros_like(given)
    num_vis = (input_ids == config.vis_token_id).sum(-1)  # (B,)
    slot = torch.arange(given.shape[1], device=given.device)[None]  # (1, K)
    return given & (slot >= num_vis.to(given.device)[:, None])


def _check_slot_counts(config, input_ids, given, name) -> None:
    extra = _extra_slots(config, input_ids, given)  # (B, K)
    if extra.any():
        num_vis = (input_ids == config.vis_token_id).sum(-1)  # (B,)
        row = int(extra.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"`{name}` row {row} has {int(given[row].sum())} regions (up to slot {int(given[row].nonzero().max())}) "
            f"but only {int(num_vis[row])} `<vis>` tokens."
        )


__all__ = [
    "check_region_inputs",
    "embed_boxes_branch_free",
    "image_index_per_token",
    "image_starts_by_count",
    "image_starts_by_run",
    "last_image_index_per_row",
    "vis_slot_index",
    "vis_targets",
]

"""Box and mask losses, returned as SUMS over `<vis>` targets.

The caller divides each sum by the number of targets in the global batch (gradient-accumulation window x
processes), the way `num_items_in_batch` works for tokens, so that splitting a batch never changes the gradient.
Shapes: N = `<vis>` targets, S = mask frame side. Boxes are normalized xyxy.
"""

import math

import torch
import torch.nn.functional as F

from .box_decoders_perceptiongpt import ordered_params_from_box_xyxy, patch_centres
from .box_ops import generalized_box_xyxy_iou


def box_l1_loss_sum(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Per-box mean absolute error over the 4 coordinates, summed over boxes: (N, 4), (N, 4) -> ()."""
    return (pred_boxes - target_boxes).abs().mean(-1).sum()


def box_giou_loss_sum(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Sum of 1 - GIoU, computed on xyxy (the official code wrongly read xyxy as cxcywh): (N, 4), (N, 4) -> ()."""
    return (1 - generalized_box_xyxy_iou(pred_boxes, target_boxes)).sum()


def box_dfl_loss_sum(bin_logits: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """GFL's distribution focal loss on the ordered coordinates (u_x, f_x, u_y, f_y): cross-entropy on the two bins
    around each target value, weighted by nearness; mean over the 4 coordinates, summed over boxes.
    (N, 4, n) logits over n values linspace(0, 1, n), (N, 4) xyxy targets -> ()."""
    n = bin_logits.shape[-1]
    position = ordered_params_from_box_xyxy(target_boxes.float()) * (n - 1)  # (N, 4) in [0, n - 1]
    low = position.floor().clamp(max=n - 2)  # (N, 4)
    high_weight = position - low  # (N, 4) in [0, 1]
    log_probs = bin_logits.float().log_softmax(-1)  # (N, 4, n)
    low_log_prob = log_probs.gather(-1, low.long()[..., None])[..., 0]  # (N, 4)
    high_log_prob = log_probs.gather(-1, low.long()[..., None] + 1)[..., 0]  # (N, 4)
    loss = -((1 - high_weight) * low_log_prob + high_weight * high_log_prob)  # (N, 4)
    return loss.mean(-1).sum()


def box_interior_loss_sum(patch_logits: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of an attention over a row-major g x g patch grid against the uniform distribution on the
    patches whose centres lie inside the target box (the patch holding its centre when none does): a dense,
    classification-style signal from a box alone. Summed over boxes. (N, g*g) logits, (N, 4) xyxy -> ()."""
    grid = math.isqrt(patch_logits.shape[-1])
    centres = patch_centres(grid, device=patch_logits.device)  # (P, 2)
    x1, y1, x2, y2 = (target_boxes.float()[:, i : i + 1] for i in range(4))  # (N, 1) each
    inside = (centres[:, 0] >= x1) & (centres[:, 0] <= x2) & (centres[:, 1] >= y1) & (centres[:, 1] <= y2)  # (N, P)
    centre_cell = ((y1 + y2) / 2 * grid).long().clamp(0, grid - 1) * grid + ((x1 + x2) / 2 * grid).long().clamp(
        0, grid - 1
    )  # (N, 1)
    fallback = torch.zeros_like(inside).scatter_(1, centre_cell, True)  # (N, P)
    inside = torch.where(inside.any(-1, keepdim=True), inside, fallback)
    target = inside.float() / inside.sum(-1, keepdim=True)  # (N, P)
    return -(target * patch_logits.float().log_softmax(-1)).sum()


def mask_dice_loss_sum(mask_logits: torch.Tensor, target_masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask soft Dice loss, summed over masks (the official code pooled all masks into one Dice).

    `smooth` makes an empty target with an empty prediction cost 0. (N, S, S) logits, (N, S, S) {0, 1} -> ().
    """
    probs = mask_logits.sigmoid().flatten(1)  # (N, S*S)
    target = target_masks.to(probs.dtype).flatten(1)  # (N, S*S)
    inter = (probs * target).sum(-1)  # (N,)
    dice = (2 * inter + smooth) / (probs.sum(-1) + target.sum(-1) + smooth)  # (N,)
    return (1 - dice).sum()


def mask_bce_loss_sum(mask_logits: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """Per-mask mean pixel BCE-with-logits, summed over masks: (N, S, S), (N, S, S) -> ()."""
    bce = F.binary_cross_entropy_with_logits(mask_logits, target_masks.to(mask_logits.dtype), reduction="none")
    return bce.flatten(1).mean(-1).sum()


def box_losses(box, has_box, has_image, gt_boxes, denom) -> dict[str, torch.Tensor]:
    """The box loss parts of one batch, each a sum over its box targets divided by `denom` (the global count).

    box: the decoder's `BoxPrediction` over N targets; has_box, has_image (N,) bool; gt_boxes (N_box, 4) xyxy.
    `box_aux_loss` is the design's dense loss: DFL on the bins, or box-interior CE on the query's patch logits.
    """
    pred_boxes = box.boxes[has_box]  # (N_box, 4)
    losses = {
        "box_l1_loss": box_l1_loss_sum(pred_boxes, gt_boxes) / denom,
        "box_giou_loss": box_giou_loss_sum(pred_boxes, gt_boxes) / denom,
    }
    if box.bin_logits is not None:
        losses["box_aux_loss"] = box_dfl_loss_sum(box.bin_logits[has_box], gt_boxes) / denom
    elif box.patch_logits is not None:
        seen = has_image[has_box]  # (N_box,): only a box with an image has patches to point at
        losses["box_aux_loss"] = box_interior_loss_sum(box.patch_logits[has_box][seen], gt_boxes[seen]) / denom
    return losses


__all__ = [
    "box_losses",
    "box_dfl_loss_sum",
    "box_interior_loss_sum",
    "box_l1_loss_sum",
    "box_giou_loss_sum",
    "mask_dice_loss_sum",
    "mask_bce_loss_sum",
]

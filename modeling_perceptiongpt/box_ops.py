"""Box geometry as pure tensor functions. The format is in every name; boxes are (..., 4) tensors.

Adapted from DETR's util/box_ops.py (https://github.com/facebookresearch/detr/blob/main/util/box_ops.py).
"""

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_xyxy_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def generalized_box_xyxy_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7):
    """GIoU (Rezatofighi et al. 2019) of matched pairs, (N, 4) and (N, 4) xyxy -> (N,) in [-1, 1].

    `eps` keeps degenerate (zero-area) predicted boxes finite.
    """
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])  # (N, 2)
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])  # (N, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (N,)
    union = box_xyxy_area(boxes1) + box_xyxy_area(boxes2) - inter  # (N,)
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh.prod(-1)  # (N,)
    return inter / (union + eps) - (hull - union) / (hull + eps)


__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xyxy_area",
    "generalized_box_xyxy_iou",
]

import math

import torch

from perceptiongpt.box_ops import box_cxcywh_to_xyxy, box_xyxy_area, box_xyxy_to_cxcywh, generalized_box_xyxy_iou
from perceptiongpt.losses_perceptiongpt import (
    box_giou_loss_sum,
    box_l1_loss_sum,
    mask_bce_loss_sum,
    mask_dice_loss_sum,
)


def test_box_format_round_trip():
    torch.manual_seed(0)
    xy = torch.rand(1000, 2)
    boxes = torch.cat([xy, xy + torch.rand(1000, 2)], -1)
    assert (box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)) - boxes).abs().max() < 1e-6
    cxcywh = torch.rand(1000, 4)
    assert (box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)) - cxcywh).abs().max() < 1e-6


def test_area_clamps_inverted_boxes():
    assert box_xyxy_area(torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 0.0, 2.0]])).tolist() == [6.0, 0.0]


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    giou = generalized_box_xyxy_iou(a, b)
    overlap = 1 / 7 - (9 - 7) / 9  # inter 1, union 7, hull 9
    disjoint = 0 - (9 - 2) / 9  # inter 0, union 2, hull 9
    nested = 1 / 16  # inside: hull == union
    expected = torch.tensor([overlap, disjoint, nested, 1.0])
    assert torch.allclose(giou, expected, atol=1e-6)
    assert torch.allclose(box_giou_loss_sum(a, b), (1 - expected).sum(), atol=1e-6)


def test_giou_degenerate_prediction_is_finite():
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    loss = box_giou_loss_sum(pred, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(pred.grad).all()
    assert abs(loss.item() - 1.0) < 1e-5  # iou 0; hull == union == the target -> giou 0, loss 1


def test_l1_is_per_box_mean_summed():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    gt = torch.tensor([[0.1, 0.2, 0.9, 1.0], [0.5, 0.5, 0.5, 0.9]])
    assert abs(box_l1_loss_sum(pred, gt).item() - ((0.1 + 0.2 + 0.1 + 0) / 4 + 0.4 / 4)) < 1e-6


def test_dice_and_bce_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[-20.0, -20.0], [-20.0, -20.0]]])
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    # mask 0: p = 0.5 everywhere: inter 0.5, sum p 2, sum g 1 -> dice (1 + 1) / (3 + 1) = 0.5 -> loss 0.5
    # mask 1: empty target, ~empty prediction -> dice ~1 -> loss ~0
    dice = mask_dice_loss_sum(logits, target)
    assert abs(dice.item() - 0.5) < 1e-6
    bce = mask_bce_loss_sum(logits, target)
    assert abs(bce.item() - (math.log(2) + math.log1p(math.exp(-20)))) < 1e-6

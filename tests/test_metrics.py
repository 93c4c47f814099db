"""Grounding metrics: hand-computed values for the plain functions and the offline `evaluate` modules."""

import os

import numpy as np
import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import evaluate  # noqa: E402  (after the offline switches)

from perceptiongpt.processing.metrics import (  # noqa: E402
    METRIC_MODULES,
    box_iou_xyxy,
    module_path,
    multi_object_f1,
    rec_accuracy,
    res_iou,
)


UNIT_BOX = [0.0, 0.0, 1.0, 1.0]
HALF_IOU_BOX = [0.0, 0.0, 2.0, 1.0]  # IoU with UNIT_BOX is exactly 1 / 2


def _row_mask(width, start, stop):
    """A (1, width) bool mask with pixels [start, stop) on."""
    mask = np.zeros((1, width), dtype=bool)
    mask[0, start:stop] = True
    return mask


def test_box_iou_xyxy_pairwise_values():
    ious = box_iou_xyxy([[0, 0, 10, 10], [20, 20, 20, 30]], [[5, 0, 15, 10], [0, 0, 10, 10]])
    np.testing.assert_allclose(ious, [[50 / 150, 1.0], [0.0, 0.0]])


@pytest.mark.parametrize("strict_greater, expected_hit", [(False, 1.0), (True, 0.0)])
def test_rec_accuracy_iou_exactly_half(strict_greater, expected_hit):
    result = rec_accuracy([HALF_IOU_BOX], [UNIT_BOX], strict_greater=strict_greater)
    assert result == {"acc@0.5": expected_hit, "acc@0.75": 0.0, "miou": 0.5, "n": 1}


def test_rec_accuracy_mixed_batch_with_none():
    predictions = [UNIT_BOX, None, [5.0, 0.0, 15.0, 10.0], HALF_IOU_BOX]
    references = [UNIT_BOX, UNIT_BOX, [0.0, 0.0, 10.0, 10.0], UNIT_BOX]
    result = rec_accuracy(predictions, references)
    assert result["acc@0.5"] == 0.5
    assert result["acc@0.75"] == 0.25
    assert result["miou"] == pytest.approx((1.0 + 0.0 + 1 / 3 + 0.5) / 4)
    assert result["n"] == 4


def test_rec_accuracy_empty_and_degenerate_prediction():
    assert rec_accuracy([], []) == {"acc@0.5": 0.0, "acc@0.75": 0.0, "miou": 0.0, "n": 0}
    assert rec_accuracy([[3.0, 3.0, 1.0, 1.0]], [UNIT_BOX])["miou"] == 0.0


@pytest.mark.parametrize(
    "predictions, references, error, pattern",
    [
        ([UNIT_BOX], [UNIT_BOX, UNIT_BOX], ValueError, r"same length, got 1 and 2"),
        ([[0.0, 0.0, 1.0]], [UNIT_BOX], ValueError, r"`predictions\[0\]` must be .* shape \(4,\), got shape \(3,\)"),
        ([[0.0, float("nan"), 1.0, 1.0]], [UNIT_BOX], ValueError, r"`predictions\[0\]` must hold finite numbers"),
        ([UNIT_BOX], [[2.0, 0.0, 1.0, 1.0]], ValueError, r"`references\[0\]` must satisfy x1 <= x2"),
    ],
)
def test_rec_accuracy_validation(predictions, references, error, pattern):
    with pytest.raises(error, match=pattern):
        rec_accuracy(predictions, references)


def test_res_iou_hand_computed_ciou_and_giou():
    # Sample 1: 10 px intersection / 20 px union; sample 2: 90 / 100.
    predictions = [_row_mask(100, 0, 15), _row_mask(100, 0, 95)]
    references = [_row_mask(100, 5, 20), _row_mask(100, 5, 100)]
    result = res_iou(predictions, references)
    assert result["giou"] == pytest.approx((0.5 + 0.9) / 2)
    assert result["ciou"] == pytest.approx(100 / 120)
    assert result["n"] == 2


def test_res_iou_empty_masks_and_none():
    empty = np.zeros((2, 3), dtype=bool)
    full = np.ones((2, 3), dtype=bool)
    # Empty prediction and empty ground truth: IoU 1 in gIoU, nothing added to cIoU.
    assert res_iou([empty], [empty]) == {"ciou": 0.0, "giou": 1.0, "n": 1}
    # Empty prediction against a non-empty ground truth: IoU 0, union 6.
    assert res_iou([empty, full], [full, full]) == {"ciou": 6 / 12, "giou": 0.5, "n": 2}
    # None counts as IoU 0 with union = ground-truth area, even for an empty ground truth.
    assert res_iou([None, full], [full, full]) == {"ciou": 6 / 12, "giou": 0.5, "n": 2}
    assert res_iou([None], [empty]) == {"ciou": 0.0, "giou": 0.0, "n": 1}
    assert res_iou(np.zeros((0, 2, 2), bool), []) == {"ciou": 0.0, "giou": 0.0, "n": 0}


def test_res_iou_accepts_integer_masks():
    assert res_iou([np.array([[1, 0]], dtype=np.uint8)], [np.array([[1, 1]])])["ciou"] == 0.5


@pytest.mark.parametrize(
    "prediction, reference, error, pattern",
    [
        (np.zeros((2, 3), bool), np.zeros((3, 2), bool), ValueError, r"`references\[0\]` \(3, 2\), got \(2, 3\)"),
        (np.zeros((2, 3), np.float32), np.zeros((2, 3), bool), TypeError, r"bool or integer mask, got dtype float32"),
        (np.zeros((2, 3), bool), np.zeros((1, 2, 3), bool), ValueError, r"`references\[0\]` must be a mask of shape"),
    ],
)
def test_res_iou_validation(prediction, reference, error, pattern):
    with pytest.raises(error, match=pattern):
        res_iou([prediction], [reference])


def test_multi_object_f1_micro_average():
    predictions = [
        [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]],  # a duplicate: 2 true positives of 3
        None,  # nothing predicted for one ground-truth box
        [[0, 0, 4, 4]],  # a false positive on an image without objects
    ]
    references = [[[20, 20, 30, 30], [0, 0, 10, 10]], [[0, 0, 5, 5]], []]
    result = multi_object_f1(predictions, references)
    assert result["precision"] == pytest.approx(2 / 4)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert result["n"] == 3


def test_multi_object_f1_matching_maximizes_hits():
    # IoUs: p0-r0 = 1, p0-r1 = 1/3, p1-r0 = 1/3, p1-r1 = 0. At iou=0.3 the largest IoU sum (p0-r0) gives one
    # hit; the count-maximizing matching (p0-r1, p1-r0) gives two.
    predictions = [[[5, 0, 15, 10], [0, 0, 10, 10]]]
    references = [[[5, 0, 15, 10], [10, 0, 20, 10]]]
    assert multi_object_f1(predictions, references, iou=0.3)["f1"] == 1.0
    assert multi_object_f1(predictions, references, iou=0.5)["f1"] == 0.5


def test_multi_object_f1_validation_and_empty():
    assert multi_object_f1([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 1}
    with pytest.raises(ValueError, match=r"`iou` must be a number in \[0, 1\], got 1.5"):
        multi_object_f1([], [], iou=1.5)
    with pytest.raises(ValueError, match=r"`predictions\[0\]\[1\]` must be an xyxy box"):
        multi_object_f1([[UNIT_BOX, [1, 2]]], [[UNIT_BOX]])


def test_module_path_unknown_name():
    with pytest.raises(ValueError, match=r"`name` must be one of .*got 'bleu'"):
        module_path("bleu")


def _load(name):
    return evaluate.load(module_path(name), keep_in_memory=True)


def test_evaluate_rec_accuracy_add_batch_matches_single_call():
    predictions = [HALF_IOU_BOX, None, UNIT_BOX]
    references = [UNIT_BOX, UNIT_BOX, UNIT_BOX]
    metric = _load("rec_accuracy")
    metric.add_batch(predictions=predictions[:2], references=references[:2])
    metric.add_batch(predictions=predictions[2:], references=references[2:])
    assert metric.compute(strict_greater=True) == rec_accuracy(predictions, references, strict_greater=True)
    assert _load("rec_accuracy").compute(predictions=predictions, references=references)["acc@0.5"] == 2 / 3


def test_evaluate_res_iou_add_batch_with_none():
    predictions = [_row_mask(100, 0, 15), None, np.zeros((1, 100), bool)]
    references = [_row_mask(100, 5, 20), _row_mask(100, 0, 10), np.zeros((1, 100), bool)]
    metric = _load("res_iou")
    metric.add_batch(predictions=predictions[:1], references=references[:1])
    metric.add_batch(predictions=predictions[1:], references=references[1:])
    assert metric.compute() == {"ciou": 10 / 30, "giou": pytest.approx(1.5 / 3), "n": 3}


def test_evaluate_multi_object_f1_matches_plain_function():
    predictions = [[[0, 0, 10, 10], [20, 20, 30, 30]], None]
    references = [[[0, 0, 10, 10]], [[0, 0, 5, 5]]]
    metric = _load("multi_object_f1")
    for prediction, reference in zip(predictions, references):
        metric.add_batch(predictions=[prediction], references=[reference])
    assert (
        metric.compute(iou=0.5)
        == multi_object_f1(predictions, references)
        == {
            "precision": 0.5,
            "recall": 0.5,
            "f1": 0.5,
            "n": 2,
        }
    )


def test_every_metric_module_ships():
    assert all(os.path.isfile(os.path.join(module_path(name), f"{name}.py")) for name in METRIC_MODULES)

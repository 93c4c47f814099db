"""Grounding metrics as plain functions, plus `evaluate` module scripts shipped as package data.

Protocols (DESIGN.md, "Evaluation"); every box is pixel xyxy on the original image, every mask bool (H, W):
- `rec_accuracy`: IoU of one predicted box per expression against its ground truth. A missing prediction
  (None) is wrong with IoU 0. `strict_greater=True` gives the Shikra-family "IoU > t" instead of "IoU >= t".
- `res_iou`: cIoU = sum(intersection) / sum(union) (0 when the total union is 0); gIoU = mean per-sample IoU,
  where an empty union (empty prediction and empty ground truth) counts as 1. A missing prediction counts as
  IoU 0 and, in cIoU, as an empty mask: intersection 0 and union = ground-truth area.
- `multi_object_f1`: per sample, a Hungarian matching between predicted and ground-truth boxes that maximizes
  the number of pairs with IoU >= `iou`; true positives, predictions and ground truths are then summed over
  all samples (micro-average) before precision, recall and F1 are formed. 0/0 gives 0.
- `region_description_accuracy` (REG): a generated description is right when, for every attribute kind its reference
  names (size, colour, shape), it names exactly the reference's word of that kind.

With no samples every score is 0.0 and "n" is 0, so that an evaluation split without a task still reports.
"""

import os
import re

import numpy as np
from scipy.optimize import linear_sum_assignment


METRIC_MODULES = ("rec_accuracy", "res_iou", "multi_object_f1")


def module_path(name):
    """Path of the `evaluate` module script for `name`, usable offline as `evaluate.load(module_path(name))`."""
    if name not in METRIC_MODULES:
        raise ValueError(f"`name` must be one of {METRIC_MODULES}, got {name!r}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_modules", name)


def _check_lengths(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` and `references` must have the same length, got {len(predictions)} and {len(references)}"
        )


def _as_box_xyxy(box, arg, index):
    """Validates one pixel xyxy box and returns it as a float64 array of shape (4,)."""
    array = np.asarray(box, dtype=np.float64)
    if array.shape != (4,):
        raise ValueError(f"`{arg}[{index}]` must be an xyxy box of shape (4,), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"`{arg}[{index}]` must hold finite numbers, got {array.tolist()}")
    return array


def _as_reference_box_xyxy(box, arg, index):
    # Predicted boxes may be degenerate (DESIGN.md, "Heads"); ground truth must not be.
    array = _as_box_xyxy(box, arg, index)
    if array[2] < array[0] or array[3] < array[1]:
        raise ValueError(f"`{arg}[{index}]` must satisfy x1 <= x2 and y1 <= y2, got {array.tolist()}")
    return array


def box_iou_xyxy(boxes_a_xyxy, boxes_b_xyxy):
    """Pairwise IoU of pixel xyxy boxes (N, 4) x (M, 4) -> (N, M); degenerate boxes have area 0, and an empty
    union gives IoU 0."""
    a = np.asarray(boxes_a_xyxy, dtype=np.float64).reshape(-1, 4)  # (N, 4)
    b = np.asarray(boxes_b_xyxy, dtype=np.float64).reshape(-1, 4)  # (M, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    intersection = width * height  # (N, M)
    union = area_a[:, None] + area_b[None, :] - intersection  # (N, M)
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def rec_accuracy(predictions, references, strict_greater=False):
    """REC accuracy at IoU 0.5 and 0.75 and mean IoU.

    Args:
        predictions: one pixel xyxy box (4 numbers) or None per expression.
        references: one ground-truth pixel xyxy box per expression.
        strict_greater: count a hit at IoU > t (the Shikra-family papers) instead of IoU >= t.

    Returns:
        {"acc@0.5", "acc@0.75", "miou", "n"}.
    """
    _check_lengths(predictions, references)
    ious = []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        reference_xyxy = _as_reference_box_xyxy(reference, "references", index)
        if prediction is None:
            ious.append(0.0)
            continue
        prediction_xyxy = _as_box_xyxy(prediction, "predictions", index)
        ious.append(float(box_iou_xyxy(prediction_xyxy, reference_xyxy)[0, 0]))
    if not ious:
        return {"acc@0.5": 0.0, "acc@0.75": 0.0, "miou": 0.0, "n": 0}
    ious = np.asarray(ious, dtype=np.float64)
    return {
        "acc@0.5": _hit_rate(ious, 0.5, strict_greater),
        "acc@0.75": _hit_rate(ious, 0.75, strict_greater),
        "miou": float(ious.mean()),
        "n": len(ious),
    }


def _hit_rate(ious, threshold, strict_greater):
    return float(np.mean(ious > threshold if strict_greater else ious >= threshold))


def _as_bool_mask(mask, arg, index):
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"`{arg}[{index}]` must be a mask of shape (H, W), got shape {array.shape}")
    # Float masks are refused: thresholding logits or probabilities is the caller's decision.
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"`{arg}[{index}]` must be a bool or integer mask, got dtype {array.dtype}")
    return array != 0


def res_iou(predictions, references):
    """RES cIoU and gIoU over bool (H, W) masks; a prediction may be None (see the module docstring).

    Returns:
        {"ciou", "giou", "n"}.
    """
    _check_lengths(predictions, references)
    intersections, unions, ious = [], [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        reference_mask = _as_bool_mask(reference, "references", index)
        if prediction is None:
            intersection, union = 0, int(reference_mask.sum())
            ious.append(0.0)
        else:
            prediction_mask = _as_bool_mask(prediction, "predictions", index)
            if prediction_mask.shape != reference_mask.shape:
                raise ValueError(
                    f"`predictions[{index}]` must have the shape of `references[{index}]` "
                    f"{reference_mask.shape}, got {prediction_mask.shape}"
                )
            intersection = int(np.logical_and(prediction_mask, reference_mask).sum())
            union = int(np.logical_or(prediction_mask, reference_mask).sum())
            ious.append(intersection / union if union > 0 else 1.0)
        intersections.append(intersection)
        unions.append(union)
    total_union = sum(unions)
    return {
        "ciou": sum(intersections) / total_union if total_union > 0 else 0.0,
        "giou": float(np.mean(ious)) if ious else 0.0,
        "n": len(ious),
    }


def _as_sample_boxes_xyxy(boxes, arg, index, validate):
    """One sample's boxes (a list of xyxy boxes, or None for none) -> float64 array (K, 4)."""
    if boxes is None:
        return np.zeros((0, 4))
    return np.array([validate(box, f"{arg}[{index}]", k) for k, box in enumerate(boxes)]).reshape(-1, 4)


def _divide(numerator, denominator):
    return numerator / denominator if denominator > 0 else 0.0


def multi_object_f1(predictions, references, iou=0.5):
    """Multi-object precision, recall and F1 at IoU >= `iou` after Hungarian matching, micro-averaged.

    Args:
        predictions: per sample, a list of pixel xyxy boxes (or None: no prediction).
        references: per sample, a list of ground-truth pixel xyxy boxes.
        iou: the IoU a matched pair needs to count as a true positive.

    Returns:
        {"precision", "recall", "f1", "n"}; n is the number of samples.
    """
    if not (isinstance(iou, (int, float)) and 0.0 <= iou <= 1.0):
        raise ValueError(f"`iou` must be a number in [0, 1], got {iou!r}")
    _check_lengths(predictions, references)
    true_positives = num_predicted = num_reference = 0
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        predicted_xyxy = _as_sample_boxes_xyxy(prediction, "predictions", index, _as_box_xyxy)  # (P, 4)
        reference_xyxy = _as_sample_boxes_xyxy(reference, "references", index, _as_reference_box_xyxy)  # (R, 4)
        num_predicted += len(predicted_xyxy)
        num_reference += len(reference_xyxy)
        if len(predicted_xyxy) and len(reference_xyxy):
            # Matching on the hit indicator maximizes the number of true positives, hence F1.
            hits = box_iou_xyxy(predicted_xyxy, reference_xyxy) >= iou  # (P, R)
            rows, cols = linear_sum_assignment(hits, maximize=True)
            true_positives += int(hits[rows, cols].sum())
    precision = _divide(true_positives, num_predicted)
    recall = _divide(true_positives, num_reference)
    f1 = _divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "n": len(predictions)}


def _words(text, arg, index):
    if not isinstance(text, str):
        raise TypeError(f"`{arg}[{index}]` must be a string, got {type(text).__name__}.")
    return set(re.findall(r"[a-z]+", text.lower()))


def region_description_accuracy(predictions, references, vocabulary):
    """REG: does each generated description name its target's attributes?

    Args:
        predictions: per sample, the generated text.
        references: per sample, the reference description (e.g. "the small red circle").
        vocabulary: attribute kind -> its words (e.g. {"size": ("small", "large"), "colour": ..., "shape": ...}).

    An attribute kind that the reference names is right when the prediction names exactly the reference's word of
    that kind (a missing word, or a second word of that kind, is wrong). Returns {"acc": all of a sample's attributes
    right, "attr_acc": the mean over (sample, attribute) pairs, "n"}.
    """
    _check_lengths(predictions, references)
    if not isinstance(vocabulary, dict) or not vocabulary:
        raise TypeError(f"`vocabulary` must be a non-empty dict of kind -> words, got {vocabulary!r}.")
    kinds = {kind: set(words) for kind, words in vocabulary.items()}
    all_right = attribute_hits = attributes = 0
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        predicted, wanted = _words(prediction, "predictions", index), _words(reference, "references", index)
        hits = [predicted & words == wanted & words for words in kinds.values() if wanted & words]
        all_right += bool(hits) and all(hits)
        attribute_hits += sum(hits)
        attributes += len(hits)
    return {"acc": _divide(all_right, len(predictions)), "attr_acc": _divide(attribute_hits, attributes),
            "n": len(predictions)}  # fmt: skip


__all__ = [
    "METRIC_MODULES",
    "box_iou_xyxy",
    "module_path",
    "multi_object_f1",
    "rec_accuracy",
    "region_description_accuracy",
    "res_iou",
]

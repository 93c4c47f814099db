"""Generation-based evaluation (never teacher-forced) with DESIGN.md's protocols, for every task.

REC: the first generated `<vis>` box against the first answer box, in original-image pixels; no `<vis>` = wrong.
RES: the first generated `<vis>` mask against the first answer mask, at the original size; no `<vis>` = IoU 0.
REG: the generated text against the reference description, attribute by attribute (`reg` for a box prompt,
`reg_mask` for a mask prompt). Multi: every generated box against every answer box (Hungarian, IoU >= 0.5).
"""

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT, decode_rle
from perceptiongpt.processing.metrics import multi_object_f1, rec_accuracy, region_description_accuracy, res_iou
from perceptiongpt.processing.synthetic import SyntheticConfig
from perceptiongpt.processing.text_coordinates import COORDINATE_FORMATS, text_boxes_to_pixel


@dataclass
class GroundingEvaluation:
    """`metrics`: rec_acc@0.5, rec_acc@0.75, rec_miou, res_ciou, res_giou, reg_acc, reg_attr_acc, reg_mask_acc,
    reg_mask_attr_acc, multi_f1, multi_precision, multi_recall, multi_pred_count, multi_true_count, n_eval_<task>
    (the keys of the tasks present).
    `predictions`: per evaluated row, the post-processed generation (text, pixel boxes, scores, masks).
    `scored`: per evaluated row, what its metric reads: {"task", "pred", "ref"} (pixel box, (H, W) mask, text, or list
    of boxes; pred None when nothing was generated); `grounding_metrics(scored)` gives `metrics` again, e.g. after
    gathering processes."""

    metrics: dict
    predictions: list = field(default_factory=list)
    scored: list = field(default_factory=list)


SCORED_TASKS = ("rec", "res", "reg", "multi")
# REG descriptions are scored on the synthetic set's attribute words
VOCABULARY = SyntheticConfig(sizes=SyntheticConfig().sizes + SyntheticConfig.demo().sizes).attribute_vocabulary()


REC_PROTOCOLS = ("standard", "strict")


def grounding_metrics(scored, vocabulary=None, rec_protocol: str = "standard") -> dict:
    """The metrics of per-row `scored` records (see `GroundingEvaluation`), for the tasks present. `rec_protocol`
    "strict" counts a hit at IoU > t (the papers' variant; "standard": IoU >= t)."""
    if rec_protocol not in REC_PROTOCOLS:
        raise ValueError(f"`rec_protocol` must be one of {REC_PROTOCOLS}, got {rec_protocol!r}.")
    by_task = {task: [r for r in scored if r["task"] == task] for task in ("rec", "res", "reg", "reg_mask", "multi")}
    rec, res = by_task["rec"], by_task["res"]
    metrics = {"n_eval_rec": len(rec), "n_eval_res": len(res)}
    metrics.update({f"n_eval_{task}": len(by_task[task]) for task in ("reg", "reg_mask", "multi") if by_task[task]})
    for task in ("reg", "reg_mask"):
        if by_task[task]:
            texts = [r["pred"] or "" for r in by_task[task]]
            acc = region_description_accuracy(texts, [r["ref"] for r in by_task[task]], vocabulary or VOCABULARY)
            metrics.update({f"{task}_acc": acc["acc"], f"{task}_attr_acc": acc["attr_acc"]})
    if by_task["multi"]:
        multi = by_task["multi"]
        f1 = multi_object_f1([r["pred"] for r in multi], [r["ref"] for r in multi])
        metrics.update({f"multi_{key}": f1[key] for key in ("f1", "precision", "recall")})
        metrics["multi_pred_count"] = sum(len(r["pred"] or []) for r in multi) / len(multi)
        metrics["multi_true_count"] = sum(len(r["ref"]) for r in multi) / len(multi)
    if rec:
        acc = rec_accuracy([r["pred"] for r in rec], [r["ref"] for r in rec], strict_greater=rec_protocol == "strict")
        metrics.update({"rec_acc@0.5": acc["acc@0.5"], "rec_acc@0.75": acc["acc@0.75"], "rec_miou": acc["miou"]})
    if res:
        iou = res_iou([r["pred"] for r in res], [r["ref"] for r in res])
        metrics.update({"res_ciou": iou["ciou"], "res_giou": iou["giou"]})
    return metrics


def shuffle_expressions(rows, seed: int = 0) -> list[dict]:
    """The text-blind control: every row keeps its image and targets but takes another row's messages.

    Rows are permuted within groups of the same task and `<vis>` count, so the prompts stay well formed.
    """
    rows = [dict(row) for row in rows]
    groups = {}
    for index, row in enumerate(rows):
        n_vis = sum(m["content"].count("<vis>") for m in row["messages"])
        groups.setdefault((row["task"], n_vis), []).append(index)
    rng = random.Random(seed)
    messages = {i: rows[i]["messages"] for i in range(len(rows))}
    for members in groups.values():
        rng.shuffle(members)  # a random cycle: no row keeps its own messages when its group has two or more
        for source, target in zip(members, members[1:] + members[:1]):
            rows[target]["messages"] = messages[source]
    return rows


def swap_regions(rows, seed: int = 0) -> list[dict]:
    """The region-blind control: every REG row's prompt region (its box, and its mask for a mask prompt) becomes
    another object's region of the same image (`other_regions`); the reference answer stays the original's."""
    rng = random.Random(seed)
    swapped = []
    for index, row in enumerate(rows):
        row = dict(row)
        if row["task"] == "reg":
            if not row.get("other_regions"):
                raise ValueError(f"`rows[{index}]` is a REG row without `other_regions` to swap its region for.")
            other = rng.choice(row["other_regions"])
            row["boxes"] = [list(other["box"]), *row["boxes"][1:]]
            if row["masks"] and row["masks"][0] is not None:
                row["masks"] = [other["mask"], *row["masks"][1:]]
        swapped.append(row)
    return swapped


def _prompt(collator, row, index):
    """The conversation before the last assistant answer, and the number of `<vis>` it holds."""
    conversation = collator.conversation(row, index)
    last_answer = max(i for i, message in enumerate(conversation) if message["role"] == "assistant")
    prompt = conversation[:last_answer]
    n_prompt_vis = sum(m["content"].count(collator.processor.vis_token) for m in row["messages"][:last_answer])
    return prompt, n_prompt_vis


@torch.no_grad()
def evaluate_grounding(
    model,
    processor,
    rows,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    image_position: str | None = None,
    progress: bool = False,
    coordinate_format: str = "vis",
    rec_protocol: str = "standard",
) -> GroundingEvaluation:
    """Generate on `rows` (DESIGN.md's schema; tasks rec, res, reg and multi are scored) and compute the metrics.

    With `coordinate_format="text"` (the text-coordinate baseline) boxes are parsed from the generated text, an
    unparseable answer counts as wrong, and only REC is scored (text carries no mask). `image_position` None takes
    the processor's prompt layout. `rec_protocol="strict"`: the papers' REC variant, IoU > 0.5 on boxes as predicted
    (not clipped to the image).
    """
    if rec_protocol not in REC_PROTOCOLS:
        raise ValueError(f"`rec_protocol` must be one of {REC_PROTOCOLS}, got {rec_protocol!r}.")
    if coordinate_format not in COORDINATE_FORMATS:
        raise ValueError(f"`coordinate_format` must be one of {COORDINATE_FORMATS}, got {coordinate_format!r}.")
    collator = DataCollatorForPerceptionGPT(processor, image_position=image_position)
    tasks = SCORED_TASKS if coordinate_format == "vis" else ("rec",)
    rows = [row for row in rows if row["task"] in tasks]
    scored, predictions = [], []
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", disable=not progress):
            batch = rows[start : start + batch_size]
            prompts, boxes, masks, targets = [], [], [], []
            for offset, row in enumerate(batch):
                prompt, n_prompt = _prompt(collator, row, start + offset)
                prompts.append(prompt)
                boxes.append(list(row["boxes"][:n_prompt]))
                rles = (row.get("masks") or [None] * n_prompt)[:n_prompt]  # a mask prompt's region
                masks.append([None if rle is None else decode_rle(rle, "masks") for rle in rles])
                targets.append(n_prompt)
            with_masks = any(mask is not None for sample in masks for mask in sample)
            inputs = processor.apply_chat_template(
                prompts,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"boxes": boxes, "masks": masks if with_masks else None},
            ).to(device)
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
            )
            sizes = [(row["image"].height, row["image"].width) for row in batch]
            results = processor.post_process_generation(
                out, sizes, prompt_length=inputs["input_ids"].shape[1], clip_boxes=rec_protocol == "standard"
            )
            for row, result, target, size in zip(batch, results, targets, sizes):
                if coordinate_format == "text":
                    result["boxes"] = text_boxes_to_pixel(result["text"], processor, size)
                predictions.append(result)
                scored.append(_scored(row, result, target))
    finally:
        tokenizer.padding_side = padding_side
    metrics = grounding_metrics(scored, rec_protocol=rec_protocol)
    return GroundingEvaluation(metrics=metrics, predictions=predictions, scored=scored)


def _scored(row, result, target) -> dict:
    """What the row's metric reads: its task (REG split by prompt kind), the prediction and the reference."""
    found = len(result["boxes"]) > 0
    task = row["task"]
    if task == "rec":
        return {
            "task": task,
            "pred": result["boxes"][0].tolist() if found else None,
            "ref": list(row["boxes"][target]),
        }
    if task == "res":
        has_mask = found and result["masks"] is not None
        pred = result["masks"][0].numpy() if has_mask else None
        return {"task": task, "pred": pred, "ref": decode_rle(row["masks"][target], "masks")}
    if task == "multi":
        return {"task": task, "pred": result["boxes"].tolist(), "ref": [list(box) for box in row["boxes"][target:]]}
    prompt_mask = bool(row.get("masks")) and row["masks"][0] is not None
    answer = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
    return {"task": "reg_mask" if prompt_mask else "reg", "pred": result["text"], "ref": answer}


__all__ = [
    "GroundingEvaluation",
    "REC_PROTOCOLS",
    "SCORED_TASKS",
    "evaluate_grounding",
    "grounding_metrics",
    "shuffle_expressions",
    "swap_regions",
]

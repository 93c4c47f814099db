"""Generation-based evaluation (never teacher-forced) with DESIGN.md's REC and RES protocols.

REC: the first generated `<vis>` box against the first answer box, in original-image pixels; no `<vis>` = wrong.
RES: the first generated `<vis>` mask against the first answer mask, at the original size; no `<vis>` = IoU 0.
"""

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT, decode_rle
from perceptiongpt.processing.metrics import rec_accuracy, res_iou
from perceptiongpt.processing.text_coordinates import COORDINATE_FORMATS, text_boxes_to_pixel


@dataclass
class GroundingEvaluation:
    """`metrics`: rec_acc@0.5, rec_acc@0.75, rec_miou, res_ciou, res_giou, n_eval_rec, n_eval_res.
    `predictions`: per evaluated row, the post-processed generation (text, pixel boxes, scores, masks).
    `scored`: per evaluated row, what its metric reads: {"task", "pred", "ref"} (pixel box or (H, W) mask, pred None
    when nothing was generated); `grounding_metrics(scored)` gives `metrics` again, e.g. after gathering processes."""

    metrics: dict
    predictions: list = field(default_factory=list)
    scored: list = field(default_factory=list)


def grounding_metrics(scored) -> dict:
    """REC and RES metrics of per-row `scored` records (see `GroundingEvaluation`)."""
    rec = [record for record in scored if record["task"] == "rec"]
    res = [record for record in scored if record["task"] == "res"]
    metrics = {"n_eval_rec": len(rec), "n_eval_res": len(res)}
    if rec:
        acc = rec_accuracy([r["pred"] for r in rec], [r["ref"] for r in rec])
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
) -> GroundingEvaluation:
    """Generate on `rows` (DESIGN.md's schema; tasks "rec" and "res" are scored) and compute the metrics.

    With `coordinate_format="text"` (the text-coordinate baseline) boxes are parsed from the generated text, an
    unparseable answer counts as wrong, and only REC is scored (text carries no mask). `image_position` None takes
    the processor's prompt layout.
    """
    if coordinate_format not in COORDINATE_FORMATS:
        raise ValueError(f"`coordinate_format` must be one of {COORDINATE_FORMATS}, got {coordinate_format!r}.")
    collator = DataCollatorForPerceptionGPT(processor, image_position=image_position)
    tasks = ("rec", "res") if coordinate_format == "vis" else ("rec",)
    rows = [row for row in rows if row["task"] in tasks]
    scored, predictions = [], []
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", disable=not progress):
            batch = rows[start : start + batch_size]
            prompts, boxes, targets = [], [], []
            for offset, row in enumerate(batch):
                prompt, n_prompt = _prompt(collator, row, start + offset)
                prompts.append(prompt)
                boxes.append(list(row["boxes"][:n_prompt]))
                targets.append(n_prompt)
            inputs = processor.apply_chat_template(
                prompts,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"boxes": boxes},
            ).to(device)
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
            )
            sizes = [(row["image"].height, row["image"].width) for row in batch]
            results = processor.post_process_generation(out, sizes, prompt_length=inputs["input_ids"].shape[1])
            for row, result, target, size in zip(batch, results, targets, sizes):
                if coordinate_format == "text":
                    result["boxes"] = text_boxes_to_pixel(result["text"], processor, size)
                predictions.append(result)
                found = len(result["boxes"]) > 0
                if row["task"] == "rec":
                    pred, ref = (result["boxes"][0].tolist() if found else None), list(row["boxes"][target])
                else:
                    has_mask = found and result["masks"] is not None
                    pred = result["masks"][0].numpy() if has_mask else None
                    ref = decode_rle(row["masks"][target], "masks")
                scored.append({"task": row["task"], "pred": pred, "ref": ref})
    finally:
        tokenizer.padding_side = padding_side
    return GroundingEvaluation(metrics=grounding_metrics(scored), predictions=predictions, scored=scored)


__all__ = ["GroundingEvaluation", "evaluate_grounding", "grounding_metrics", "shuffle_expressions"]

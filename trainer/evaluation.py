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
    `predictions`: per evaluated row, the post-processed generation (text, pixel boxes, scores, masks)."""

    metrics: dict
    predictions: list = field(default_factory=list)


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
    box_preds, box_refs, mask_preds, mask_refs, predictions = [], [], [], [], []
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
                    box_preds.append(result["boxes"][0].tolist() if found else None)
                    box_refs.append(list(row["boxes"][target]))
                else:
                    has_mask = found and result["masks"] is not None
                    mask_preds.append(result["masks"][0].numpy() if has_mask else None)
                    mask_refs.append(decode_rle(row["masks"][target], "masks"))
    finally:
        tokenizer.padding_side = padding_side
    metrics = {"n_eval_rec": len(box_refs), "n_eval_res": len(mask_refs)}
    if box_refs:
        rec = rec_accuracy(box_preds, box_refs)
        metrics.update({"rec_acc@0.5": rec["acc@0.5"], "rec_acc@0.75": rec["acc@0.75"], "rec_miou": rec["miou"]})
    if mask_refs:
        res = res_iou(mask_preds, mask_refs)
        metrics.update({"res_ciou": res["ciou"], "res_giou": res["giou"]})
    return GroundingEvaluation(metrics=metrics, predictions=predictions)


__all__ = ["GroundingEvaluation", "evaluate_grounding", "shuffle_expressions"]

"""The CPU demo recipe: train the `demo` preset FROM SCRATCH on synthetic REC+RES data and evaluate by generation.

    python benchmarks/demo_recipe.py --steps N

Steps:
1. Data (not timed as training): synthetic REC+RES train rows (`SyntheticConfig.demo()`), a BPE tokenizer trained
   in-process on the templates and the train expressions, and a fixed training set pre-encoded ONCE with
   `DataCollatorForPerceptionGPT` (question before the image), padded into tensors.
2. Training (timed, budget 600 s on 2 CPU cores): a plain AdamW loop with linear warm-up then cosine decay to a floor
   (Trainer: `lr_scheduler_type="cosine_with_min_lr"`), weight decay, gradient clipping; every hyper-parameter
   maps onto a TrainingArguments field.
3. Evaluation by generation (never teacher-forced) on held-out test rows: REC acc@0.5 (first generated `<vis>` box vs
   the GT box, no `<vis>` = wrong), RES gIoU (first generated mask vs the GT mask), and the text-blind control (REC
   with expressions shuffled across images, scored against each image's own target).

Prints and writes the JSON to benchmarks/results/demo_recipe.json (or --out).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # training
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)  # 1e-3 never left the mean box
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.5, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    # loss weights
    p.add_argument("--lm-weight", type=float, default=1.0)
    p.add_argument("--l1-weight", type=float, default=5.0)
    p.add_argument("--giou-weight", type=float, default=2.0)
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--bce-weight", type=float, default=1.0)
    # model (overrides of the demo preset; None keeps the preset's value)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--vision-hidden", type=int, default=None)
    p.add_argument("--vision-layers", type=int, default=None)
    p.add_argument("--text-hidden", type=int, default=None)
    p.add_argument("--text-layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--mask-size", type=int, default=None)
    p.add_argument("--fuse-llm-features", type=int, default=None)
    p.add_argument("--region-mode", default=None, choices=[None, "replace", "add"])
    # data
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--vocab-size", type=int, default=400)
    p.add_argument("--image-position", default="after_text", choices=["first", "after_text"])
    p.add_argument("--rec-masks", type=int, default=1, help="1: REC train rows also carry their target's mask")
    p.add_argument(
        "--curriculum-steps",
        type=int,
        default=0,
        help="first N steps draw from easy scenes (--easy-objects objects) before the demo scenes",
    )
    p.add_argument("--easy-objects", type=int, default=1)
    p.add_argument("--easy-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=200, help="held-out REC rows and RES rows (each)")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "perceptiongpt_demo_recipe_cache"))
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "demo_recipe.json")
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=250)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------- model
def model_config(args, vocab_size):
    from perceptiongpt import PerceptionGPTConfig

    base = PerceptionGPTConfig.from_preset("demo", text_config={"vocab_size": vocab_size})
    vision, text, mask = {}, {"vocab_size": vocab_size}, {}
    if args.image_size is not None:
        vision["image_size"] = args.image_size
    if args.patch_size is not None:
        vision["patch_size"] = args.patch_size
    if args.vision_hidden is not None:
        vision.update(
            hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden, projection_dim=args.vision_hidden
        )
    if args.vision_layers is not None:
        vision["num_hidden_layers"] = args.vision_layers
    if args.text_hidden is not None:
        text.update(hidden_size=args.text_hidden, intermediate_size=2 * args.text_hidden)
    if args.text_layers is not None:
        text["num_hidden_layers"] = args.text_layers
    if args.heads is not None:
        vision["num_attention_heads"] = args.heads
        text.update(num_attention_heads=args.heads, num_key_value_heads=args.heads)
    if args.mask_size is not None:
        mask["mask_size"] = args.mask_size
    overrides = {
        "text_config": text,
        "lm_loss_weight": args.lm_weight,
        "box_l1_weight": args.l1_weight,
        "box_giou_weight": args.giou_weight,
        "mask_dice_weight": args.dice_weight,
        "mask_bce_weight": args.bce_weight,
    }
    if vision:
        overrides["vision_config"] = vision
        image_size = vision.get("image_size", base.vision_config.image_size)
        patch_size = vision.get("patch_size", base.vision_config.patch_size)
        grid = image_size // patch_size
        overrides["image_seq_length"] = grid * grid
        if "num_hidden_layers" in vision:
            overrides["vision_fusion_layers"] = None
    if mask:
        overrides["mask_head_config"] = mask
    if args.fuse_llm_features is not None:
        overrides["fuse_llm_features"] = bool(args.fuse_llm_features)
    if args.region_mode is not None:
        overrides["region_embedding_mode"] = args.region_mode
    return PerceptionGPTConfig.from_preset("demo", **overrides)


# ------------------------------------------------------------------------------------------------------------ data
def synthetic_rows(task, split, n, seed=0, start=0, max_objects=None, rec_masks=False):
    from perceptiongpt.processing.synthetic import SyntheticConfig, generate_synthetic_samples

    config = dataclasses.replace(SyntheticConfig.demo(), tasks=(task,), rec_masks=rec_masks)
    if max_objects is not None:  # curriculum: easier scenes
        config = dataclasses.replace(config, min_objects=1, max_objects=max_objects)
    return list(generate_synthetic_samples(config, split, n, seed=seed, start=start))


def easy_rows(args):
    """Curriculum rows: REC and RES (both with masks) on scenes of 1..--easy-objects objects."""
    n = args.easy_size // 2
    rec = synthetic_rows("rec", "train", n, args.seed + 7, max_objects=args.easy_objects, rec_masks=True)
    res_other = synthetic_rows("res", "train", n, args.seed + 7, start=n, max_objects=args.easy_objects)
    return [row for pair in zip(rec, res_other) for row in pair]


def train_rows(args):
    """Alternating REC / RES rows (`--rec-masks 1`: REC rows carry their target's mask too)."""
    n_rec = args.train_size // 2
    n_res = args.train_size - n_rec
    rec = synthetic_rows("rec", "train", n_rec, args.seed, rec_masks=bool(args.rec_masks)) if n_rec else []
    # RES rows from a disjoint index range, so no scene appears twice.
    res_rows = synthetic_rows("res", "train", n_res, args.seed, start=n_rec)
    rows = []
    for i in range(max(len(rec), len(res_rows))):
        if i < len(rec):
            rows.append(rec[i])
        if i < len(res_rows):
            rows.append(res_rows[i])
    return rows


def build_text_stack(args, rows, image_size, patch_size, mask_size):
    from perceptiongpt.processing.processing_perceptiongpt import build_processor
    from perceptiongpt.processing.templates import template_corpus
    from perceptiongpt.processing.tokenization_factory import build_tokenizer

    corpus = list(template_corpus())
    for row in rows[:4000]:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        corpus.append(f"USER: {question}\n ASSISTANT: {answer}")
    tokenizer = build_tokenizer("bpe", corpus=corpus, vocab_size=args.vocab_size)
    processor = build_processor(
        image_size=image_size, patch_size=patch_size, mask_size=mask_size, tokenizer=tokenizer, resize_mode="pad"
    )
    return tokenizer, processor


def encode_train_set(rows, processor, image_position):
    """Encodes every row once with the collator; returns padded tensors (pixel values in float16 to save memory)."""
    from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT

    collator = DataCollatorForPerceptionGPT(processor, image_position=image_position)
    encoded = []
    for start in range(0, len(rows), 256):
        chunk = collator(rows[start : start + 256])
        encoded.append(chunk)
    length = max(c["input_ids"].shape[1] for c in encoded)
    n = sum(c["input_ids"].shape[0] for c in encoded)
    pad_id = processor.tokenizer.pad_token_id
    mask_size = processor.mask_size
    data = {
        "input_ids": torch.full((n, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((n, length), dtype=torch.long),
        "labels": torch.full((n, length), -100, dtype=torch.long),
        "pixel_values": torch.cat([c["pixel_values"] for c in encoded]).half(),
        "vis_boxes": torch.cat([c["vis_boxes"] for c in encoded]),
        "vis_masks": torch.zeros((n, 1, mask_size, mask_size), dtype=torch.bool),
        "vis_mask_valid": torch.zeros((n, 1), dtype=torch.bool),
    }
    row = 0
    for c in encoded:
        b, t = c["input_ids"].shape
        for key in ("input_ids", "attention_mask", "labels"):
            data[key][row : row + b, :t] = c[key]
        if "vis_masks" in c:
            data["vis_masks"][row : row + b] = c["vis_masks"]
            data["vis_mask_valid"][row : row + b] = c["vis_mask_valid"]
        row += b
    return data


def batch_from(data, index):
    batch = {key: value[index] for key, value in data.items()}
    batch["pixel_values"] = batch["pixel_values"].float()
    length = int(batch["attention_mask"].sum(1).max())  # trim the right padding of this batch
    for key in ("input_ids", "attention_mask", "labels"):
        batch[key] = batch[key][:, :length]
    return batch


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from perceptiongpt import PerceptionGPTForConditionalGeneration

    # ---- data (untimed)
    t0 = time.time()
    probe = model_config(args, 262)
    image_size, patch_size = probe.vision_config.image_size, probe.vision_config.patch_size
    mask_size = probe.mask_head_config.mask_size
    key = json.dumps(
        [
            args.train_size,
            args.vocab_size,
            args.image_position,
            args.rec_masks,
            args.seed,
            image_size,
            patch_size,
            mask_size,
            2,
        ]
    )
    cache = os.path.join(args.cache_dir, hashlib.md5(key.encode()).hexdigest()[:12] + ".pt")
    rows = None
    if os.path.exists(cache):
        stored = torch.load(cache, weights_only=False)
        data, corpus_rows = stored["data"], stored["corpus_rows"]
        tokenizer, processor = build_text_stack(args, corpus_rows, image_size, patch_size, mask_size)
    else:
        rows = train_rows(args)
        corpus_rows = [{"messages": r["messages"]} for r in rows[:4000]]
        tokenizer, processor = build_text_stack(args, corpus_rows, image_size, patch_size, mask_size)
        data = encode_train_set(rows, processor, args.image_position)
        os.makedirs(args.cache_dir, exist_ok=True)
        torch.save({"data": data, "corpus_rows": corpus_rows}, cache)
    easy = None
    if args.curriculum_steps:
        easy = encode_train_set(easy_rows(args), processor, args.image_position)
    eval_rec = synthetic_rows("rec", "test", args.eval_size)
    eval_res = synthetic_rows("res", "test", args.eval_size, start=args.eval_size)
    data_seconds = time.time() - t0
    n_train = data["input_ids"].shape[0]
    print(
        f"data: {n_train} train rows, seq len {data['input_ids'].shape[1]}, vocab {len(tokenizer)}, "
        f"{data_seconds:.1f}s (untimed)",
        flush=True,
    )

    # ---- model
    config = model_config(args, len(tokenizer))
    model = PerceptionGPTForConditionalGeneration(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, args.warmup, args.steps, min_lr_rate=args.min_lr_ratio
    )
    generator = torch.Generator().manual_seed(args.seed)

    # ---- training (timed)
    log, parts_sum, seen = [], {}, 0
    perm, cursor = torch.randperm(n_train, generator=generator), 0
    start = time.time()
    for step in range(1, args.steps + 1):
        if step <= args.curriculum_steps:
            batch = batch_from(
                easy, torch.randint(0, easy["input_ids"].shape[0], (args.batch_size,), generator=generator)
            )
        else:
            if cursor + args.batch_size > n_train:
                perm, cursor = torch.randperm(n_train, generator=generator), 0
            index = perm[cursor : cursor + args.batch_size]
            cursor += args.batch_size
            batch = batch_from(data, index)
        out = model(**batch)
        out.loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name in ("loss", "lm_loss", "box_l1_loss", "box_giou_loss", "mask_dice_loss", "mask_bce_loss"):
            parts_sum[name] = parts_sum.get(name, 0.0) + float(getattr(out, name).detach())
        seen += 1
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.time() - start
            entry = {
                "step": step,
                "seconds": round(elapsed, 1),
                "lr": scheduler.get_last_lr()[0],
                **{k: round(v / seen, 4) for k, v in parts_sum.items()},
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
            parts_sum, seen = {}, 0
    train_seconds = time.time() - start

    # ---- evaluation by generation (untimed)
    t1 = time.time()
    from perceptiongpt.trainer import evaluate_grounding, shuffle_expressions

    model.eval()
    kwargs = dict(batch_size=args.eval_batch, max_new_tokens=8, image_position=args.image_position)
    evaluation = evaluate_grounding(model, processor, eval_rec + eval_res, **kwargs)
    metrics = evaluation.metrics
    blind = evaluate_grounding(model, processor, shuffle_expressions(eval_rec, args.seed), **kwargs).metrics
    result = {
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "steps_per_second": round(args.steps / train_seconds, 2),
        "rec_acc@0.5": metrics["rec_acc@0.5"],
        "rec_acc@0.75": metrics["rec_acc@0.75"],
        "rec_miou": round(metrics["rec_miou"], 4),
        "res_giou": round(metrics["res_giou"], 4),
        "res_ciou": round(metrics["res_ciou"], 4),
        "rec_acc@0.5_blind": blind["rec_acc@0.5"],
        "n_eval_rec": metrics["n_eval_rec"],
        "n_eval_res": metrics["n_eval_res"],
        "no_vis_rec_res": sum(len(p["boxes"]) == 0 for p in evaluation.predictions),
        "eval_seconds": round(time.time() - t1, 1),
        "data_seconds_untimed": round(data_seconds, 1),
        "num_parameters": n_params,
        "train_rows": n_train,
        "vocab_size": len(tokenizer),
        "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")},
        "config": {
            "vision": {
                k: getattr(config.vision_config, k)
                for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
            },
            "text": {
                k: getattr(config.text_config, k)
                for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            },
            "mask_size": config.mask_head_config.mask_size,
            "fuse_llm_features": config.fuse_llm_features,
            "region_embedding_mode": config.region_embedding_mode,
        },
        "log": log,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "recipe", "config")}, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

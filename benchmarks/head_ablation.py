"""Box-decoding designs against each other and against text coordinates, on the same REC data and backbone.

Every run is one shard: the same synthetic REC data (demo difficulty), the same `demo` backbone and init seed, the
demo recipe for `--steps` optimizer steps (3000, the demo's budget), box supervision only unless `--masks`.
Evaluation is by generation every 300 steps on 200 held-out samples and at the end on 500.

    python benchmarks/head_ablation.py --variant query --seed 0          # one shard (~15 min here)
    python benchmarks/head_ablation.py --variant text --seed 0 --lr 4e-4  # the text baseline's lr sweep
    python benchmarks/head_ablation.py --variant mlp --seed 0 --masks     # with mask supervision on REC rows
    python benchmarks/head_ablation.py --aggregate                        # JSON + plot + docs from the shards
    python benchmarks/head_ablation.py --variant query --quick            # a smoke run in about a minute

Shards: benchmarks/results/head_ablation/NAME-sS.json (NAME = variant, `-masks`, `-lrX` when not the recipe's lr).
Aggregate: benchmarks/results/head_ablation.json and .png, docs/head_ablation.md, and rec_vs_text_coords.json /
docs/benchmarks.md derived from the seed-0 shards of the default design and of text (no separate retraining).
"""

import argparse
import copy
import json
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.box_decoders_perceptiongpt import BOX_DECODERS
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.templates import template_corpus
from perceptiongpt.processing.text_coordinates import row_with_text_coordinates
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer import PerceptionGPTTrainer, count_parameters, evaluate_grounding
from perceptiongpt.trainer.demo import DemoRecipe


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARDS = RESULTS / "head_ablation"
# variant -> its config overrides; "text" writes coordinates and never decodes a box. `*_noaux`: without the
# design's own dense loss (`box_aux_weight` 0), as the first query shards ran. Every field a variant is about is
# spelled out, never left to a default that can change (`query_source` became "llm" by default).
VISION, LLM = {"decoder_type": "query", "query_source": "vision"}, {"decoder_type": "query", "query_source": "llm"}
VARIANT_CONFIGS = {
    **{name: {"box_head_config": {"decoder_type": name}} for name in BOX_DECODERS if name != "legacy_cxcywh"},
    "query": {"box_head_config": VISION},
    "query_llm": {"box_head_config": LLM},
    "query_noaux": {"box_head_config": VISION, "box_aux_weight": 0.0},
    "query_llm_noaux": {"box_head_config": LLM, "box_aux_weight": 0.0},
}
DESIGNS = tuple(VARIANT_CONFIGS)
VARIANTS = (*DESIGNS, "text")
MAX_NEW_TOKENS = {"vis": 8, "text": 40}


class EvaluateEvery(TrainerCallback):
    """Evaluates by generation every `every` steps; the time it takes is kept out of the training time."""

    def __init__(self, every, evaluate):
        self.every, self.evaluate = every, evaluate
        self.curve, self.eval_seconds = [], 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            start = time.perf_counter()
            self.curve.append([state.global_step, self.evaluate(model)])
            self.eval_seconds += time.perf_counter() - start
            print(f"  step {state.global_step}: acc@0.5 {self.curve[-1][1]:.3f}", flush=True)


def _generated_lengths(sequences, prompt_length, eos_id):
    lengths = []
    for row in sequences[:, prompt_length:].tolist():
        lengths.append(row.index(eos_id) if eos_id in row else len(row))  # EOS excluded
    return lengths


def measure_generation(model, processor, rows, variant, repeats=3):
    """Tokens per object and per-query latency at batch 1 and 8 (median of `repeats` passes)."""
    collator = DataCollatorForPerceptionGPT(processor)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    lengths, latency = [], {}
    for batch_size in (1, 8):
        times = []
        for _ in range(repeats):
            start_all = time.perf_counter()
            for start in range(0, 8, batch_size):
                prompts = [
                    collator.conversation(row, i)[:-1] for i, row in enumerate(rows[start : start + batch_size])
                ]
                inputs = processor.apply_chat_template(
                    prompts, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
                with torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS[variant], do_sample=False)
                if batch_size == 8:
                    lengths = _generated_lengths(out, inputs["input_ids"].shape[1], tokenizer.eos_token_id)
            times.append((time.perf_counter() - start_all) / 8)
        latency[batch_size] = 1000 * statistics.median(times)
    return statistics.mean(lengths), latency[1], latency[8]  # one object per REC query


def grid_recipe() -> DemoRecipe:
    """The demo recipe at the grid's learning rate, 2e-4: the demo's own moved to 4e-4 after the grid ran, and the
    shards without `-lr` in their name ran at 2e-4."""
    return DemoRecipe(learning_rate=2e-4)


def shard_name(variant: str, seed: int, masks: bool, lr: float, recipe: DemoRecipe) -> str:
    name = variant + ("-masks" if masks else "") + ("" if lr == recipe.learning_rate else f"-lr{lr:g}")
    return f"{name}-s{seed}"


def build_setup(variant: str, seed: int, masks: bool, train_size: int, eval_size: int, recipe: DemoRecipe):
    """Data, tokenizer (the same for every variant: it also saw text-coordinate answers), processor and model."""
    data = SyntheticConfig(**{**asdict(SyntheticConfig.demo()), "tasks": ("rec",), "rec_masks": masks})
    train_rows = list(build_synthetic_dataset(data, "train", train_size, seed))
    eval_rows = list(build_synthetic_dataset(data, "test", eval_size, seed))
    text_probe = build_processor(48, 8, 24, build_tokenizer("char"))  # geometry only, for the corpus
    corpus = template_corpus() + [m["content"] for row in train_rows[:2000] for m in row["messages"]]
    corpus += [row_with_text_coordinates(row, text_probe)["messages"][-1]["content"] for row in train_rows[:2000]]
    tokenizer = build_tokenizer("bpe", corpus=corpus, vocab_size=recipe.tokenizer_vocab_size)
    config = PerceptionGPTConfig.from_preset(
        "demo",
        text_config={"vocab_size": len(tokenizer)},
        **VARIANT_CONFIGS.get(variant, VARIANT_CONFIGS["mlp"]),  # text's head is never used
        box_l1_weight=recipe.box_l1_weight,
        box_giou_weight=recipe.box_giou_weight,
    )
    processor = build_processor(
        config.vision_config.image_size,
        config.vision_config.patch_size,
        config.mask_head_config.mask_size,
        tokenizer,
        image_position=recipe.image_position,
    )
    set_seed(seed)
    model = PerceptionGPTForConditionalGeneration(config)
    return model, processor, train_rows, eval_rows


def train_and_evaluate(args, recipe: DemoRecipe) -> dict:
    revision = _git_revision()  # of the code this shard runs, before any later edit
    steps = 60 if args.quick else args.steps
    every = 20 if args.quick else args.eval_every
    curve_size, final_size = (50, 50) if args.quick else (args.curve_size, args.final_size)
    train_size = min(recipe.train_size, steps * recipe.batch_size)
    model, processor, train_rows, eval_rows = build_setup(
        args.variant, args.seed, args.masks, train_size, final_size, recipe
    )
    coordinate_format = "text" if args.variant == "text" else "vis"
    collator = DataCollatorForPerceptionGPT(processor, coordinate_format=coordinate_format)
    encoded = [collator.encode(row, i) for i, row in enumerate(train_rows)]

    def evaluate(m, rows):
        was_training = m.training
        result = evaluate_grounding(
            m.eval(),
            processor,
            rows,
            batch_size=50,
            max_new_tokens=MAX_NEW_TOKENS[coordinate_format],
            coordinate_format=coordinate_format,
        )
        m.train(was_training)
        return result.metrics["rec_acc@0.5"]

    callback = EvaluateEvery(every, lambda m: evaluate(m, eval_rows[:curve_size]))
    training = TrainingArguments(
        output_dir=str(RESULTS / "head_ablation_runs" / args.variant),
        max_steps=steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=args.lr,
        warmup_steps=recipe.warmup_steps,
        lr_scheduler_type=recipe.lr_scheduler_type,
        lr_scheduler_kwargs={"min_lr_rate": recipe.min_lr_rate},
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = PerceptionGPTTrainer(
        model=model,
        args=training,
        train_dataset=encoded,
        data_collator=collator,
        processing_class=processor,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start - callback.eval_seconds
    model.eval()
    final = evaluate(model, eval_rows[:final_size])
    tokens, latency_b1, latency_b8 = measure_generation(model, processor, eval_rows[:8], coordinate_format)
    return {
        "variant": args.variant,
        "seed": args.seed,
        "masks": args.masks,
        "learning_rate": args.lr,
        "steps": steps,
        "acc_curve": callback.curve,
        "final_acc@0.5": final,
        "final_eval_size": final_size,
        "curve_eval_size": curve_size,
        "tokens_per_object": tokens,
        "latency_ms_b1": latency_b1,
        "latency_ms_b8": latency_b8,
        "trainable_params": count_parameters(model)["trainable"],
        "train_seconds": round(train_seconds, 1),
        "steps_per_second": round(steps / train_seconds, 2),
        "git_revision": revision,
        "threads": recipe.threads,
        "recipe": asdict(recipe),
        "quick": args.quick,
    }


def _git_revision() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _summary(shards: list[dict]) -> dict:
    """Mean over seeds of one variant's shards, in the aggregate's schema."""
    curves = [dict(map(tuple, shard["acc_curve"])) for shard in shards]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    mean = statistics.mean
    return {
        "final_acc@0.5": mean(s["final_acc@0.5"] for s in shards),
        "seeds": [s["final_acc@0.5"] for s in shards],
        "seed_ids": [s["seed"] for s in shards],
        "acc_curve": [[step, mean(c[step] for c in curves)] for step in common],
        "tokens_per_object": mean(s["tokens_per_object"] for s in shards),
        # the fastest seed: latency is a property of the design, and another job on the CPU only ever adds time
        "latency_ms_b1": min(s["latency_ms_b1"] for s in shards),
        "latency_ms_b8": min(s["latency_ms_b8"] for s in shards),
        "trainable_params": shards[0]["trainable_params"],
        "learning_rate": shards[0]["learning_rate"],
        "steps_per_second": mean(s["steps_per_second"] for s in shards),
    }


def planned_shards(default: str, seeds=(0, 1)) -> list[str]:
    """The grid: every design with its aux loss and text at the recipe's lr, 2 seeds; mlp and the default with
    mask supervision, 1 seed."""
    recipe = grid_recipe()
    names = [
        shard_name(variant, seed, False, recipe.learning_rate, recipe)
        for variant in ("mlp", "bins", "query", "mask", "query_llm", "text")
        for seed in seeds
    ]
    return names + [shard_name(variant, 0, True, recipe.learning_rate, recipe) for variant in ("mlp", default)]


def aggregate(default: str) -> dict:
    shards = [json.loads(path.read_text()) for path in sorted(SHARDS.glob("*.json"))]
    shards = [s for s in shards if not s["quick"]]
    groups: dict[tuple, list] = {}
    for shard in shards:
        groups.setdefault((shard["variant"], shard["masks"], shard["learning_rate"]), []).append(shard)
    result = {"variants": {}, "text": None, "with_masks": {}, "default": default, "text_lr_sweep": {}}
    for (variant, masks, lr), group in sorted(groups.items()):
        summary = _summary(group)
        if variant == "text":
            result["text_lr_sweep"][f"{lr:g}"] = summary
        elif masks:
            result["with_masks"][variant] = summary
        elif lr == grid_recipe().learning_rate:
            result["variants"][variant] = summary
    if result["text_lr_sweep"]:  # text gets its best learning rate
        result["text"] = max(result["text_lr_sweep"].values(), key=lambda s: s["final_acc@0.5"])
    return result


def write_ablation_report(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [(f"`<vis>` {name}", summary) for name, summary in result["variants"].items()]
    rows += [(f"`<vis>` {name} + masks", summary) for name, summary in result["with_masks"].items()]
    if result["text"]:
        rows.append(("text coordinates", result["text"]))
    for label, summary in rows:
        steps, accs = zip(*summary["acc_curve"]) if summary["acc_curve"] else ((), ())
        ax.plot(steps, accs, marker="o", markersize=3, label=label.replace("`", ""))
    ax.set(xlabel="training step", ylabel="REC Acc@0.5 (generation, 200 held-out)", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "head_ablation.png", dpi=120)
    lines = [
        "# Box-decoding designs vs text coordinates (REC, box supervision only)",
        "",
        "Generated by `python benchmarks/head_ablation.py --aggregate` from `benchmarks/results/head_ablation/`;"
        " do not edit by hand. Same synthetic REC data, `demo` backbone and init seed; Acc@0.5 by generation on 500"
        " held-out samples after training (curve: 200 samples every 300 steps), mean over seeds.",
        "",
        f"Default design: `{result['default']}`.",
        "",
        "| variant | final Acc@0.5 (mean) | per seed | tokens/object | ms/query b1 | ms/query b8 | trainable |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in rows:
        seeds = ", ".join(f"{acc:.3f}" for acc in s["seeds"])
        lines.append(
            f"| {label} (lr {s['learning_rate']:g}) | {s['final_acc@0.5']:.3f} | {seeds} | "
            f"{s['tokens_per_object']:.2f} | {s['latency_ms_b1']:.1f} | {s['latency_ms_b8']:.1f} | "
            f"{s['trainable_params']:,} |"
        )
    if result["text_lr_sweep"]:
        sweep = ", ".join(f"lr {lr}: {s['final_acc@0.5']:.3f}" for lr, s in result["text_lr_sweep"].items())
        lines += ["", f"Text learning-rate sweep (final Acc@0.5): {sweep}."]
    missing = [name for name in planned_shards(result["default"]) if not (SHARDS / f"{name}.json").exists()]
    if missing:
        lines += ["", "Shards of the planned grid still to run: " + ", ".join(f"`{name}`" for name in missing) + "."]
    lines += ["", "![accuracy curves](../benchmarks/results/head_ablation.png)", ""]
    (ROOT / "docs" / "head_ablation.md").write_text("\n".join(lines))


def write_rec_vs_text(result: dict) -> None:
    """rec_vs_text_coords.json (its historical keys) from the seed-0 shards of the default design and of text."""
    recipe = grid_recipe()
    vis_shard = json.loads((SHARDS / f"{result['default']}-s0.json").read_text())
    text_lr = float(max(result["text_lr_sweep"].items(), key=lambda item: item[1]["final_acc@0.5"])[0])
    text_shard = json.loads((SHARDS / f"{shard_name('text', 0, False, text_lr, recipe)}.json").read_text())

    def keys(shard):
        reached = [step for step, acc in shard["acc_curve"] if acc >= 0.8]
        return {
            **{k: shard[k] for k in ("acc_curve", "final_acc@0.5", "tokens_per_object", "latency_ms_b1")},
            "steps_to_0.8": reached[0] if reached else None,
            "latency_ms_b8": shard["latency_ms_b8"],
            "trainable_params": shard["trainable_params"],
            "train_seconds": shard["train_seconds"],
        }

    config = {
        "steps": vis_shard["steps"],
        "eval_every": vis_shard["acc_curve"][0][0],
        "eval_size": vis_shard["final_eval_size"],
        "seed": 0,
        "data": "synthetic demo difficulty, REC",
        "recipe": vis_shard["recipe"],
        "threads": vis_shard["threads"],
        "quick": False,
        "derived_from": [f"head_ablation/{result['default']}-s0.json", f"head_ablation/text lr {text_lr:g} s0"],
    }
    derived = {"config": config, "vis": keys(vis_shard), "text": keys(text_shard)}
    (RESULTS / "rec_vs_text_coords.json").write_text(json.dumps(derived, indent=2))
    write_rec_vs_text_report(derived, RESULTS / "rec_vs_text_coords.png", ROOT / "docs" / "benchmarks.md")


def write_rec_vs_text_report(result, png, markdown):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, label in (("vis", "<vis> embedding (PerceptionGPT)"), ("text", "text coordinates (Shikra-style)")):
        steps, accs = zip(*result[variant]["acc_curve"])
        ax.plot(steps, accs, marker="o", label=label)
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="training step", ylabel="REC Acc@0.5 (generation, held-out)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    vis, text = result["vis"], result["text"]
    budget = result["config"]["steps"]
    speed = (vis["steps_to_0.8"] or budget) / (text["steps_to_0.8"] or budget)
    rows = [
        ("steps to Acc@0.5 >= 0.8", vis["steps_to_0.8"], text["steps_to_0.8"]),
        ("final Acc@0.5", f"{vis['final_acc@0.5']:.3f}", f"{text['final_acc@0.5']:.3f}"),
        ("tokens per object", f"{vis['tokens_per_object']:.2f}", f"{text['tokens_per_object']:.2f}"),
        ("latency per query, batch 1 (ms)", f"{vis['latency_ms_b1']:.1f}", f"{text['latency_ms_b1']:.1f}"),
        ("latency per query, batch 8 (ms)", f"{vis['latency_ms_b8']:.1f}", f"{text['latency_ms_b8']:.1f}"),
        ("trainable parameters", vis["trainable_params"], text["trainable_params"]),
        ("training seconds", vis["train_seconds"], text["train_seconds"]),
    ]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/head_ablation.py --aggregate` from "
        "`benchmarks/results/rec_vs_text_coords.json` (the seed-0 shards of the default design and of text);"
        " do not edit by hand.",
        "",
        "## `<vis>` embedding vs text coordinates (REC, synthetic, same backbone)",
        "",
        f"Config: `{json.dumps(result['config'])}`",
        "",
        "| | `<vis>` | text |",
        "|---|---|---|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        f"Steps to 0.8, `<vis>` / text (never reached = the full budget of {budget}): {speed:.2f}. "
        f"Accuracy gap: {100 * (vis['final_acc@0.5'] - text['final_acc@0.5']):+.1f} points. "
        f"Tokens: {text['tokens_per_object'] / max(vis['tokens_per_object'], 1e-9):.1f}x fewer. "
        f"Latency: {text['latency_ms_b1'] / vis['latency_ms_b1']:.2f}x (batch 1), "
        f"{text['latency_ms_b8'] / vis['latency_ms_b8']:.2f}x (batch 8) lower.",
        "",
        "![accuracy curves](../benchmarks/results/rec_vs_text_coords.png)",
        "",
    ]
    markdown.write_text("\n".join(lines))


def main():
    recipe = grid_recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="a box-decoder design, or text coordinates")
    parser.add_argument("--seed", type=int, default=0, help="data, initialization and training seed")
    parser.add_argument("--masks", action="store_true", help="also supervise the target's mask on REC rows")
    parser.add_argument("--lr", type=float, default=recipe.learning_rate, help="peak learning rate")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--eval-every", type=int, default=300, help="evaluate the curve every K steps")
    parser.add_argument("--curve-size", type=int, default=200, help="held-out samples per curve point")
    parser.add_argument("--final-size", type=int, default=500, help="held-out samples of the final evaluation")
    parser.add_argument("--threads", type=int, default=recipe.threads, help="torch threads (recorded in the shard)")
    parser.add_argument("--quick", action="store_true", help="60 steps on 50 samples (written with a _quick name)")
    parser.add_argument("--aggregate", action="store_true", help="combine the committed shards")
    parser.add_argument("--default", default="query_llm", choices=DESIGNS, help="the variant of the model default")
    args = parser.parse_args()
    if args.aggregate:
        result = aggregate(args.default)
        (RESULTS / "head_ablation.json").write_text(json.dumps(result, indent=2))
        write_ablation_report(result)
        if result["text"] and (SHARDS / f"{args.default}-s0.json").exists():
            write_rec_vs_text(result)
        print(json.dumps({k: v["final_acc@0.5"] for k, v in result["variants"].items()}, indent=2))
        return
    if args.variant is None:
        parser.error("--variant is required unless --aggregate is given")
    recipe.threads = args.threads
    torch.set_num_threads(recipe.threads)
    result = train_and_evaluate(args, copy.deepcopy(recipe))
    SHARDS.mkdir(parents=True, exist_ok=True)
    name = shard_name(args.variant, args.seed, args.masks, args.lr, recipe)
    path = (RESULTS / f"head_ablation_{name}_quick.json") if args.quick else (SHARDS / f"{name}.json")
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("acc_curve", "recipe")}, indent=2))


if __name__ == "__main__":
    main()

"""The paper's central claim, measured: one `<vis>` embedding per object vs box coordinates written as text.

Both variants are the same model class, tokenizer, initial weights, seed, data, Trainer and generation-based
evaluation; only the collator's `coordinate_format` differs ("vis" or "text", Shikra-style `[x1,y1,x2,y2]`).
REC on the synthetic set at the demo difficulty (3-5 shapes; the referent is named by colour, shape or size).

    python benchmarks/rec_vs_text_coords.py            # the committed full run
    python benchmarks/rec_vs_text_coords.py --quick    # a smoke run in a few minutes

Writes benchmarks/results/rec_vs_text_coords.json, benchmarks/results/rec_vs_text_coords.png and
docs/benchmarks.md (regenerated from the JSON).
"""

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
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


def measure_generation(model, processor, rows, variant, image_position, repeats=3):
    """Tokens per object and per-query latency at batch 1 and 8 (median of `repeats` passes)."""
    collator = DataCollatorForPerceptionGPT(processor, image_position=image_position)
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


def run_variant(variant, model, processor, train_rows, eval_rows, recipe, steps, every, seed, output):
    collator = DataCollatorForPerceptionGPT(processor, image_position=recipe.image_position, coordinate_format=variant)
    encoded = [collator.encode(row, i) for i, row in enumerate(train_rows)]

    def accuracy(m):
        was_training = m.training
        result = evaluate_grounding(
            m.eval(),
            processor,
            eval_rows,
            batch_size=50,
            max_new_tokens=MAX_NEW_TOKENS[variant],
            image_position=recipe.image_position,
            coordinate_format=variant,
        )
        m.train(was_training)
        return result.metrics["rec_acc@0.5"]

    callback = EvaluateEvery(every, accuracy)
    args = TrainingArguments(
        output_dir=str(output / variant),
        max_steps=steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
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
        seed=seed,
        disable_tqdm=True,
    )
    trainer = PerceptionGPTTrainer(
        model=model,
        args=args,
        train_dataset=encoded,
        data_collator=collator,
        processing_class=processor,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start - callback.eval_seconds
    model.eval()
    tokens, latency_b1, latency_b8 = measure_generation(
        model, processor, eval_rows[:8], variant, recipe.image_position
    )
    reached = [step for step, acc in callback.curve if acc >= 0.8]
    return {
        "acc_curve": callback.curve,
        "steps_to_0.8": reached[0] if reached else None,
        "final_acc@0.5": callback.curve[-1][1],
        "tokens_per_object": tokens,
        "latency_ms_b1": latency_b1,
        "latency_ms_b8": latency_b8,
        "trainable_params": count_parameters(model)["trainable"],
        "train_seconds": round(train_seconds, 1),
    }


def write_report(result, png, markdown):
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
        "Generated by `python benchmarks/rec_vs_text_coords.py` from "
        "`benchmarks/results/rec_vs_text_coords.json`; do not edit by hand.",
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (few steps, 50 eval samples)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every K steps")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out REC samples (>= 200 for the full run)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialization and training seed")
    args = parser.parse_args()
    recipe = DemoRecipe()
    steps = args.steps or (60 if args.quick else recipe.steps)
    every = args.eval_every or (20 if args.quick else max(steps // 10, 1))
    eval_size = args.eval_size or (50 if args.quick else 200)
    torch.set_num_threads(recipe.threads)

    data = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec",)})
    train_rows = list(
        build_synthetic_dataset(data, "train", min(recipe.train_size, steps * recipe.batch_size), args.seed)
    )
    eval_rows = list(build_synthetic_dataset(data, "test", eval_size, args.seed))
    text_probe = build_processor(48, 8, 24, build_tokenizer("char"))  # geometry only, for the corpus
    corpus = template_corpus() + [m["content"] for row in train_rows[:2000] for m in row["messages"]]
    corpus += [row_with_text_coordinates(row, text_probe)["messages"][-1]["content"] for row in train_rows[:2000]]
    tokenizer = build_tokenizer("bpe", corpus=corpus, vocab_size=recipe.tokenizer_vocab_size)
    config = PerceptionGPTConfig.from_preset(
        "demo",
        text_config={"vocab_size": len(tokenizer)},
        box_l1_weight=recipe.box_l1_weight,
        box_giou_weight=recipe.box_giou_weight,
    )
    processor = build_processor(
        config.vision_config.image_size, config.vision_config.patch_size, config.mask_head_config.mask_size, tokenizer
    )
    set_seed(args.seed)
    initial = PerceptionGPTForConditionalGeneration(config)
    result = {
        "config": {
            "steps": steps,
            "eval_every": every,
            "eval_size": eval_size,
            "seed": args.seed,
            "data": "synthetic demo difficulty, REC",
            "recipe": asdict(recipe),
            "threads": recipe.threads,
            "quick": args.quick,
        }
    }
    output = RESULTS / "rec_vs_text_coords_runs"
    for variant in ("vis", "text"):
        print(f"{variant}:", flush=True)
        set_seed(args.seed)
        result[variant] = run_variant(
            variant, copy.deepcopy(initial), processor, train_rows, eval_rows, recipe, steps, every, args.seed, output
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "rec_vs_text_coords_quick" if args.quick else "rec_vs_text_coords"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    write_report(result, RESULTS / f"{name}.png", docs / ("benchmarks_quick.md" if args.quick else "benchmarks.md"))
    print(json.dumps({v: {k: result[v][k] for k in result[v] if k != "acc_curve"} for v in ("vis", "text")}, indent=2))


if __name__ == "__main__":
    main()

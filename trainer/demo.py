"""The README's main job: train the `demo` preset from scratch on the embedded synthetic data on CPU, with every task
of the paper (REC, RES, region descriptions from a box or a mask prompt, several objects per answer), evaluate it by
generation on held-out data, and write metrics.json, examples.png and a shareable model/ folder."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments, set_seed

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.hub_cards import model_card
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT, decode_rle
from perceptiongpt.processing.pipeline_visual_grounding import save_grounding_pipeline
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset, generate_synthetic_samples
from perceptiongpt.processing.templates import template_corpus
from perceptiongpt.processing.tokenization_factory import build_tokenizer

from .evaluation import evaluate_grounding, shuffle_expressions, swap_regions
from .trainer_perceptiongpt import PerceptionGPTTrainer
from .visualize import captioned, draw_grounding, tile_images


DEMO_TASKS = ("rec", "res", "reg", "multi")
# kept from the REC+RES demo, then every task's
METRIC_KEYS = ("rec_acc@0.5", "rec_acc@0.5_blind", "rec_miou", "res_ciou", "res_giou")
TASK_METRIC_KEYS = (
    "reg_acc", "reg_attr_acc", "reg_acc_blind", "reg_mask_acc", "reg_mask_attr_acc", "reg_mask_acc_blind",
    "multi_f1", "multi_precision", "multi_recall", "multi_pred_count", "multi_true_count",
)  # fmt: skip


@dataclass
class DemoRecipe:
    """Every number of the demo run (see benchmarks/demo_recipe.py for how they were chosen)."""

    steps: int = 3000
    # every run underfits at 3000 steps; more rows per step (less gradient noise; the time per step grows with them):
    # REC / RES gIoU / REG box / REG mask / multi F1 at 32 rows 0.674 / 0.545 / 0.602 / 0.622 / 0.492, at 64 (32 px
    # masks) 0.816 / 0.624 / 0.748 / 0.809 / 0.623, at 128 0.900 / 0.659 / 0.803 / 0.829 / 0.743 (seed 0 each)
    batch_size: int = 128
    # 4e-4: REC 0.715 against 0.590 at 2e-4 (seed 0; benchmarks/results/demo_ablation/); 1e-3 never left the mean box
    learning_rate: float = 4e-4
    warmup_steps: int = 100
    lr_scheduler_type: str = "cosine_with_min_lr"
    min_lr_rate: float = 0.5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    train_size: int = 20000
    # per task (rec, res, reg, multi; reg split between box and mask prompts); 200 left a standard error of ~0.05 on REG
    eval_size: int = 500
    tokenizer_vocab_size: int = 400
    image_position: str = "after_text"  # the question first: every patch can attend to the words
    box_l1_weight: float = 5.0
    box_giou_weight: float = 2.0
    threads: int = 2


def _training_args(output_dir, recipe, seed):
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=recipe.steps,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_steps,
        lr_scheduler_type=recipe.lr_scheduler_type,
        lr_scheduler_kwargs={"min_lr_rate": recipe.min_lr_rate},
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        logging_steps=max(recipe.steps // 20, 1),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def build_demo(recipe: DemoRecipe, seed: int = 0):
    """The untrained demo model, its processor and the synthetic splits."""
    # REC rows carry their target's mask too: dense supervision of the same `<vis>` state
    data_config = SyntheticConfig(**{**asdict(SyntheticConfig.demo()), "tasks": DEMO_TASKS, "rec_masks": True})
    train = build_synthetic_dataset(data_config, "train", recipe.train_size, seed)
    test = build_synthetic_dataset(data_config, "test", 8 * recipe.eval_size, seed)  # >= eval_size of each task
    # rendered turns, so that the chat markers become single tokens too
    corpus = template_corpus() + [
        f"USER: {row['messages'][0]['content']}\n ASSISTANT: {row['messages'][1]['content']}"
        for row in generate_synthetic_samples(data_config, "train", 4000, seed)
    ]
    tokenizer = build_tokenizer("bpe", corpus=corpus, vocab_size=recipe.tokenizer_vocab_size)
    config = PerceptionGPTConfig.from_preset(
        "demo",
        text_config={"vocab_size": len(tokenizer)},
        box_l1_weight=recipe.box_l1_weight,
        box_giou_weight=recipe.box_giou_weight,
    )
    set_seed(seed)
    model = PerceptionGPTForConditionalGeneration(config)
    vision = config.vision_config
    processor = build_processor(
        vision.image_size,
        vision.patch_size,
        config.mask_head_config.mask_size,
        tokenizer,
        image_position=recipe.image_position,
    )
    return model, processor, train, test


def _held_out(test, task, count):
    rows = [row for row in test if row["task"] == task]
    if len(rows) < count:
        raise ValueError(f"The test split has {len(rows)} {task!r} rows, fewer than `eval_size` = {count}.")
    return rows[:count]


def run_demo(output_dir, steps: int | None = None, seed: int = 0, recipe: DemoRecipe | None = None) -> dict:
    """Train, evaluate and save the demo; returns the metrics written to `output_dir/metrics.json`."""
    recipe = recipe or DemoRecipe()
    if steps is not None:
        recipe = DemoRecipe(**{**asdict(recipe), "steps": steps})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    model, processor, train, test = build_demo(recipe, seed)
    collator = DataCollatorForPerceptionGPT(processor)  # the prompt layout is the processor's
    # chat templating is slow next to a tiny model's step: encode the training set once, outside the timed part
    encoded = [collator.encode(row, index) for index, row in enumerate(tqdm(train, desc="encode"))]
    trainer = PerceptionGPTTrainer(
        model=model,
        args=_training_args(output_dir / "checkpoints", recipe, seed),
        train_dataset=encoded,
        data_collator=collator,
        processing_class=processor,
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    model.eval()
    held_out = {task: _held_out(test, task, recipe.eval_size) for task in DEMO_TASKS}
    rows = [row for task in DEMO_TASKS for row in held_out[task]]
    start = time.perf_counter()
    kwargs = dict(batch_size=32, max_new_tokens=12, progress=True)
    result = evaluate_grounding(model, processor, rows, **kwargs)
    text_blind = evaluate_grounding(model, processor, shuffle_expressions(held_out["rec"], seed), **kwargs)
    region_blind = evaluate_grounding(model, processor, swap_regions(held_out["reg"], seed), **kwargs).metrics
    eval_seconds = time.perf_counter() - start
    found = {**result.metrics, "rec_acc@0.5_blind": text_blind.metrics["rec_acc@0.5"]}
    found.update({f"{task}_acc_blind": region_blind.get(f"{task}_acc") for task in ("reg", "reg_mask")})
    metrics = {key: found.get(key) for key in METRIC_KEYS + TASK_METRIC_KEYS}
    metrics.update(
        steps=recipe.steps,
        train_seconds=round(train_seconds, 1),
        steps_per_second=round(recipe.steps / train_seconds, 2),
        eval_seconds=round(eval_seconds, 1),
        **{key: value for key, value in result.metrics.items() if key.startswith("n_eval_")},
        seed=seed,
        recipe=asdict(recipe),
    )
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    first = {task: sum(len(held_out[t]) for t in DEMO_TASKS[: DEMO_TASKS.index(task)]) for task in DEMO_TASKS}
    _save_examples(
        output_dir / "examples.png",
        [held_out[task][:6] for task in DEMO_TASKS],
        [result.predictions[first[task] : first[task] + 6] for task in DEMO_TASKS],
    )
    _save_model(output_dir / "model", model, processor, metrics, recipe)
    return metrics


def _save_examples(path, rows_per_task, predictions_per_task):
    """One row of tiles per task: predictions in colour, the answer's boxes in white (REG: the prompt region), the
    question under each tile (and for REG the generated description)."""
    tiles = []
    for rows, predictions in zip(rows_per_task, predictions_per_task):
        for row, prediction in zip(rows, predictions):
            question = row["messages"][0]["content"]
            if row["task"] == "reg":
                prompt_mask = None if row["masks"][0] is None else decode_rle(row["masks"][0], "masks")[None]
                tile = draw_grounding(row["image"], [row["boxes"][0]], prompt_mask, scale=3, colors=[(255, 255, 255)])
                tiles.append(captioned(tile, f"{question} -> {prediction['text']}"))
                continue
            count = None if row["task"] == "multi" else 1
            masks = prediction["masks"]
            masks = masks[:count].numpy() if row["task"] == "res" and masks is not None else None
            tile = draw_grounding(row["image"], prediction["boxes"][:count].tolist(), masks, scale=3)
            answer = row["boxes"][-1:] if count else row["boxes"]
            tile = draw_grounding(tile, [[v * 3 for v in box] for box in answer], colors=[(255, 255, 255)])
            tiles.append(captioned(tile, question))
    tile_images(tiles, columns=max(len(rows) for rows in rows_per_task)).save(path)


def _save_model(path, model, processor, metrics, recipe):
    save_grounding_pipeline(model, path)  # `pipeline("visual-grounding", model=path, trust_remote_code=True)`
    model.save_pretrained(path)
    processor.save_pretrained(path)
    training = (
        f"Trained from scratch with `perceptiongpt demo` on CPU: {recipe.steps} steps, batch "
        f"{recipe.batch_size}, AdamW lr {recipe.learning_rate} ({recipe.lr_scheduler_type}, "
        f"{recipe.warmup_steps} warm-up steps), box loss 5*L1 + 2*GIoU, mask loss Dice + BCE."
    )
    data = (
        "The embedded synthetic referring dataset (`perceptiongpt.processing.synthetic`, demo difficulty: 64 px, "
        "3-5 shapes, expressions by colour, shape or size): REC, RES, REG from a box or a mask prompt, and "
        "multi-object answers."
    )
    card_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    card = model_card(
        card_metrics, "perceptiongpt/demo", "PerceptionGPT synthetic (demo)", "perceptiongpt-synthetic", training, data
    )
    card.save(str(path / "README.md"))


__all__ = ["DemoRecipe", "build_demo", "run_demo"]

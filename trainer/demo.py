"""The README's main job: train the `demo` preset from scratch on the embedded synthetic REC+RES data on CPU,
evaluate it by generation on held-out data, and write metrics.json, examples.png and a shareable model/ folder."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainingArguments, set_seed

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.hub_cards import model_card
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.pipeline_visual_grounding import save_grounding_pipeline
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset, generate_synthetic_samples
from perceptiongpt.processing.templates import template_corpus
from perceptiongpt.processing.tokenization_factory import build_tokenizer

from .evaluation import evaluate_grounding, shuffle_expressions
from .trainer_perceptiongpt import PerceptionGPTTrainer
from .visualize import draw_grounding, tile_images


@dataclass
class DemoRecipe:
    """Every number of the demo run (see benchmarks/demo_recipe.py for how they were chosen)."""

    steps: int = 5000
    batch_size: int = 32
    learning_rate: float = 2e-4  # 1e-3 never leaves the mean box; 1e-4 to 4e-4 escape it at about the same step
    warmup_steps: int = 100
    lr_scheduler_type: str = "cosine_with_min_lr"
    min_lr_rate: float = 0.5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    train_size: int = 20000
    eval_size: int = 200  # per task (rec and res)
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
    data_config = SyntheticConfig(**{**asdict(SyntheticConfig.demo()), "tasks": ("rec", "res"), "rec_masks": True})
    train = build_synthetic_dataset(data_config, "train", recipe.train_size, seed)
    test = build_synthetic_dataset(data_config, "test", 4 * recipe.eval_size, seed)
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
    rec_rows, res_rows = _held_out(test, "rec", recipe.eval_size), _held_out(test, "res", recipe.eval_size)
    start = time.perf_counter()
    kwargs = dict(batch_size=32, max_new_tokens=8, progress=True)
    result = evaluate_grounding(model, processor, rec_rows + res_rows, **kwargs)
    blind = evaluate_grounding(model, processor, shuffle_expressions(rec_rows, seed), **kwargs)
    eval_seconds = time.perf_counter() - start
    metrics = {
        "rec_acc@0.5": result.metrics["rec_acc@0.5"],
        "rec_acc@0.5_blind": blind.metrics["rec_acc@0.5"],
        "rec_miou": result.metrics["rec_miou"],
        "res_ciou": result.metrics["res_ciou"],
        "res_giou": result.metrics["res_giou"],
        "steps": recipe.steps,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "n_eval_rec": result.metrics["n_eval_rec"],
        "n_eval_res": result.metrics["n_eval_res"],
        "seed": seed,
        "recipe": asdict(recipe),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _save_examples(
        output_dir / "examples.png",
        rec_rows[:8] + res_rows[:8],
        result.predictions[:8] + result.predictions[len(rec_rows) : len(rec_rows) + 8],
    )
    _save_model(output_dir / "model", model, processor, metrics, recipe)
    return metrics


def _save_examples(path, rows, predictions):
    tiles = []
    for row, prediction in zip(rows, predictions):
        masks = prediction["masks"][:1].numpy() if row["task"] == "res" and prediction["masks"] is not None else None
        tile = draw_grounding(row["image"], prediction["boxes"][:1].tolist(), masks, ["pred"], scale=3)
        gt = draw_grounding(tile, [[v * 3 for v in row["boxes"][-1]]], colors=[(255, 255, 255)])
        tiles.append(gt)
    tile_images(tiles, columns=8).save(path)


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
        "3-5 shapes, expressions by colour, shape or size), REC and RES tasks."
    )
    card_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    card = model_card(
        card_metrics, "perceptiongpt/demo", "PerceptionGPT synthetic (demo)", "perceptiongpt-synthetic", training, data
    )
    card.save(str(path / "README.md"))


__all__ = ["DemoRecipe", "build_demo", "run_demo"]

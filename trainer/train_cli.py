"""`perceptiongpt train`: `HfArgumentParser` over `GroundingTrainingArguments` (model, data, LoRA, layout) and
transformers' `TrainingArguments`, so that every Trainer flag works (`--bf16`, `--gradient_accumulation_steps`,
`--eval_strategy`, `--resume_from_checkpoint`, `--push_to_hub`, `--report_to`, ...), as transformers' example
scripts do. The final model, its processor, the pipeline code and a model card go to `OUTPUT_DIR/final`.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments


NAMED_SOURCES = ("synthetic", "refcoco-refer", "refcoco-parquet")
# the paper's fine-tuning recipe where it differs from TrainingArguments' defaults; any flag overrides them
TRAIN_DEFAULTS = {
    "learning_rate": 2e-5,
    "warmup_steps": 100,
    "max_steps": 1000,
    "per_device_train_batch_size": 8,
    "logging_steps": 10,
    "remove_unused_columns": False,  # the collator reads the grounding columns
    "report_to": "none",
}


@dataclass
class GroundingTrainingArguments:
    """Ours, beside `TrainingArguments`: what to train, on what, and how the data is laid out."""

    model: str = field(
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "a PerceptionGPT folder or repo id, or a base VLM of a supported family (llava, qwen2_5_vl, "
            "idefics3, smolvlm), which gets `<vis>` and fresh heads",
        }
    )
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "synthetic, refcoco-refer, refcoco-parquet, or anything `datasets` loads in the grounding schema: "
            "a Hub id, a save_to_disk folder, or a .jsonl/.json/.parquet/.csv file (image paths relative to it)"
        },
    )
    train_split: str = field(default="train", metadata={"help": "the split to train on"})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "the split evaluated by generation (synthetic: validation); needs eval_strategy"},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "another source for evaluation (default: dataset)"}
    )
    max_eval_samples: int = field(default=200, metadata={"help": "rows evaluated by generation"})
    eval_max_new_tokens: int = field(default=16, metadata={"help": "generation budget per evaluated row"})
    image_column: str = field(default="image", metadata={"help": "the source's column with the images"})
    messages_column: str = field(default="messages", metadata={"help": "the source's column with the chat"})
    boxes_column: str = field(default="boxes", metadata={"help": "the source's column with pixel xyxy per <vis>"})
    masks_column: str = field(default="masks", metadata={"help": "the source's column with RLE masks per <vis>"})
    task_column: str = field(default="task", metadata={"help": "the source's column with the task (rec, res, ...)"})
    num_samples: int = field(default=1000, metadata={"help": "synthetic: rows to generate"})
    data_dir: str | None = field(default=None, metadata={"help": "refcoco-refer: folder with refs(*).p"})
    images_dir: str | None = field(default=None, metadata={"help": "refcoco-refer: the COCO train2014 folder"})
    parquet: list[str] | None = field(default=None, metadata={"help": "refcoco-parquet: the parquet files"})
    refcoco_task: Literal["rec", "res"] = field(default="rec", metadata={"help": "RefCOCO rows as REC or RES"})
    lora: Literal["none", "paper", "full"] = field(default="none", metadata={"help": "PEFT LoRA preset"})
    heads_learning_rate: float | None = field(
        default=None, metadata={"help": "peak lr of the perception heads (default: --learning_rate)"}
    )
    image_position: Literal["first", "after_text"] | None = field(
        default=None, metadata={"help": "image before the question or after it; default: the processor's layout"}
    )
    num_proc: int | None = field(default=None, metadata={"help": "processes for encoding the data (datasets.map)"})


def build_train_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (GroundingTrainingArguments, TrainingArguments), prog="perceptiongpt train", description=__doc__
    )
    parser.set_defaults(**TRAIN_DEFAULTS)
    return parser


def grounding_rows(args: GroundingTrainingArguments, source: str, split: str):
    """The rows of one source: a named one, or anything `datasets` loads."""
    from perceptiongpt.processing import refcoco
    from perceptiongpt.processing.grounding_datasets import load_grounding_dataset
    from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset

    if source == "synthetic":
        config = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})
        return build_synthetic_dataset(config, split, args.num_samples)
    if source == "refcoco-refer":
        if not (args.data_dir and args.images_dir):
            raise SystemExit("--dataset refcoco-refer needs --data_dir and --images_dir")
        return refcoco.load_refcoco_refer(args.data_dir, args.images_dir, split, task=args.refcoco_task)
    if source == "refcoco-parquet":
        if not args.parquet:
            raise SystemExit("--dataset refcoco-parquet needs --parquet")
        return refcoco.load_refcoco_parquet(args.parquet, split=split, task=args.refcoco_task)
    columns = {name: getattr(args, f"{name}_column") for name in ("image", "messages", "boxes", "masks", "task")}
    return load_grounding_dataset(source, split, columns={k: v for k, v in columns.items() if v != k})


def _evalgrounding_rows(args, training_args):
    if training_args.eval_strategy == "no":
        return None
    source = args.eval_dataset or args.dataset
    split = args.eval_split or ("validation" if source == "synthetic" else None)
    if split is None:
        raise SystemExit("--eval_strategy needs --eval_split (the split to evaluate) or --eval_dataset")
    rows = grounding_rows(args, source, split)
    return rows.select(range(min(args.max_eval_samples, len(rows)))) if hasattr(rows, "select") else rows


def save_final(trainer, args, training_args, metrics: dict, push: bool) -> Path:
    """`OUTPUT_DIR/final`: the model (or adapter), processor, pipeline code and a card with the final evaluation;
    pushed with them to `--hub_model_id` under `--push_to_hub`."""
    from perceptiongpt.hub_cards import model_card
    from perceptiongpt.processing.pipeline_visual_grounding import save_grounding_pipeline

    from .hub import push_to_hub

    final = Path(training_args.output_dir) / "final"
    adapter = args.lora != "none"
    if not adapter:  # a full model ships the pipeline (an adapter loads onto a base that does)
        save_grounding_pipeline(trainer.model, final)
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))
    repo_id = training_args.hub_model_id or f"local/{Path(training_args.output_dir).name}"
    training = (
        f"Fine-tuned with `perceptiongpt train` from `{args.model}`: {trainer.state.global_step} steps, batch "
        f"{training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps} accumulated, "
        f"lr {training_args.learning_rate}, LoRA preset `{args.lora}`."
    )
    card = model_card(
        {key.removeprefix("eval_"): value for key, value in metrics.items() if isinstance(value, (int, float))},
        repo_id,
        args.eval_dataset or args.dataset,
        "grounding",
        training,
        f"`{args.dataset}` (split `{args.train_split}`), evaluated by generation on `{args.eval_split or 'validation'}`.",
        split=args.eval_split or "validation",
        base_model=args.model if adapter else None,
        adapter=adapter,
    )
    card.save(str(final / "README.md"))
    if push:
        push_to_hub(final, repo_id, private=bool(training_args.hub_private_repo), token=training_args.hub_token)
    return final


def train_main(argv=None) -> dict:
    """Parses `argv`, trains, saves `OUTPUT_DIR/final`; returns the final evaluation's metrics ({} without one)."""
    from peft import get_peft_model

    from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
    from perceptiongpt.processing.grounding_datasets import check_grounding_rows, encode_grounding_dataset

    from . import PerceptionGPTTrainer, lora_config
    from .cli import _load

    args, training_args = build_train_parser().parse_args_into_dataclasses(args=argv)
    train_rows = grounding_rows(args, args.dataset, args.train_split)
    eval_rows = _evalgrounding_rows(args, training_args)
    check_grounding_rows(train_rows, "train dataset")  # before any model is loaded
    if eval_rows is not None:
        check_grounding_rows(eval_rows, "eval dataset")
    model, processor = _load(args.model)
    if args.image_position is not None:  # the fine-tuned model is saved with the layout it was trained on
        processor.image_position = args.image_position
    collator = DataCollatorForPerceptionGPT(processor)
    with training_args.main_process_first(desc="encoding"):
        train_set = encode_grounding_dataset(train_rows, collator, num_proc=args.num_proc)
    if args.lora != "none":
        model = get_peft_model(model, lora_config(model, preset=args.lora))
    push, training_args.push_to_hub = training_args.push_to_hub, False  # ours pushes the pipeline and card too
    trainer = PerceptionGPTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_rows,
        data_collator=collator,
        processing_class=processor,
        eval_max_new_tokens=args.eval_max_new_tokens,
        heads_learning_rate=args.heads_learning_rate,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_rows is not None else {}
    save_final(trainer, args, training_args, metrics, push)
    return metrics


if __name__ == "__main__":
    sys.exit(train_main())

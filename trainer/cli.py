"""The `perceptiongpt` command: demo, train, eval, predict and app. `perceptiongpt <command> --help` documents each flag."""

import argparse
import json
import sys
from pathlib import Path


IMAGE_POSITIONS = ("first", "after_text")  # templates.IMAGE_POSITIONS; `--help` must not import torch


def _add_demo(sub):
    p = sub.add_parser("demo", help="train the demo preset on synthetic data on CPU, evaluate it, save it")
    p.add_argument("--output", required=True, help="folder for metrics.json, examples.png and model/")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialization and training")


def _add_data_flags(p):
    p.add_argument(
        "--dataset",
        choices=("synthetic", "refcoco-refer", "refcoco-parquet"),
        default="synthetic",
        help="synthetic: the embedded dataset; refcoco-refer: refs(*).p + instances.json; "
        "refcoco-parquet: the HF parquet layout",
    )
    p.add_argument("--data-dir", help="refer layout: folder with refs(*).p and instances.json")
    p.add_argument("--images-dir", help="refer layout: the COCO train2014 image folder")
    p.add_argument("--parquet", nargs="+", help="parquet layout: the parquet files")
    p.add_argument(
        "--split",
        default=None,
        help="split name (synthetic: train/validation/test; RefCOCO: train/val/testA/testB/test)",
    )
    p.add_argument("--task", choices=("rec", "res"), default="rec", help="RefCOCO rows as REC or RES")
    p.add_argument("--num-samples", type=int, default=1000, help="synthetic: rows to generate")
    p.add_argument(
        "--image-position",
        choices=IMAGE_POSITIONS,
        default=None,
        help="put the image before the question (first) or after it (after_text); default: the layout saved with "
        "the model's processor (train: an override is saved with the fine-tuned model)",
    )


def _add_train(sub):
    p = sub.add_parser("train", help="fine-tune a PerceptionGPT folder, or a base VLM, on a supported dataset")
    p.add_argument(
        "--model",
        required=True,
        help="a saved PerceptionGPT folder (model + processor) or repo id, or a base VLM of a supported family "
        "(llava, qwen2_5_vl, idefics3, smolvlm), which gets `<vis>` and fresh heads",
    )
    p.add_argument("--output", required=True, help="output folder (checkpoints and the final model)")
    p.add_argument(
        "--lora",
        choices=("none", "paper", "full"),
        default="none",
        help="PEFT LoRA preset (none = train every weight)",
    )
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (paper: 2e-5)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (paper: 100)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    _add_data_flags(p)


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a PerceptionGPT folder by generation")
    p.add_argument("--model", required=True, help="a saved PerceptionGPT folder or repo id")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per sample")
    p.add_argument("--output", help="optional JSON file for the metrics")
    _add_data_flags(p)


def _add_predict(sub):
    p = sub.add_parser("predict", help="ground a prompt on one image; prints JSON and draws the result")
    p.add_argument("--model", required=True, help="a saved PerceptionGPT folder or repo id")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help='the question, e.g. "Where is the red circle?"')
    p.add_argument("--output", help="PNG with the boxes, masks and labels drawn")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget")
    p.add_argument(
        "--image-position",
        choices=IMAGE_POSITIONS,
        default=None,
        help="where the image goes relative to the question; default: the layout saved with the model's processor",
    )


def _add_app(sub):
    p = sub.add_parser("app", help="an interactive grounding app (Gradio; `pip install perceptiongpt[app]`)")
    p.add_argument("--model", required=True, help="a saved PerceptionGPT folder or repo id, or a base VLM folder")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--share", action="store_true", help="a public Gradio share link (needs the network)")
    p.add_argument("--examples", type=int, default=4, help="held-out synthetic scenes offered as examples")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per answer")


def _app(args):
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from transformers import pipeline

    from perceptiongpt.processing.synthetic import SyntheticConfig, generate_synthetic_samples

    from .app import build_app

    model, processor = _load(args.model)
    pipe = pipeline("visual-grounding", model=model, processor=processor)
    rows = generate_synthetic_samples(SyntheticConfig.demo(), "test", args.examples)
    examples = [(row["image"], row["messages"][0]["content"]) for row in rows]
    app = build_app(pipe, examples, max_new_tokens=args.max_new_tokens)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


def _load(model_ref):
    """A PerceptionGPT folder, or a base VLM of a supported family (`from_base` adds `<vis>` and the heads)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    import perceptiongpt  # registers the Auto classes

    if AutoConfig.from_pretrained(model_ref).model_type in perceptiongpt.SUPPORTED_FAMILIES:
        model, processor = perceptiongpt.from_base(model_ref)
        if processor is None:
            raise SystemExit(f"--model {model_ref}: no processor (tokenizer and image processor) found next to it")
        return model.eval(), processor
    model = AutoModelForImageTextToText.from_pretrained(model_ref).eval()
    return model, AutoProcessor.from_pretrained(model_ref)


def _rows(args, default_split):
    split = args.split or default_split
    if args.dataset == "synthetic":
        from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset

        config = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})
        return build_synthetic_dataset(config, split, args.num_samples)
    from perceptiongpt.processing import refcoco

    if args.dataset == "refcoco-refer":
        if not (args.data_dir and args.images_dir):
            raise SystemExit("--dataset refcoco-refer needs --data-dir and --images-dir")
        return refcoco.load_refcoco_refer(args.data_dir, args.images_dir, split, task=args.task)
    if not args.parquet:
        raise SystemExit("--dataset refcoco-parquet needs --parquet")
    return refcoco.load_refcoco_parquet(args.parquet, split=split, task=args.task)


def _train(args):
    from peft import get_peft_model
    from transformers import TrainingArguments

    from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
    from perceptiongpt.processing.pipeline_visual_grounding import save_grounding_pipeline

    from . import PerceptionGPTTrainer, lora_config

    model, processor = _load(args.model)
    if args.image_position is not None:  # the fine-tuned model is saved with the layout it was trained on
        processor.image_position = args.image_position
    if args.lora != "none":
        model = get_peft_model(model, lora_config(model, preset=args.lora))
    training_args = TrainingArguments(
        output_dir=args.output,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=10,
        save_steps=max(args.steps // 4, 1),
        seed=args.seed,
        remove_unused_columns=False,
        report_to=[],
    )
    trainer = PerceptionGPTTrainer(
        model=model,
        args=training_args,
        train_dataset=_rows(args, "train"),
        data_collator=DataCollatorForPerceptionGPT(processor),
        processing_class=processor,
    )
    trainer.train()
    if args.lora == "none":  # a full model ships the pipeline (an adapter loads onto a base that does)
        save_grounding_pipeline(model, Path(args.output) / "final")
    trainer.save_model(str(Path(args.output) / "final"))
    processor.save_pretrained(str(Path(args.output) / "final"))


def _eval(args):
    from . import evaluate_grounding

    model, processor = _load(args.model)
    result = evaluate_grounding(
        model,
        processor,
        _rows(args, "test"),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        image_position=args.image_position,
        progress=True,
    )
    print(json.dumps(result.metrics, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result.metrics, indent=2))


def _predict(args):
    from PIL import Image

    from .visualize import draw_grounding

    model, processor = _load(args.model)
    image = Image.open(args.image).convert("RGB")
    if args.image_position is not None:
        processor.image_position = args.image_position
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": processor.user_content(args.prompt, image)}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(
        out, [(image.height, image.width)], prompt_length=inputs["input_ids"].shape[1], vis_marker="[obj{index}]"
    )[0]
    masks = result["masks"]
    print(
        json.dumps(
            {
                "text": result["text"],
                "boxes": [[round(v, 2) for v in box] for box in result["boxes"].tolist()],
                "scores": [round(v, 4) for v in result["scores"].tolist()],
                "mask_areas": [] if masks is None else [int(m.sum()) for m in masks],
            }
        )
    )
    if args.output:
        labels = [f"obj{i + 1} {s:.2f}" for i, s in enumerate(result["scores"].tolist())]
        draw_grounding(image, result["boxes"].tolist(), None if masks is None else masks.numpy(), labels).save(
            args.output
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceptiongpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_eval, _add_predict, _add_app):
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        print(json.dumps(run_demo(args.output, steps=args.steps, seed=args.seed), indent=2))
    else:
        {"train": _train, "eval": _eval, "predict": _predict, "app": _app}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

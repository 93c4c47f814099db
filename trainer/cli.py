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
        default="synthetic",
        help="synthetic: the embedded dataset; refcoco-refer: refs(*).p + instances.json; refcoco-parquet: the HF "
        "parquet layout; or anything `datasets` loads in the grounding schema (Hub id, save_to_disk folder, "
        ".jsonl/.json/.parquet/.csv file)",
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
        "the model's processor",
    )


def _add_train(sub):
    # parsed by `train_cli` (HfArgumentParser: every TrainingArguments flag); listed here for `perceptiongpt --help`
    sub.add_parser(
        "train",
        help="fine-tune a PerceptionGPT folder, or a base VLM, on any grounding dataset; "
        "`perceptiongpt train --help` lists every flag, TrainingArguments' included",
        add_help=False,
    )


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a PerceptionGPT folder by generation")
    p.add_argument("--model", required=True, help="a saved PerceptionGPT folder or repo id")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per sample")
    p.add_argument("--output", help="optional JSON file for the metrics")
    p.add_argument(
        "--rec-protocol",
        choices=("standard", "strict"),
        default="standard",
        help="REC hits: IoU >= 0.5 on boxes clipped to the image (standard), or the papers' IoU > 0.5 on boxes as "
        "predicted (strict)",
    )
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
    from .train_cli import GroundingTrainingArguments, grounding_rows

    data = GroundingTrainingArguments(
        model=args.model,
        dataset=args.dataset,
        num_samples=args.num_samples,
        data_dir=args.data_dir,
        images_dir=args.images_dir,
        parquet=args.parquet,
        refcoco_task=args.task,
    )
    return grounding_rows(data, args.dataset, args.split or default_split)


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
        rec_protocol=args.rec_protocol,
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train_cli import train_main

        train_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        print(json.dumps(run_demo(args.output, steps=args.steps, seed=args.seed), indent=2))
    else:
        {"eval": _eval, "predict": _predict, "app": _app}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

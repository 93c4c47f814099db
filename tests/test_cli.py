"""The demo pipeline and the `perceptiongpt` command, end to end on a very short run."""

import json
import subprocess

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from perceptiongpt.trainer.cli import main
from perceptiongpt.trainer.demo import DemoRecipe, run_demo


METRIC_KEYS = {
    "rec_acc@0.5",
    "rec_acc@0.5_blind",
    "rec_miou",
    "res_ciou",
    "res_giou",
    "steps",
    "train_seconds",
    "steps_per_second",
    "eval_seconds",
    "n_eval_rec",
    "n_eval_res",
    "n_eval_reg",
    "n_eval_reg_mask",
    "n_eval_multi",
    "reg_acc",
    "reg_attr_acc",
    "reg_acc_blind",
    "reg_mask_acc",
    "reg_mask_attr_acc",
    "reg_mask_acc_blind",
    "multi_f1",
    "multi_precision",
    "multi_recall",
    "multi_pred_count",
    "multi_true_count",
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    run_demo(output, recipe=DemoRecipe(steps=2, train_size=32, eval_size=8, batch_size=4))
    return output


def test_demo_writes_metrics_examples_and_model(demo_dir):
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == 2 and metrics["n_eval_rec"] == 8 and metrics["n_eval_res"] == 8
    assert metrics["n_eval_reg"] + metrics["n_eval_reg_mask"] == 8 and metrics["n_eval_multi"] == 8
    assert min(metrics["n_eval_reg"], metrics["n_eval_reg_mask"]) >= 1  # box and mask prompts are both measured
    rates = ("rec_acc@0.5", "rec_acc@0.5_blind", "res_ciou", "res_giou", "reg_acc", "reg_mask_acc_blind", "multi_f1")
    assert all(0.0 <= metrics[k] <= 1.0 for k in rates)
    assert metrics["multi_true_count"] >= 2  # a multi answer grounds several objects
    assert Image.open(demo_dir / "examples.png").size[0] > 0
    card = ModelCard.load(demo_dir / "model" / "README.md")
    assert "custom_code" in card.data.tags and card.data.eval_results[0].metric_value == metrics["rec_acc@0.5"]
    assert (demo_dir / "model" / "modeling_perceptiongpt.py").exists()
    assert (demo_dir / "model" / "pipeline_visual_grounding.py").exists()  # the visual-grounding pipeline ships
    assert "visual-grounding" in json.loads((demo_dir / "model" / "config.json").read_text())["custom_pipelines"]
    assert (demo_dir / "model" / "processing_perceptiongpt.py").exists()


def test_predict_prints_json_and_draws(demo_dir, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (80, 60), (30, 120, 200)).save(image_path)
    main(
        [
            "predict",
            "--model",
            str(demo_dir / "model"),
            "--image",
            str(image_path),
            "--prompt",
            "Where is the red circle?",
            "--output",
            str(tmp_path / "drawn.png"),
            "--max-new-tokens",
            "4",
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"text", "boxes", "scores", "mask_areas"}
    assert len(result["boxes"]) == len(result["scores"])
    for x1, y1, x2, y2 in result["boxes"]:
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 60
    assert Image.open(tmp_path / "drawn.png").size == (80, 60)


def test_eval_command_reports_metrics(demo_dir, tmp_path, capsys):
    main(
        [
            "eval",
            "--model",
            str(demo_dir / "model"),
            "--num-samples",
            "8",
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "m.json"),
        ]
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_eval_rec"] + metrics["n_eval_res"] == 8


def test_help_documents_every_flag():
    import argparse

    from perceptiongpt.trainer.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"demo", "train", "eval", "predict", "app"}
    for name, command in commands.items():
        if name == "train":  # its own HfArgumentParser: tests/test_train_cli.py checks its --help
            continue
        flags = [a for a in command._actions if a.option_strings and a.dest != "help"]
        assert flags and all(a.help for a in flags), name
    result = subprocess.run(["perceptiongpt", "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--prompt" in result.stdout

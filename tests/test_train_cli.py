"""`perceptiongpt train` on your own data: HfArgumentParser flags, any `datasets` source, encoding through
`datasets.map`, evaluation by generation, resume, and a malformed row refused before training."""

import json
import shutil
import subprocess

import pytest
import torch
from test_pipeline import _saved

from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.grounding_datasets import encode_grounding_dataset, load_grounding_dataset
from perceptiongpt.processing.synthetic import SyntheticConfig, generate_synthetic_samples
from perceptiongpt.trainer.train_cli import train_main


def _write_jsonl(folder, count=8, broken=None):
    """Synthetic REC/RES rows as a JSON-lines file with images on disk under relative paths."""
    (folder / "images").mkdir(parents=True)
    config = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})
    lines = []
    for index, row in enumerate(generate_synthetic_samples(config, "train", count)):
        row["image"].save(folder / "images" / f"{index}.png")
        row = {**row, "image": f"images/{index}.png"}
        if index == broken:
            row["boxes"] = [row["boxes"][0][:3]]
        lines.append(json.dumps(row))
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(model, data, output, *extra):
    return train_main(
        ["--model", str(model), "--dataset", str(data), "--output_dir", str(output), "--max_steps", "20"]
        + ["--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--warmup_steps", "0", "--seed", "0"]
        + ["--use_cpu", "true", *extra]
    )


def test_train_on_a_jsonl_file_evaluates_resumes_and_writes_a_card(tmp_path):
    _, _, model = _saved(tmp_path)
    data = _write_jsonl(tmp_path / "data")
    output = tmp_path / "out"
    evaluation = ["--eval_strategy", "steps", "--eval_steps", "10", "--eval_split", "train", "--max_eval_samples", "4"]
    metrics = _train(model, data, output, "--save_steps", "10", "--logging_steps", "1", *evaluation)
    assert 0.0 <= metrics["eval_rec_acc@0.5"] <= 1.0 and "eval_res_giou" in metrics
    state = json.loads((output / "checkpoint-20" / "trainer_state.json").read_text())
    evaluated = [entry["step"] for entry in state["log_history"] if "eval_rec_acc@0.5" in entry]
    assert evaluated == [10, 20]
    card = (output / "final" / "README.md").read_text()
    assert f"{metrics['eval_rec_acc@0.5']:.3f}"[:4] in card and "perceptiongpt train" in card
    assert (output / "final" / "pipeline_visual_grounding.py").is_file()
    losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-10", resumed / "checkpoint-10")
    saved_state = resumed / "checkpoint-10" / "trainer_state.json"  # marked: only a resumed run keeps the mark
    marked = json.loads(saved_state.read_text())
    marked["log_history"][0]["marker"] = "from checkpoint-10"
    saved_state.write_text(json.dumps(marked))
    _train(model, data, resumed, "--save_steps", "10", "--logging_steps", "1",
           "--resume_from_checkpoint", str(resumed / "checkpoint-10"))  # fmt: skip
    again = json.loads((resumed / "checkpoint-20" / "trainer_state.json").read_text())
    resumed_losses = {entry["step"]: entry["loss"] for entry in again["log_history"] if "loss" in entry}
    assert again["global_step"] == 20 and again["log_history"][0]["marker"] == "from checkpoint-10"
    assert [resumed_losses[step] for step in range(11, 21)] == pytest.approx(
        [losses[step] for step in range(11, 21)], rel=1e-4
    )


def test_a_malformed_row_is_refused_with_its_index_before_training(tmp_path):
    data = _write_jsonl(tmp_path / "data", count=6, broken=3)
    with pytest.raises(ValueError, match=r"Row 3 of `train dataset`: `boxes\[0\]` must be 4 finite numbers"):
        _train(tmp_path / "no-model-needed", data, tmp_path / "out")


def test_csv_columns_map_onto_the_schema_and_save_to_disk_loads(tmp_path):
    import datasets

    data = _write_jsonl(tmp_path / "data", count=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    csv = tmp_path / "data" / "rows.csv"
    datasets.Dataset.from_list(
        [{"img": r["image"], "chat": json.dumps(r["messages"]), "boxes": json.dumps(r["boxes"])} for r in rows]
    ).to_csv(str(csv))
    loaded = load_grounding_dataset(str(csv), columns={"image": "img", "messages": "chat"})
    assert loaded[0]["messages"] == rows[0]["messages"] and loaded[0]["boxes"] == rows[0]["boxes"]
    assert loaded[0]["image"].size == (64, 64) and loaded[0]["task"] == "rec" and loaded[0]["masks"] is None
    with pytest.raises(ValueError, match=r"has no column \['picture'\]"):
        load_grounding_dataset(str(csv), columns={"image": "picture"})
    load_grounding_dataset(str(data)).save_to_disk(str(tmp_path / "saved"))
    saved = load_grounding_dataset(str(tmp_path / "saved"))
    assert saved[2]["boxes"] == rows[2]["boxes"] and saved[2]["masks"] == rows[2]["masks"]


def test_encoded_rows_pad_exactly_as_raw_rows(tmp_path):
    """`datasets.map` encoding (masks on some rows only) then padding == the collator on the raw rows."""
    _, processor, _ = _saved(tmp_path)
    rows = load_grounding_dataset(str(_write_jsonl(tmp_path / "data", count=6)))
    assert {row["task"] for row in rows} == {"rec", "res"}
    collator = DataCollatorForPerceptionGPT(processor)
    encoded = encode_grounding_dataset(rows, collator)
    raw, fast = collator(list(rows)), collator(list(encoded))
    assert raw.keys() == fast.keys() and "vis_masks" in raw
    for key in raw:
        assert raw[key].dtype == fast[key].dtype and torch.equal(raw[key].nan_to_num(-7), fast[key].nan_to_num(-7)), (
            key
        )
    only_rec = [row for row in encoded if not row["vis_mask_valid"].any()]
    assert "vis_masks" not in collator(only_rec)  # a maskless batch stays maskless


def test_help_lists_the_training_arguments():
    result = subprocess.run(["perceptiongpt", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--model_name_or_path", "--dataset", "--image_column", "--bf16", "--gradient_accumulation_steps",
                 "--eval_strategy", "--resume_from_checkpoint", "--push_to_hub", "--report_to", "--lora"):  # fmt: skip
        assert flag in result.stdout, flag


def test_heads_learning_rate_flag_reaches_the_optimizer(tmp_path):
    """`--heads_learning_rate`: one Adam step moves the heads by about 1e-2 and the rest by about 1e-3."""
    from safetensors.torch import load_file

    _, _, model = _saved(tmp_path)
    data = _write_jsonl(tmp_path / "data")
    output = tmp_path / "out"
    _train(model, data, output, "--max_steps", "1", "--heads_learning_rate", "1e-2", "--weight_decay", "0",
           "--lr_scheduler_type", "constant")  # fmt: skip
    before, after = load_file(model / "model.safetensors"), load_file(output / "final" / "model.safetensors")
    moved = {name: float((after[name] - before[name]).abs().max()) for name in before}
    heads = [m for n, m in moved.items() if n.split(".")[0] in ("box_decoder", "mask_decoder", "box_encoder")]
    others = [m for n, m in moved.items() if n.startswith("model.language_model")]
    assert max(heads) == pytest.approx(1e-2, rel=0.02) and max(others) == pytest.approx(1e-3, rel=0.02)

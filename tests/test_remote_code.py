"""A saved folder (and a Hub-style offline cache) loads with trust_remote_code=True in a process that cannot
import perceptiongpt, and gives the in-package model's logits to rounding."""

import json
import shutil
import subprocess
import sys
import textwrap

import torch
from conftest import BLOCK_PACKAGE, CROSS_PROCESS_TOLERANCE, make_batch, subprocess_env


LOAD_AND_RUN = BLOCK_PACKAGE + textwrap.dedent(
    """
    from transformers import AutoModelForImageTextToText
    try:
        import perceptiongpt
        raise SystemExit("the package must not be importable here")
    except ImportError:
        pass
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    torch.save({"logits": logits, "sequences": out.sequences, "boxes": out.pred_boxes}, sys.argv[3])
    """
)


def _run_isolated(tmp_path, model_ref, env_extra=None):
    ids, pixels = make_batch(vis_at=((20,), (20, 25)))
    boxes = torch.full((2, 2, 4), float("nan"))
    boxes[1, 1] = torch.tensor([0.2, 0.2, 0.6, 0.9])
    inputs = {"input_ids": ids, "pixel_values": pixels, "vis_boxes": boxes}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = subprocess_env(**(env_extra or {}))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, model_ref, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return inputs, torch.load(tmp_path / "out.pt")


def _expected(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    return logits, out


def test_saved_folder_writes_code_and_auto_map(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_perceptiongpt.PerceptionGPTConfig",
        "AutoModelForImageTextToText": "modeling_perceptiongpt.PerceptionGPTForConditionalGeneration",
    }
    copied = {p.name for p in (tmp_path / "model").glob("*.py")}
    assert {
        "modeling_perceptiongpt.py",
        "configuration_perceptiongpt.py",
        "generation_perceptiongpt.py",
        "generation_state_perceptiongpt.py",
        "heads_perceptiongpt.py",
        "mask_decoder_perceptiongpt.py",
        "region_inputs.py",
        "box_ops.py",
    } <= copied
    assert "__init__.py" not in copied


def test_remote_code_from_folder_matches_package(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    inputs, remote = _run_isolated(tmp_path, str(tmp_path / "model"))
    logits, out = _expected(tiny_model, inputs)
    torch.testing.assert_close(remote["logits"], logits, **CROSS_PROCESS_TOLERANCE)
    assert torch.equal(remote["sequences"], out.sequences)
    assert len(remote["boxes"]) == len(out.pred_boxes)
    for a, b in zip(remote["boxes"], out.pred_boxes):
        torch.testing.assert_close(a, b, **CROSS_PROCESS_TOLERANCE)


def test_remote_code_from_offline_hub_cache(tiny_model, tmp_path):
    """The repo id `perception/tiny` resolves from a Hub cache layout, with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--perception--tiny"
    tiny_model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    inputs, remote = _run_isolated(tmp_path, "perception/tiny", {"HF_HOME": str(tmp_path / "hf_home")})
    logits, _ = _expected(tiny_model, inputs)
    torch.testing.assert_close(remote["logits"], logits, **CROSS_PROCESS_TOLERANCE)
    shutil.rmtree(tmp_path / "hf_home")


def test_in_package_auto_classes(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    import perceptiongpt

    tiny_model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is perceptiongpt.PerceptionGPTConfig
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model) is perceptiongpt.PerceptionGPTForConditionalGeneration


def test_remote_code_refuses_an_unsupported_transformers_version(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    script = BLOCK_PACKAGE + textwrap.dedent(
        """
        import importlib.metadata
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "4.57.1" if name == "transformers" else real(name)
        from transformers import AutoModelForImageTextToText
        try:
            AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ImportError as error:
            print("REFUSED", error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model")],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "transformers>=5.24,<6 is required" in result.stdout, result.stdout
    assert "transformers==4.57.1" in result.stdout

"""Hub sharing end to end, offline: pushes go through huggingface_hub's API into a fake HfApi whose commits land in a
folder laid out as the Hub cache; a fresh process without the package then loads the repo ids with HF_HUB_OFFLINE=1."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from conftest import BLOCK_PACKAGE, CROSS_PROCESS_TOLERANCE, subprocess_env
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, TrainingArguments

from perceptiongpt import PerceptionGPTForConditionalGeneration
from perceptiongpt.hub_cards import TAGS, dataset_card, model_card, retarget_model_card
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.tokenization_factory import build_tokenizer
from perceptiongpt.trainer import PerceptionGPTTrainer
from perceptiongpt.trainer.hub import load_adapter, push_to_hub
from perceptiongpt.trainer.peft_recipe import lora_config


PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PROMPT = "Where is the red circle?"
DEMO_METRICS = {
    "rec_acc@0.5": 0.625,
    "rec_acc@0.5_blind": 0.125,
    "rec_miou": 0.5512,
    "res_ciou": 0.4,
    "res_giou": 0.375,
    "steps": 3000,
    "n_eval_rec": 200,
}


class FolderHubApi(HfApi):
    """The network half of HfApi, replaced by a folder: ROOT/models--org--name/{blobs/<sha256>, snapshots/<commit>/
    (symlinks to blobs), refs/<branch>}, the layout hf_hub_download reads in offline mode."""

    def __init__(self, root: Path):
        super().__init__(token=False)
        self.root, self.commits = root, []

    def _repo(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def _head(self, repo_id: str, branch: str) -> str | None:
        ref = self._repo(repo_id) / "refs" / branch
        return ref.read_text() or None if ref.is_file() else None

    def _files(self, repo_id: str, commit: str | None) -> dict[str, Path]:
        snapshot = self._repo(repo_id) / "snapshots" / str(commit)
        return {p.relative_to(snapshot).as_posix(): p.resolve() for p in snapshot.rglob("*") if p.is_file()}

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        refs = self._repo(repo_id) / "refs"
        if refs.exists() and not exist_ok:
            raise ValueError(f"{repo_id} exists")
        refs.mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, revision=None, token=None, repo_type=None, exist_ok=False):
        ref = self._repo(repo_id) / "refs" / branch
        if ref.exists() and not exist_ok:
            raise ValueError(f"branch {branch} exists")
        if not ref.exists():
            ref.write_text(self._head(repo_id, revision or "main") or "")

    def _validate_yaml(self, content, *, repo_type=None, token=None):
        ModelCard(content)  # the server's check of the README metadata, done here: the YAML must parse

    def list_repo_files(self, repo_id, *, revision=None, repo_type=None, token=None):
        return sorted(self._files(repo_id, self._head(repo_id, revision or "main")))

    def create_commit(
        self,
        repo_id,
        operations,
        *,
        commit_message,
        commit_description=None,
        token=None,
        repo_type=None,
        revision=None,
        create_pr=None,
        parent_commit=None,
        **kwargs,
    ):
        repo, branch = self._repo(repo_id), revision or "main"
        if not (repo / "refs").is_dir() or (branch != "main" and not (repo / "refs" / branch).is_file()):
            raise ValueError(f"{repo_id}@{branch} does not exist: create the repo and the branch first")
        parent = self._head(repo_id, branch)
        files = self._files(repo_id, parent)
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                files = {p: b for p, b in files.items() if p != op.path_in_repo and not p.startswith(op.path_in_repo)}
            elif isinstance(op, CommitOperationAdd):
                with op.as_file() as file:
                    data = file.read()
                files[op.path_in_repo] = repo / "blobs" / hashlib.sha256(data).hexdigest()
                files[op.path_in_repo].parent.mkdir(parents=True, exist_ok=True)
                files[op.path_in_repo].write_bytes(data)
            else:
                raise TypeError(f"unsupported operation {type(op).__name__}")
        oid = hashlib.sha1(repr((parent, commit_message, sorted((p, b.name) for p, b in files.items()))).encode())
        oid = oid.hexdigest()
        for path, blob in files.items():
            link = repo / "snapshots" / oid / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs" / branch).write_text(oid)
        self.commits.append({"repo": repo_id, "branch": branch, "message": commit_message, "files": sorted(files)})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=commit_message,
            commit_description=commit_description or "",
            oid=oid,
        )

    def snapshot(self, repo_id: str, revision: str = "main") -> Path:
        commit = revision if len(revision) == 40 else self._head(repo_id, revision)
        return self._repo(repo_id) / "snapshots" / commit


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub, wired in everywhere: transformers' shared HfApi, and the cache that offline loading reads."""
    api = FolderHubApi(tmp_path / "hf_home" / "hub")
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", api)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(api.root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # the folder has no Xet storage: `upload_folder` takes its single-commit path (the one without hf_xet installed)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    return api


@pytest.fixture
def processor():
    return build_processor(16, 4, 16, build_tokenizer("char"))


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _predict(model, processor, image) -> dict:
    """The card's usage snippet: chat template, generate, post-process."""
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image", "image": image}]}]
    inputs = processor.apply_chat_template(
        [messages], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(
        out, image_sizes=[(image.height, image.width)], prompt_length=inputs["input_ids"].shape[1]
    )[0]
    return {"sequence": out.sequences[0].tolist(), "boxes": result["boxes"].tolist(), "text": result["text"]}


def _pushed_files(api, repo_id, revision="main") -> set[str]:
    snapshot = api.snapshot(repo_id, revision)
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")}


def _demo_folder(model, processor, folder: Path) -> Path:
    """A folder like the demo's DIR/model/: model, processor and a card written for `perceptiongpt/demo`."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model_card(
        DEMO_METRICS,
        "perceptiongpt/demo",
        "PerceptionGPT synthetic (demo)",
        "perceptiongpt-synthetic",
        "3000 steps on CPU.",
        "The embedded synthetic set.",
    ).save(str(folder / "README.md"))
    return folder


_REMOTE = BLOCK_PACKAGE + textwrap.dedent(
    """
    import json
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    spec = json.loads(sys.argv[1])
    image, results = Image.open(spec["image"]), {}
    for repo_id, revision in spec["loads"]:
        model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True, revision=revision).eval()
        processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True, revision=revision)
        content = [{"type": "text", "text": spec["prompt"]}, {"type": "image", "image": image}]
        messages = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template([messages], add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        result = processor.post_process_generation(out, image_sizes=[(image.height, image.width)],
                                                   prompt_length=inputs["input_ids"].shape[1])[0]
        results[repo_id] = {"module": type(model).__module__, "sequence": out.sequences[0].tolist(),
                            "boxes": result["boxes"].tolist(), "text": result["text"]}
    print(json.dumps(results))
    """
)

_REMOTE_PICKLED = BLOCK_PACKAGE + textwrap.dedent(
    """
    from transformers import AutoModelForImageTextToText
    try:
        AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
        print("loaded")
    except OSError as error:
        print("refused:", error)
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True, use_safetensors=False)
    print("opt-in:", type(model).__module__.split(".")[0])
    """
)


def _run(tmp_path, script, *args) -> str:
    env = subprocess_env(HF_HOME=str(tmp_path / "hf_home"))
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_pushed_repos_load_by_repo_id_without_the_package(tiny_model, processor, hub, tmp_path):
    # The helper: model, processor, code and card in ONE commit, from the demo's folder layout.
    commit = push_to_hub(_demo_folder(tiny_model, processor, tmp_path / "demo"), "org/tiny", api=hub)
    assert (
        len(hub.commits) == 1 and hub.commits[0]["message"] == "Upload PerceptionGPT model, processor, code and card"
    )
    helper_files = _pushed_files(hub, "org/tiny", commit.oid)
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "modeling_perceptiongpt.py",
        "processing_perceptiongpt.py",
        "region_geometry.py",
    } <= helper_files
    # transformers' own push_to_hub: one commit each for the model and the processor.
    tiny_model.push_to_hub("org/tiny-native", tags=TAGS)
    processor.push_to_hub("org/tiny-native")
    assert [c["repo"] for c in hub.commits[1:]] == ["org/tiny-native", "org/tiny-native"]
    assert helper_files - {"README.md"} == _pushed_files(hub, "org/tiny-native") - {"README.md"}
    for files in (helper_files, _pushed_files(hub, "org/tiny-native")):
        assert not [f for f in files if f.endswith(PICKLES)]
    image = _image()
    image.save(tmp_path / "image.png")
    spec = {
        "image": str(tmp_path / "image.png"),
        "prompt": PROMPT,
        "loads": [["org/tiny", commit.oid], ["org/tiny-native", "main"]],
    }
    remote = json.loads(_run(tmp_path, _REMOTE, json.dumps(spec)).strip().splitlines()[-1])
    expected = _predict(tiny_model, processor, image)
    assert len(expected["boxes"]) > 0
    for repo_id in ("org/tiny", "org/tiny-native"):
        assert remote[repo_id]["module"].startswith("transformers_modules")
        assert remote[repo_id]["sequence"] == expected["sequence"] and remote[repo_id]["text"] == expected["text"]
        boxes = torch.tensor(remote[repo_id]["boxes"])
        torch.testing.assert_close(boxes, torch.tensor(expected["boxes"]), **CROSS_PROCESS_TOLERANCE)


def test_remote_code_refuses_pickled_weights_unless_asked(tiny_model, tmp_path):
    """A cached repo with `pytorch_model.bin` only: its own remote code refuses it by default."""
    repo = tmp_path / "hf_home" / "hub" / "models--org--pickled"
    snapshot = repo / "snapshots" / ("f" * 40)
    tiny_model.save_pretrained(snapshot)
    (snapshot / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), snapshot / "pytorch_model.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("f" * 40)
    lines = _run(tmp_path, _REMOTE_PICKLED, "org/pickled").strip().splitlines()
    assert lines[-2].startswith("refused: 'org/pickled' has no safetensors weights")
    assert "pass `use_safetensors=False`" in lines[-2]
    assert lines[-1] == "opt-in: transformers_modules"


def test_helper_card_points_at_the_target_repo(tiny_model, processor, hub, tmp_path):
    folder = _demo_folder(tiny_model, processor, tmp_path / "demo")
    push_to_hub(folder, "org/grounder", revision="v1", api=hub)
    assert hub.commits[-1]["branch"] == "v1" and hub._head("org/grounder", "main") is None
    card = ModelCard.load(hub.snapshot("org/grounder", "v1") / "README.md")
    assert set(TAGS) <= set(card.data.tags) and card.data.pipeline_tag == "image-text-to-text"
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"REC Acc@0.5": 0.625, "REC mIoU": 0.5512, "RES cIoU": 0.4, "RES gIoU": 0.375}
    assert card.data.eval_results[0].dataset_split == "test" and card.data.model_name == "grounder"
    assert 'from_pretrained("org/grounder", trust_remote_code=True, revision=revision)' in card.text
    assert 'revision = "v1"' in card.text and "perceptiongpt/demo" not in card.text
    assert "| REC Acc@0.5, expressions shuffled across images (control) | 0.1250 |" in card.text
    assert "pixel xyxy `[x1, y1, x2, y2]` on the ORIGINAL image" in card.text
    assert "3000 steps on CPU." in card.text and "The embedded synthetic set." in card.text
    assert (folder / "README.md").read_text().count("perceptiongpt/demo") == 3  # the source folder is untouched


def test_helper_from_trainer_with_real_evaluation(tiny_model, processor, hub, tmp_path):
    config = SyntheticConfig(**{**dataclasses.asdict(SyntheticConfig.demo()), "tasks": ("rec", "res")})
    rows = build_synthetic_dataset(config, "train", 4, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        per_device_eval_batch_size=4,
        remove_unused_columns=False,
        learning_rate=1e-3,
    )
    trainer = PerceptionGPTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=DataCollatorForPerceptionGPT(processor),
        processing_class=processor,
        eval_max_new_tokens=4,
    )
    metrics = trainer.evaluate()
    commit = push_to_hub(trainer, "org/trained", api=hub)
    files = _pushed_files(hub, "org/trained", commit.oid)
    assert {"model.safetensors", "processor_config.json", "modeling_perceptiongpt.py"} <= files
    assert not [f for f in files if f.endswith(PICKLES)]  # no training_args.bin
    card = ModelCard.load(hub.snapshot("org/trained") / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics["eval_n_eval_rec"] + metrics["eval_n_eval_res"] == 4
    assert results == {
        "REC Acc@0.5": metrics["eval_rec_acc@0.5"],
        "REC Acc@0.75": metrics["eval_rec_acc@0.75"],
        "REC mIoU": metrics["eval_rec_miou"],
        "RES cIoU": metrics["eval_res_ciou"],
        "RES gIoU": metrics["eval_res_giou"],
    }
    counts = {task: list(rows["task"]).count(task) for task in sorted(set(rows["task"]))}
    assert f"4 training rows ({', '.join(f'{t}: {n}' for t, n in counts.items())})." in card.text
    assert "lr 0.001" in card.text and "Loss: LM + 1.0 L1 + 1.0 GIoU on boxes" in card.text


def test_lora_adapter_pushed_alone_loads_onto_its_base(tiny_model, processor, hub, tmp_path):
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    def fresh_base():
        base = PerceptionGPTForConditionalGeneration(tiny_model.config).eval()
        base.load_state_dict(base_state)
        return base

    peft_model = get_peft_model(tiny_model, lora_config(tiny_model))
    with torch.no_grad():  # LoRA B starts at zero: move every trained tensor so that the adapter matters
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval()
    peft_model.push_to_hub("org/adapter")
    peft_model.save_pretrained(tmp_path / "adapter")
    commit = push_to_hub(tmp_path / "adapter", "org/adapter-helper", api=hub, card={"base_model": "org/tiny"})
    assert _pushed_files(hub, "org/adapter") >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "model.safetensors" not in _pushed_files(hub, "org/adapter-helper")
    card = ModelCard.load(hub.snapshot("org/adapter-helper") / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny" and "lora" in card.data.tags
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer = PerceptionGPTTrainer(model=peft_model, args=args, processing_class=processor)
    push_to_hub(trainer, "org/adapter-trainer", api=hub)
    files = _pushed_files(hub, "org/adapter-trainer")
    assert {"adapter_model.safetensors", "processor_config.json"} <= files and "model.safetensors" not in files
    text = (hub.snapshot("org/adapter-trainer") / "README.md").read_text()
    assert "LoRA r=16, alpha=64, dropout=0.1" in text
    assert 'PeftModel.from_pretrained(base, "org/adapter-trainer", revision="main")' in text

    ids = torch.randint(10, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    ids[:, 2:18] = 4
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        expected, plain = peft_model(**inputs).logits, fresh_base()(**inputs).logits
        by_repo_id = PeftModel.from_pretrained(fresh_base(), "org/adapter").eval()(**inputs).logits
        pinned = load_adapter(fresh_base(), "org/adapter-helper", revision=commit.oid).eval()(**inputs).logits
    assert torch.equal(by_repo_id, expected) and torch.equal(pinned, expected)
    assert (expected - plain).abs().max() > 0.1


def _pickled_adapter(model, folder: Path) -> Path:
    """An adapter folder with `adapter_model.bin` (a torch.save pickle) instead of safetensors."""
    from safetensors.torch import load_file

    get_peft_model(model, lora_config(model)).save_pretrained(folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return folder


def test_push_uploads_no_pickles(tiny_model, processor, hub, tmp_path):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"Trainer bookkeeping: skipped, not refused")
    hub.create_repo("org/m")
    hub.create_commit(
        "org/m",
        [CommitOperationAdd(path_in_repo="pytorch_model.bin", path_or_fileobj=b"stale")],
        commit_message="an old pickled upload",
    )
    push_to_hub(folder, "org/m", api=hub)
    assert hub.commits[-1]["files"] == sorted(_pushed_files(hub, "org/m"))
    assert not [f for f in _pushed_files(hub, "org/m") if f.endswith(PICKLES)]  # the stale pickle is deleted
    torch.save(tiny_model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Refusing to push pickled files \['pytorch_model.bin'\]"):
        push_to_hub(folder, "org/m", api=hub)
    with pytest.raises(ValueError, match=r"Refusing to push pickled files \['adapter_model.bin'\]"):
        push_to_hub(_pickled_adapter(tiny_model, tmp_path / "adapter"), "org/a", api=hub)
    assert len(hub.commits) == 2


def test_model_loading_refuses_pickled_weights_unless_asked(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    for loader in (PerceptionGPTForConditionalGeneration, AutoModelForImageTextToText):
        with pytest.raises(OSError, match=r"has no safetensors weights .* pass `use_safetensors=False`"):
            loader.from_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, use_safetensors=False)
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_adapter_loading_refuses_pickled_weights_unless_asked(tiny_model, tmp_path):
    base = PerceptionGPTForConditionalGeneration(tiny_model.config)
    folder = _pickled_adapter(tiny_model, tmp_path / "adapter")
    with pytest.raises(OSError, match=r"has no `adapter_model.safetensors`.* pass `use_safetensors=False`"):
        load_adapter(base, folder)
    with pytest.raises(TypeError, match="`use_safetensors` must be True or False, got None"):
        load_adapter(base, folder, use_safetensors=None)
    assert isinstance(load_adapter(base, folder, use_safetensors=False), PeftModel)


def test_helper_rejects_bad_arguments(tiny_model, hub, tmp_path):
    tiny_model.save_pretrained(tmp_path / "no_processor")
    with pytest.raises(ValueError, match="no `processor_config.json`"):
        push_to_hub(tmp_path / "no_processor", "org/x", api=hub)
    with pytest.raises(ValueError, match="`repo_id` must be 'name' or 'namespace/name', got 'a/b/c'"):
        push_to_hub(tmp_path / "no_processor", "a/b/c", api=hub)
    with pytest.raises(TypeError, match="`trainer_or_dir` must be a Trainer or a folder path, got int"):
        push_to_hub(3, "org/x", api=hub)
    with pytest.raises(ValueError, match="must be an existing folder"):
        push_to_hub(tmp_path / "missing", "org/x", api=hub)
    assert hub.commits == []


def test_model_card_fields_and_validation():
    card = model_card(
        {"rec_acc@0.5": 0.5, "res_ciou": math.nan, "steps": 7},
        "org/m",
        "set",
        "org/set",
        "T",
        "D",
        datasets=["org/set"],
    )
    parsed = ModelCard(card.content)  # the YAML front matter round-trips
    assert [(r.metric_name, r.metric_value) for r in parsed.data.eval_results] == [("REC Acc@0.5", 0.5)]
    assert parsed.data.datasets == ["org/set"] and parsed.data.library_name == "transformers"
    assert "| RES cIoU | n/a |" in card.text and "| training steps | 7 |" in card.text
    with pytest.raises(TypeError, match=r"`metrics` must be a mapping of metric name to number, got list"):
        model_card([0.5], "org/m", "set", "org/set", "T", "D")
    with pytest.raises(TypeError, match=r"`metrics\['rec_miou'\]` must be a number, got '0.5'"):
        model_card({"rec_miou": "0.5"}, "org/m", "set", "org/set", "T", "D")
    with pytest.raises(TypeError, match="`training` must be a non-empty string, got ''"):
        model_card({}, "org/m", "set", "org/set", "", "D")
    moved = retarget_model_card(ModelCard(card.content), "me/copy", "v2")
    assert '"me/copy"' in moved.text and '"org/m"' not in moved.text and 'revision = "v2"' in moved.text
    assert moved.data.model_name == "copy" and moved.text.count("# copy\n") == 1
    assert retarget_model_card(ModelCard("---\ntags: []\n---\nplain"), "me/copy").text == "plain"


def test_dataset_card_counts_the_real_rows():
    config = SyntheticConfig.demo()
    splits = {
        "train": build_synthetic_dataset(config, "train", 6, seed=1),
        "test": list(build_synthetic_dataset(config, "test", 3, seed=1)),
    }
    card = dataset_card(splits, config, seed=1, repo_id="org/synthetic")
    assert card.data.size_categories == ["n<1K"] and "visual-grounding" in card.data.tags
    for name, rows in splits.items():
        tasks = [row["task"] for row in rows]
        cells = [str(tasks.count(task)) for task in config.tasks]
        n_vis = sum(len(row["boxes"]) for row in rows) / len(rows)
        with_masks = sum(any(m is not None for m in row["masks"] or []) for row in rows)
        assert f"| {name} | {len(rows)} | {' | '.join(cells)} | {n_vis:.2f} | {with_masks} |" in card.text
    assert 'train = build_synthetic_dataset(config, "train", 6, seed=1)' in card.text
    assert "image_size=64," in card.text and 'load_dataset("org/synthetic", revision="main")' in card.text
    with pytest.raises(ValueError, match=r"`splits\['train'\]\[0\]` differs from the row that `config` and seed=2"):
        dataset_card(splits, config, seed=2)
    with pytest.raises(TypeError, match="`config` must be a SyntheticConfig, got dict"):
        dataset_card(splits, {"image_size": 64})


def test_train_cli_pushes_the_final_folder_with_its_pipeline_and_card(
    tiny_model, processor, hub, tmp_path, monkeypatch
):
    """`perceptiongpt train --push_to_hub --hub_model_id ...`: one commit of OUTPUT_DIR/final (model, processor,
    remote code, pipeline, card), and no push of the Trainer's own."""
    import perceptiongpt.trainer.hub as hub_module
    from perceptiongpt.trainer.train_cli import train_main

    folder = _demo_folder(tiny_model, processor, tmp_path / "demo")
    monkeypatch.setattr(hub_module, "HfApi", lambda: hub)
    train_main(
        ["--model", str(folder), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--num_samples", "4"]
        + ["--per_device_train_batch_size", "2", "--use_cpu", "true", "--push_to_hub", "--hub_model_id", "org/cli"]
    )
    assert [commit["repo"] for commit in hub.commits] == ["org/cli"]
    files = _pushed_files(hub, "org/cli")
    assert {"model.safetensors", "config.json", "processor_config.json", "pipeline_visual_grounding.py"} <= files
    card = ModelCard.load(hub.snapshot("org/cli") / "README.md")
    assert "perceptiongpt train" in card.text and "org/cli" in card.text

"""Share on the Hub: push model (or adapter), processor, remote code and card in ONE commit; load adapters safely.

The weights travel as safetensors only: `push_to_hub` refuses a folder with pickled files (`*.bin`, `*.pt`, ...) and
deletes stale weight files from the repository in the same commit, and `load_adapter` refuses pickled adapter
weights unless the caller opts in. (Full models refuse them in `PerceptionGPTPreTrainedModel.from_pretrained`.)
"""

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel
from transformers import Trainer

from perceptiongpt.hub_cards import ADAPTER_TAGS, TAGS, model_card, retarget_model_card
from perceptiongpt.processing.pipeline_visual_grounding import save_grounding_pipeline


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json") + tuple(f"*{s}" for s in PICKLE_SUFFIXES)
# Never uploaded from a folder: Trainer bookkeeping (pickled, and not part of the model) and local clutter.
SKIPPED = (
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "checkpoint-*",
    "runs",
    "__pycache__",
    "*.pyc",
    ".git",
    ".cache",
)
DEFAULT_COMMIT_MESSAGE = "Upload PerceptionGPT model, processor, code and card"


def _save_trainer(trainer: Trainer, folder: Path) -> None:
    # save_pretrained, not trainer.save_model: the latter also writes the pickled training_args.bin.
    if not isinstance(trainer.model, PeftModel):  # an adapter loads onto a base that ships the pipeline
        save_grounding_pipeline(trainer.model, folder)
    trainer.model.save_pretrained(folder)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(folder)


def _check_folder(folder: Path) -> bool:
    """Validates a folder ready to upload; returns whether it holds a PEFT adapter (else a full model)."""
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"Refusing to push pickled files {pickled}: weights must be safetensors. Re-save the model with "
            "`save_pretrained` (it writes safetensors) and remove the pickled files."
        )
    if "adapter_config.json" in files:
        if "adapter_model.safetensors" not in files:
            raise ValueError(f"The adapter folder has no `adapter_model.safetensors`; found {sorted(files)}.")
        return True
    if "config.json" not in files:
        raise ValueError(
            f"Expected a model folder (`config.json`) or an adapter folder (`adapter_config.json`), "
            f"found {sorted(files)}."
        )
    if not {"model.safetensors", "model.safetensors.index.json"} & set(files):
        raise ValueError(f"The model folder has no `model.safetensors` (or its index); found {sorted(files)}.")
    entries = (("config.json", "AutoModelForImageTextToText"), ("processor_config.json", "AutoProcessor"))
    for name, auto_class in entries:
        if name not in files:
            raise ValueError(
                f"The model folder has no `{name}`: save the processor next to the model "
                "(`processor.save_pretrained(folder)`) so that AutoProcessor loads the repo."
            )
        reference = json.loads((folder / name).read_text()).get("auto_map", {}).get(auto_class)
        module = reference and f"{reference.split('--')[-1].rsplit('.', 1)[0]}.py"
        if module not in files:
            raise ValueError(
                f"`{name}` maps {auto_class} to {reference!r}, but the folder has no {module!r}: the remote code is "
                "missing. Save with PerceptionGPT's `save_pretrained`, which copies it."
            )
    return False


def _trainer_card_fields(trainer: Trainer, adapter: bool) -> dict:
    """`model_card` arguments recorded by a Trainer: its last evaluation, its recipe and its training data."""
    metrics = {}
    for entry in reversed(trainer.state.log_history):
        if any(key.startswith("eval_") for key in entry):
            metrics = {key[len("eval_") :]: value for key, value in entry.items() if key.startswith("eval_")}
            break
    args = trainer.args
    optim = getattr(args.optim, "value", args.optim)
    training = (
        f"Trained with `PerceptionGPTTrainer` for {trainer.state.global_step} steps: batch "
        f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
        f"{args.world_size} processes, {optim} lr {args.learning_rate} ({args.lr_scheduler_type}, "
        f"{args.warmup_steps} warm-up steps), weight decay {args.weight_decay}."
    )
    config = getattr(trainer.model, "config", None)
    weights = [getattr(config, f"{part}_weight", None) for part in ("box_l1", "box_giou", "mask_dice", "mask_bce")]
    if None not in weights:
        training += (
            f" Loss: LM + {weights[0]} L1 + {weights[1]} GIoU on boxes + {weights[2]} Dice + {weights[3]} "
            "BCE on masks."
        )
    if adapter:
        peft = trainer.model.peft_config[trainer.model.active_adapter]
        training += (
            f" LoRA r={peft.r}, alpha={peft.lora_alpha}, dropout={peft.lora_dropout} on "
            f"`{peft.target_modules}`; trained in full: {sorted(peft.modules_to_save or [])}; trainable "
            f"token rows: {peft.trainable_token_indices}."
        )
    dataset = trainer.train_dataset
    if dataset is None:
        data = "The training data was not recorded."
    else:
        data = f"{len(dataset)} training rows"
        if "task" in (getattr(dataset, "column_names", None) or []):
            data += " (" + ", ".join(f"{task}: {n}" for task, n in sorted(Counter(dataset["task"]).items())) + ")"
        data += "."
    return {
        "metrics": metrics,
        "training": training,
        "data": data,
        "dataset_name": "held-out evaluation rows",
        "dataset_type": "custom",
        "base_model": _base_model(trainer.model) if adapter else None,
    }


def _base_model(peft_model) -> str | None:
    return peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path or None


def _card(card, folder: Path, trainer: Trainer | None, repo_id: str, revision: str, adapter: bool) -> ModelCard:
    if isinstance(card, ModelCard):
        return ModelCard(card.content)  # a copy: the tags added below stay out of the caller's card
    if isinstance(card, str):
        return ModelCard(card)
    if card is not None and not isinstance(card, Mapping):
        raise TypeError(
            f"`card` must be a ModelCard, a markdown string, a mapping of `model_card` arguments or None, "
            f"got {type(card).__name__}."
        )
    if card is None and trainer is None and (folder / "README.md").is_file():
        return retarget_model_card(ModelCard((folder / "README.md").read_text()), repo_id, revision)
    fields = {
        "metrics": {},
        "dataset_name": "not recorded",
        "dataset_type": "custom",
        "base_model": None,
        "training": "The training recipe was not recorded in this upload.",
        "data": "The training data was not recorded in this upload.",
    }
    if trainer is not None:
        fields.update(_trainer_card_fields(trainer, adapter))
    fields.update(card or {})
    fields.update(repo_id=repo_id, revision=revision, adapter=adapter)
    return model_card(**fields)


def _with_tags(card: ModelCard, adapter: bool) -> ModelCard:
    tags = list(card.data.tags or [])
    card.data.tags = tags + [tag for tag in (ADAPTER_TAGS if adapter else TAGS) if tag not in tags]
    return card


def push_to_hub(
    trainer_or_dir,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    token: str | bool | None = None,
    api: HfApi | None = None,
    card=None,
) -> CommitInfo:
    """Upload a PerceptionGPT model (or a PEFT adapter), its processor, its remote code and its card with
    `HfApi.upload_folder`: one commit (with `hf_xet`, huggingface_hub may split a very large folder into several).

    Args:
        trainer_or_dir: a `Trainer` (its `model`, PEFT-wrapped or not, and `processing_class` are saved), or a folder
            written by `save_pretrained` (model and processor, e.g. the demo's `DIR/model/`, or an adapter).
        repo_id: the model repository, created if missing ("org/name").
        revision: the branch to commit to, created from `main` if missing; None commits to `main`.
        private: visibility of a repository created here.
        commit_message, token: as in `HfApi.upload_folder`.
        api: the `HfApi` to use (a default one when None).
        card: the README. None: the folder's README.md, pointed at `repo_id` and the branch if it was written by
            `perceptiongpt.hub_cards`, else a card from what the Trainer recorded (metrics of its last evaluation,
            recipe, data). A mapping: `perceptiongpt.hub_cards.model_card` arguments over those defaults. A
            `ModelCard` or markdown string: used as written. The tags `custom_code`, `image-text-to-text` and
            `visual-grounding` are always added.

    Returns:
        The `CommitInfo` of the commit; `.oid` is the commit hash to pin as `revision` when loading.

    Raises:
        ValueError: pickled files, missing safetensors weights, missing processor or remote code in the upload.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must be 'name' or 'namespace/name', got {repo_id!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise TypeError(f"`revision` must be a branch name or None, got {revision!r}.")
    trainer = trainer_or_dir if isinstance(trainer_or_dir, Trainer) else None
    if trainer is None and not isinstance(trainer_or_dir, (str, os.PathLike)):
        raise TypeError(f"`trainer_or_dir` must be a Trainer or a folder path, got {type(trainer_or_dir).__name__}.")
    api = api or HfApi()
    branch = revision or "main"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "repo"
        if trainer is not None:
            _save_trainer(trainer, folder)
        else:
            source = Path(trainer_or_dir)
            if not source.is_dir():
                raise ValueError(f"`trainer_or_dir` must be an existing folder, got {str(source)!r}.")
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns(*SKIPPED))
        adapter = _check_folder(folder)
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id  # namespace resolved
        readme = _with_tags(_card(card, folder, trainer, repo_id, branch, adapter), adapter)
        readme.save(str(folder / "README.md"))
        if branch != "main":
            api.create_branch(repo_id, branch=branch, token=token, exist_ok=True)
        # weights of an earlier upload that this one does not overwrite (old shards, pickles) are deleted with it
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            token=token,
            revision=branch,
            delete_patterns=list(WEIGHT_PATTERNS),
        )


def load_adapter(base_model, adapter_id, revision: str | None = None, use_safetensors: bool = True, **kwargs):
    """`PeftModel.from_pretrained(base_model, adapter_id, ...)` that refuses pickled adapter weights.

    PEFT falls back to `adapter_model.bin` (unpickled with torch.load) when no `adapter_model.safetensors` exists; here
    that needs `use_safetensors=False`, from a source you trust. `kwargs` go to `PeftModel.from_pretrained`
    (`adapter_name`, `is_trainable`, `token`, `subfolder`, ...).
    """
    from peft import PeftModel

    if not isinstance(use_safetensors, bool):
        raise TypeError(f"`use_safetensors` must be True or False, got {use_safetensors!r}.")
    adapter_id = str(adapter_id)
    if revision is not None:
        kwargs["revision"] = revision
    if use_safetensors:
        subfolder = kwargs.get("subfolder") or ""
        if os.path.isdir(adapter_id):
            found = os.path.isfile(os.path.join(adapter_id, subfolder, "adapter_model.safetensors"))
        else:
            try:
                hf_hub_download(
                    adapter_id,
                    "adapter_model.safetensors",
                    subfolder=subfolder or None,
                    revision=revision,
                    token=kwargs.get("token"),
                    cache_dir=kwargs.get("cache_dir"),
                )
                found = True
            except EntryNotFoundError:
                found = False
        if not found:
            raise OSError(
                f"{adapter_id!r} (revision {revision or 'main'}) has no `adapter_model.safetensors`. PerceptionGPT "
                "refuses pickled adapter weights (`adapter_model.bin`) by default, because unpickling can run code; "
                "pass `use_safetensors=False` to load them from a source you trust."
            )
    return PeftModel.from_pretrained(base_model, adapter_id, **kwargs)


__all__ = ["DEFAULT_COMMIT_MESSAGE", "PICKLE_SUFFIXES", "load_adapter", "push_to_hub"]

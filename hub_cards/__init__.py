"""Hub card templates (model and synthetic dataset) and the functions that fill them from real results."""

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
DATASET_TEMPLATE_PATH = Path(__file__).with_name("dataset_card_template.md")
TAGS = ["custom_code", "image-text-to-text", "visual-grounding", "perceptiongpt"]
ADAPTER_TAGS = TAGS + ["peft", "lora"]
DATASET_TAGS = [
    "visual-grounding",
    "referring-expression-comprehension",
    "referring-expression-segmentation",
    "synthetic",
    "perceptiongpt",
]

# metric key (as in the demo's metrics.json and `evaluate_grounding`) -> (task, metric_type, readable name).
# The order is the order of `model-index`.
METRICS = {
    "rec_acc@0.5": ("rec", "accuracy", "REC Acc@0.5"),
    "rec_acc@0.75": ("rec", "accuracy", "REC Acc@0.75"),
    "rec_miou": ("rec", "mean_iou", "REC mIoU"),
    "res_ciou": ("res", "ciou", "RES cIoU"),
    "res_giou": ("res", "giou", "RES gIoU"),
}
# The first line of a model card's body: the repo and revision its load snippet names (see `retarget_model_card`).
CARD_MARKER = re.compile(r"<!-- perceptiongpt card: repo_id=(\S+) revision=(\S+) -->")
TASK_NAMES = {"rec": "Referring expression comprehension", "res": "Referring expression segmentation"}
# Reported in the results table only: controls and bookkeeping, not benchmark numbers.
OTHER_RESULTS = {
    "rec_acc@0.5_blind": "REC Acc@0.5, expressions shuffled across images (control)",
    "n_eval_rec": "REC samples",
    "n_eval_res": "RES samples",
    "steps": "training steps",
    "train_seconds": "training seconds",
    "eval_seconds": "evaluation seconds",
}


def _check_str(value, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"`{name}` must be a non-empty string, got {value!r}.")


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _format(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def model_card(
    metrics: Mapping,
    repo_id: str,
    dataset_name: str,
    dataset_type: str,
    training: str,
    data: str,
    split: str = "test",
    revision: str = "main",
    base_model: str | None = None,
    *,
    adapter: bool = False,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A filled PerceptionGPT model card.

    Args:
        metrics: evaluation results keyed as in the demo's metrics.json (`rec_acc@0.5`, `rec_miou`, `res_ciou`,
            `res_giou`, ...). Known finite metrics become `model-index` `EvalResult`s; every number goes in the table.
        repo_id: the Hub repository the card describes ("org/name"); the load snippet uses it.
        dataset_name, dataset_type: the evaluation set's readable name and id (`model-index` dataset name/type).
        training, data: markdown for the training recipe and the data sections.
        split: the evaluation split. revision: the revision the load snippet pins.
        base_model: the base model id (front matter `base_model`; the adapter snippet loads it).
        adapter: the repository holds a PEFT adapter, not a full model (library `peft`, PeftModel snippet).
        datasets: Hub dataset ids for the front matter `datasets`.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be a mapping of metric name to number, got {type(metrics).__name__}.")
    for value, name in (
        (repo_id, "repo_id"),
        (dataset_name, "dataset_name"),
        (dataset_type, "dataset_type"),
        (training, "training"),
        (data, "data"),
        (split, "split"),
        (revision, "revision"),
    ):
        _check_str(value, name)
    for key in METRICS:
        if key in metrics and not _is_number(metrics[key]):
            raise TypeError(f"`metrics[{key!r}]` must be a number, got {metrics[key]!r}.")
    results = [
        EvalResult(
            task_type="image-text-to-text",
            task_name=TASK_NAMES[task],
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=kind,
            metric_name=name,
            metric_value=float(metrics[key]),
        )
        for key, (task, kind, name) in METRICS.items()
        if key in metrics and math.isfinite(metrics[key])
    ]
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        tags=list(ADAPTER_TAGS if adapter else TAGS),
        license=license,
        model_name=model_name,
        eval_results=results or None,
        base_model=base_model,
        datasets=datasets,
    )
    names = {key: name for key, (_, _, name) in METRICS.items()} | OTHER_RESULTS
    table = [(names.get(key, key), _format(value)) for key, value in metrics.items() if _is_number(value)]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        revision=revision,
        training=training,
        data=data,
        dataset_name=dataset_name,
        split=split,
        results=table,
        adapter=adapter,
        base_model=base_model,
    )


def retarget_model_card(card: ModelCard, repo_id: str, revision: str = "main") -> ModelCard:
    """Point a card written by `model_card` for another repo (e.g. the demo's `perceptiongpt/demo`) at `repo_id`
    and `revision`: the load snippet, the title and the `model-index` name. Other cards are returned unchanged."""
    _check_str(repo_id, "repo_id")
    _check_str(revision, "revision")
    match = CARD_MARKER.search(card.text)
    if match is None:
        return card
    old_repo, old_revision = match.groups()
    old_name, new_name = old_repo.split("/")[-1], repo_id.split("/")[-1]
    text = card.text.replace(match.group(0), f"<!-- perceptiongpt card: repo_id={repo_id} revision={revision} -->")
    text = text.replace(f'"{old_repo}"', f'"{repo_id}"')
    for pattern in ('revision="{}"', 'revision = "{}"'):
        text = text.replace(pattern.format(old_revision), pattern.format(revision))
    card.text = re.sub(rf"^# {re.escape(old_name)}$", f"# {new_name}", text, count=1, flags=re.MULTILINE)
    if card.data.model_name == old_name:
        card.data.model_name = new_name
    return card


def _column(rows, name: str) -> list:
    # `datasets.Dataset` column access reads one column without decoding the images.
    return list(rows[name]) if hasattr(rows, "column_names") else [row[name] for row in rows]


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return label
    return "1M<n<10M"


def _split_stats(name: str, rows, image_size: int) -> dict:
    tasks, boxes, masks = _column(rows, "task"), _column(rows, "boxes"), _column(rows, "masks")
    areas = [(x2 - x1) * (y2 - y1) / image_size**2 for row in boxes for x1, y1, x2, y2 in row]
    return {
        "split": name,
        "rows": len(tasks),
        "tasks": Counter(tasks),
        "vis_per_row": f"{sum(map(len, boxes)) / max(len(boxes), 1):.2f}",
        "rows_with_masks": sum(any(m is not None for m in row or []) for row in masks),
        "box_area": f"{sum(areas) / len(areas):.3f}" if areas else "n/a",
    }


def dataset_card(
    splits: Mapping,
    config,
    seed: int = 0,
    repo_id: str | None = None,
    revision: str = "main",
    pretty_name: str = "PerceptionGPT synthetic referring expressions",
    license: str = "apache-2.0",
) -> DatasetCard:
    """A filled dataset card for the embedded synthetic set, with statistics counted on the given rows.

    Args:
        splits: split name ("train", "validation" or "test") -> rows (a `datasets.Dataset` or a list of row dicts in
            DESIGN.md's grounding schema), built by `build_synthetic_dataset(config, split, n, seed)`.
        config: the `SyntheticConfig` the rows were generated with.
        seed: their seed. The first row of every split is regenerated and compared, so the card's regeneration
            recipe is checked, not assumed.
        repo_id, revision: the dataset repository on the Hub, if the rows are pushed there.
    """
    from perceptiongpt.processing.synthetic import SPLITS, SyntheticConfig, generate_synthetic_samples

    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"`config` must be a SyntheticConfig, got {type(config).__name__}.")
    if not isinstance(splits, Mapping) or not splits:
        raise TypeError(f"`splits` must be a non-empty mapping of split name to rows, got {splits!r}.")
    for name, rows in splits.items():
        if name not in SPLITS:
            raise ValueError(f"`splits` keys must be among {SPLITS}, got {name!r}.")
        if len(rows) == 0:
            raise ValueError(f"`splits[{name!r}]` is empty.")
        expected = next(generate_synthetic_samples(config, name, 1, seed))
        first = rows[0]
        if first["messages"] != expected["messages"] or first["boxes"] != expected["boxes"]:
            raise ValueError(
                f"`splits[{name!r}][0]` differs from the row that `config` and seed={seed} generate: pass the config "
                "and seed the rows were built with."
            )
    stats = [_split_stats(name, rows, config.image_size) for name, rows in splits.items()]
    total = sum(row["rows"] for row in stats)
    card_data = DatasetCardData(
        language=["en"],
        license=license,
        pretty_name=pretty_name,
        size_categories=[_size_category(total)],
        task_categories=["image-text-to-text", "object-detection", "image-segmentation"],
        tags=list(DATASET_TAGS),
        annotations_creators=["machine-generated"],
        language_creators=["machine-generated"],
        multilinguality=["monolingual"],
        source_datasets=["original"],
    )
    fields = dataclasses.asdict(config)
    config_repr = "SyntheticConfig(\n" + "".join(f"    {k}={v!r},\n" for k, v in fields.items()) + ")"
    tasks = list(config.tasks) + sorted({t for row in stats for t in row["tasks"]} - set(config.tasks))
    return DatasetCard.from_template(
        card_data,
        template_path=str(DATASET_TEMPLATE_PATH),
        pretty_name=pretty_name,
        config_repr=config_repr,
        config_rows=[(k, f"`{v!r}`") for k, v in fields.items()],
        seed=seed,
        stats=stats,
        tasks=tasks,
        split_sizes=[(row["split"], row["rows"]) for row in stats],
        image_size=config.image_size,
        objects=f"{config.min_objects}-{config.max_objects}",
        repo_id=repo_id,
        revision=revision,
    )


__all__ = [
    "ADAPTER_TAGS",
    "CARD_MARKER",
    "DATASET_TAGS",
    "DATASET_TEMPLATE_PATH",
    "METRICS",
    "TAGS",
    "TEMPLATE_PATH",
    "dataset_card",
    "model_card",
    "retarget_model_card",
]

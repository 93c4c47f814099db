"""Hub model card template and the function that fills it from real evaluation results."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
TAGS = ["custom_code", "image-text-to-text", "visual-grounding", "perceptiongpt"]

# metric key -> (metric_type, readable name) for `model-index`
_METRICS = {
    "rec_acc@0.5": ("accuracy", "REC Acc@0.5"),
    "rec_miou": ("mean_iou", "REC mIoU"),
    "res_ciou": ("ciou", "RES cIoU"),
    "res_giou": ("giou", "RES gIoU"),
}


def model_card(metrics: dict, repo_id: str, dataset_name: str, dataset_type: str, training: str, data: str,
               split: str = "test", revision: str = "main", base_model: str | None = None) -> ModelCard:  # fmt: skip
    """A filled model card: `model-index` from `metrics` (REC/RES keys as in the demo's metrics.json), usage with a
    pinned revision, the coordinate convention, the training recipe and the data."""
    results = [
        EvalResult(task_type="visual-grounding", dataset_type=dataset_type, dataset_name=dataset_name,
                   dataset_split=split, metric_type=kind, metric_name=name, metric_value=float(metrics[key]))
        for key, (kind, name) in _METRICS.items()
        if key in metrics
    ]  # fmt: skip
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", tags=TAGS, license="apache-2.0",
        model_name=repo_id.split("/")[-1], eval_results=results or None, base_model=base_model,
    )  # fmt: skip
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE_PATH), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        revision=revision, training=training, data=data,
        results=[(key, f"{value:.4f}" if isinstance(value, float) else value) for key, value in metrics.items()],
    )  # fmt: skip


__all__ = ["TAGS", "TEMPLATE_PATH", "model_card"]

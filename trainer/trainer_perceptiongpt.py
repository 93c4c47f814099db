"""`PerceptionGPTTrainer`: a `Trainer` that averages box/mask losses over the global `<vis>` count, logs each loss
part, trains with the language model's cache off, and evaluates by generation."""

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from perceptiongpt.heads_perceptiongpt import perception_module_names

from .evaluation import SCORED_TASKS, evaluate_grounding, grounding_metrics


LOSS_PARTS = ("lm_loss", "box_l1_loss", "box_giou_loss", "box_aux_loss", "mask_dice_loss", "mask_bce_loss")


class PerceptionGPTTrainer(Trainer):
    """Trainer for PerceptionGPT (plain or PEFT-wrapped).

    Args (beyond `Trainer`'s):
        eval_max_new_tokens: generation budget per evaluation sample.
        eval_image_position: where the evaluation prompts put the image ("first" or "after_text"); None (default)
            takes the processor's (`processing_class`) layout, which is also the collator's default.
        heads_learning_rate: peak learning rate of the perception heads (box/mask encoders and decoders, feature
            fusion and pooling), on the same schedule; None (default): `args.learning_rate` for every parameter.
    `evaluate()` runs generate() on `eval_dataset` rows (DESIGN.md's schema) and reports `rec_acc@0.5`,
    `rec_miou`, `res_ciou` and `res_giou`.
    """

    def __init__(
        self,
        *args,
        eval_max_new_tokens: int = 16,
        eval_image_position: str | None = None,
        heads_learning_rate: float | None = None,
        **kwargs,
    ):
        if heads_learning_rate is not None and not (
            isinstance(heads_learning_rate, (int, float)) and heads_learning_rate > 0
        ):
            raise ValueError(f"`heads_learning_rate` must be a positive number or None, got {heads_learning_rate!r}.")
        self.heads_learning_rate = heads_learning_rate  # before super(): it may build the optimizer
        super().__init__(*args, **kwargs)
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_image_position = eval_image_position
        self._target_counts = None  # (boxes, masks) in the global batch of the current optimizer step
        self._part_sums = defaultdict(float)
        self._part_steps = 0

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, refusing a corrupt or partial checkpoint with a clear error instead of a silent restart."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            path = resume_from_checkpoint
            if resume_from_checkpoint is True:
                path = get_last_checkpoint(self.args.output_dir)
                if path is None:
                    raise ValueError(f"`resume_from_checkpoint=True` but {self.args.output_dir} has no checkpoint.")
            check_checkpoint(path)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def create_optimizer(self, model=None):
        """`Trainer.create_optimizer`; with `heads_learning_rate`, each parameter group is split into the heads'
        parameters (at that rate) and the rest (at `args.learning_rate`), before any step."""
        optimizer = super().create_optimizer(model)
        if self.heads_learning_rate is None:
            return optimizer
        heads = set(perception_module_names(self._perception_model.config))
        names = {id(p): name for name, p in (self.model if model is None else model).named_parameters()}
        groups = optimizer.param_groups
        optimizer.param_groups = []
        for group in groups:
            is_head = [bool(heads & set(names.get(id(p), "").split("."))) for p in group["params"]]
            for head, lr in ((False, group["lr"]), (True, self.heads_learning_rate)):
                params = [p for p, h in zip(group["params"], is_head) if h == head]
                if params:
                    optimizer.add_param_group({**group, "params": params, "lr": lr})
        return optimizer

    @property
    def _perception_model(self):
        """The PerceptionGPT model under accelerate's and PEFT's wrappers."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also counts the box and mask targets over the gradient-accumulation window and all processes."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        model = self._perception_model
        counts = torch.zeros(2, dtype=torch.long, device=device)
        for batch in batch_samples:
            if "labels" in batch and batch.get("vis_boxes") is not None:
                _, _, _, has_box, has_mask = model.vis_targets(
                    batch["input_ids"], batch["labels"], batch["vis_boxes"], batch.get("vis_mask_valid")
                )
                counts += torch.stack([has_box.sum(), has_mask.sum()]).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        self._target_counts = counts
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_cache": False}  # the composite config's text_config.use_cache stays True otherwise
        if model.training and self._target_counts is not None:
            inputs["num_vis_in_batch"], inputs["num_masks_in_batch"] = self._target_counts
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            # each part is (local sum / global count); x processes, summed over the window, reduced by mean in log()
            global_mean = num_items_in_batch is not None and self.args.average_tokens_across_devices
            scale = self.accelerator.num_processes if global_mean else 1
            for name in LOSS_PARTS:
                value = outputs.get(name)
                if value is not None:
                    self._part_sums[name] += value.detach().float() * scale
        return (loss, outputs) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self._part_steps += 1
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._part_steps:
            window = self._part_steps / self.args.gradient_accumulation_steps  # optimizer steps since the last log
            for name, total in self._part_sums.items():
                value = self.accelerator.reduce(torch.as_tensor(total, device=self.args.device), "mean")
                logs[name] = round(float(value) / max(window, 1), 6)
            self._part_sums.clear()
            self._part_steps = 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Generation-based evaluation (never teacher-forced) with the REC/RES protocols of DESIGN.md. Under several
        processes each generates for its share of the rows, and the metrics are computed over all of them."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("`eval_dataset` is required for evaluation, got None.")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        rows = [row for row in dataset if row["task"] in SCORED_TASKS]  # the scored ones, split evenly
        with self.accelerator.split_between_processes(rows) as local_rows:
            result = evaluate_grounding(
                model,
                self.processing_class,
                local_rows,
                batch_size=self.args.per_device_eval_batch_size,
                max_new_tokens=self.eval_max_new_tokens,
                image_position=self.eval_image_position,
            )
        model.train(was_training)
        scored = gather_object(result.scored) if self.accelerator.num_processes > 1 else result.scored
        metrics = {
            f"{metric_key_prefix}_{key}": value
            for key, value in grounding_metrics(scored).items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def check_checkpoint(path) -> None:
    """Raises a ValueError naming what is missing or unreadable in a Trainer checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"`resume_from_checkpoint` must be a checkpoint folder, got {str(path)!r}.")
    weights = [path / name for name in ("model.safetensors", "adapter_model.safetensors") if (path / name).exists()]
    weights += sorted(path.glob("model-*.safetensors"))
    required = ["trainer_state.json", "optimizer.pt", "scheduler.pt"]
    missing = [name for name in required if not (path / name).exists()] + ([] if weights else ["model weights"])
    if missing:
        raise ValueError(f"Checkpoint {path} is partial: missing {missing}. Resume from a complete checkpoint.")
    try:
        json.loads((path / "trainer_state.json").read_text())
        for file in weights:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"Checkpoint {path} is corrupt ({type(error).__name__}: {error}).") from error


__all__ = ["LOSS_PARTS", "PerceptionGPTTrainer", "check_checkpoint"]

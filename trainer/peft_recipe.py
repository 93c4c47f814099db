"""PEFT recipe: LoRA on the language model; heads and fusion fully trained; the `<vis>` rows trainable."""

import re

from peft import LoraConfig, PeftModel

from perceptiongpt.heads_perceptiongpt import perception_module_names


LORA_PRESETS = {
    # the paper: LoRA on q,v with r=16, alpha=64, dropout 0.1
    "paper": {"r": 16, "lora_alpha": 64, "lora_dropout": 0.1, "projections": ["q_proj", "v_proj"]},
    # every attention and MLP projection: more capacity for small models trained briefly
    "full": {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "projections": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}


def lora_config(model, preset: str = "paper", whole_embedding: bool = False, **overrides) -> LoraConfig:
    """The LoraConfig for `get_peft_model(model, lora_config(model))`.

    Args:
        model: a PerceptionGPT model of any family (its config gives `<vis>`, its decoder the LoRA targets).
        preset: "paper" (q,v r=16 alpha=64 dropout 0.1) or "full" (all projections).
        whole_embedding: train the whole input embedding matrix, as the paper did, instead of only the `<vis>` rows.
        overrides: any LoraConfig field (e.g. r=8).
    """
    if preset not in LORA_PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(LORA_PRESETS)}, got {preset!r}.")
    settings = dict(LORA_PRESETS[preset])
    projections = "|".join(settings.pop("projections"))
    modules_to_save = perception_module_names(model.config)  # trained in full, saved with the adapter
    vis = model.config.vis_token_id
    trainable_tokens = {"lm_head": [vis]}  # `<vis>` must be predicted
    if whole_embedding:
        modules_to_save.append("embed_tokens")
    else:
        trainable_tokens["embed_tokens"] = [vis]
    kwargs = dict(
        target_modules=rf"{re.escape(decoder_path(model))}\..*\.({projections})",
        modules_to_save=modules_to_save,
        trainable_token_indices=trainable_tokens,
        **settings,
    )
    return LoraConfig(**{**kwargs, **overrides})


def decoder_path(model) -> str:
    """The module path of the family's language decoder (`get_decoder()`), e.g. "model.language_model": LoRA targets
    its projections only, never the vision tower's."""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def count_parameters(model) -> dict:
    """Trainable and total parameter counts, from PEFT's counter for a `PeftModel` (4-bit weights counted as PEFT does)
    and `PreTrainedModel.num_parameters` otherwise; both work on the meta device."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


__all__ = ["LORA_PRESETS", "count_parameters", "decoder_path", "lora_config"]

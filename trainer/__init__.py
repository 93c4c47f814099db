"""Training side of PerceptionGPT: Trainer subclass, PEFT recipe, generation-based evaluation, CLI."""

from .evaluation import GroundingEvaluation, evaluate_grounding, shuffle_expressions
from .hub import load_adapter, push_to_hub
from .peft_recipe import LORA_PRESETS, count_parameters, lora_config
from .trainer_perceptiongpt import LOSS_PARTS, PerceptionGPTTrainer


__all__ = [
    "GroundingEvaluation",
    "LORA_PRESETS",
    "LOSS_PARTS",
    "PerceptionGPTTrainer",
    "count_parameters",
    "evaluate_grounding",
    "load_adapter",
    "lora_config",
    "push_to_hub",
    "shuffle_expressions",
]

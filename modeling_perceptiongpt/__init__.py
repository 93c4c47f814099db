"""PerceptionGPT: boxes and masks from a `<vis>` token, as a transformers plugin.

Importing the package registers the Auto classes. The trainer is imported lazily (it pulls in peft/accelerate).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_perceptiongpt import BoxHeadConfig, MaskHeadConfig, PerceptionConfigMixin, PerceptionGPTConfig
from .conversion_perceptiongpt import add_vis_token, from_llava
from .generation_perceptiongpt import PerceptionGPTBeamGenerateOutput, PerceptionGPTGenerateOutput
from .mixin_perceptiongpt import PerceptionGPTCausalLMOutput, PerceptionGPTMixin
from .modeling_perceptiongpt import (
    PerceptionGPTForConditionalGeneration,
    PerceptionGPTModel,
    PerceptionGPTPreTrainedModel,
)
from .processing.processing_perceptiongpt import PerceptionGPTProcessor


AutoConfig.register(PerceptionGPTConfig.model_type, PerceptionGPTConfig, exist_ok=True)
AutoModel.register(PerceptionGPTConfig, PerceptionGPTModel, exist_ok=True)
AutoModelForImageTextToText.register(PerceptionGPTConfig, PerceptionGPTForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PerceptionGPTConfig, PerceptionGPTProcessor, exist_ok=True)
# save_pretrained copies the code and writes `auto_map`, so saved folders load with trust_remote_code=True
PerceptionGPTConfig.register_for_auto_class()
PerceptionGPTForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "BoxHeadConfig",
    "MaskHeadConfig",
    "PerceptionGPTBeamGenerateOutput",
    "PerceptionConfigMixin",
    "PerceptionGPTCausalLMOutput",
    "PerceptionGPTConfig",
    "PerceptionGPTForConditionalGeneration",
    "PerceptionGPTGenerateOutput",
    "PerceptionGPTMixin",
    "PerceptionGPTModel",
    "PerceptionGPTPreTrainedModel",
    "PerceptionGPTProcessor",
    "add_vis_token",
    "from_llava",
]

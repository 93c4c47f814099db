"""PerceptionGPT: boxes and masks from a `<vis>` token, as a transformers plugin.

Importing the package registers the Auto classes. The trainer is imported lazily (it pulls in peft/accelerate).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_perceptiongpt import BoxHeadConfig, MaskHeadConfig, PerceptionConfigMixin, PerceptionGPTConfig
from .configuration_perceptiongpt_idefics3 import PerceptionGPTIdefics3Config, PerceptionGPTSmolVLMConfig
from .configuration_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLConfig
from .conversion_perceptiongpt import (
    FAMILIES,
    SUPPORTED_FAMILIES,
    add_vis_token,
    convert_base_model,
    from_llava,
    load_base_model,
)
from .generation_perceptiongpt import PerceptionGPTBeamGenerateOutput, PerceptionGPTGenerateOutput
from .mixin_perceptiongpt import PerceptionGPTMixin
from .modeling_outputs_perceptiongpt import PerceptionGPTCausalLMOutput
from .modeling_perceptiongpt import (
    PerceptionGPTForConditionalGeneration,
    PerceptionGPTModel,
    PerceptionGPTPreTrainedModel,
)
from .modeling_perceptiongpt_idefics3 import (
    PerceptionGPTIdefics3ForConditionalGeneration,
    PerceptionGPTSmolVLMForConditionalGeneration,
)
from .modeling_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLForConditionalGeneration
from .processing.family_processors import FAMILY_PROCESSORS
from .processing.pipeline_visual_grounding import TASK, VisualGroundingPipeline, save_grounding_pipeline
from .processing.processing_perceptiongpt import PerceptionGPTProcessor
from .processing.processing_perceptiongpt_idefics3 import PerceptionGPTIdefics3Processor, PerceptionGPTSmolVLMProcessor
from .processing.processing_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLProcessor
from .streaming_perceptiongpt import GroundedObject, ObjectStreamer


AutoConfig.register(PerceptionGPTConfig.model_type, PerceptionGPTConfig, exist_ok=True)
AutoModel.register(PerceptionGPTConfig, PerceptionGPTModel, exist_ok=True)
AutoModelForImageTextToText.register(PerceptionGPTConfig, PerceptionGPTForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PerceptionGPTConfig, PerceptionGPTProcessor, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=VisualGroundingPipeline, pt_model=AutoModelForImageTextToText)
for _, config_class, model_class in FAMILIES.values():  # one entry per family here and in FAMILY_PROCESSORS
    if config_class is not PerceptionGPTConfig:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        AutoProcessor.register(config_class, FAMILY_PROCESSORS[config_class.model_type][0], exist_ok=True)
    # save_pretrained copies the code and writes `auto_map`, so saved folders load with trust_remote_code=True
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForImageTextToText")


def from_base(base_model_or_path, processor=None, vis_token: str = "<vis>", **config_overrides):
    """PerceptionGPT model and processor of a supported VLM family, around its tensors kept bit-identical.

    Args:
        base_model_or_path: a loaded model of a supported family (`SUPPORTED_FAMILIES`: LLaVA, Qwen2.5-VL, Idefics3,
            SmolVLM), or a path / repo id of one.
        processor: its processor, tokenizer, or a path; the model's path when None and a path is given. `vis_token`
            is added to its tokenizer in place.
        config_overrides: perception config fields (heads, loss weights, `mask_grid_size` on Qwen, ...).
    Returns:
        (model, processor): the processor wraps the family's own (pixel boxes / masks in, pixel out) and saves the
        prompt layout; it is None when only a loaded model (then `<vis>` takes the next free id) or only a tokenizer
        was given.
    """
    from .processing.family_processors import build_family_processor, processor_parts

    base = load_base_model(base_model_or_path)
    if processor is None and not isinstance(base_model_or_path, PreTrainedModel):
        processor = base_model_or_path
    parts = None if processor is None else processor_parts(processor)
    model = convert_base_model(base, None if parts is None else parts.tokenizer, vis_token, **config_overrides)
    if parts is None or parts.image_processor is None:
        return model, None
    return model, build_family_processor(parts, model.config)


__all__ = [
    "BoxHeadConfig",
    "GroundedObject",
    "MaskHeadConfig",
    "ObjectStreamer",
    "PerceptionConfigMixin",
    "PerceptionGPTBeamGenerateOutput",
    "PerceptionGPTCausalLMOutput",
    "PerceptionGPTConfig",
    "PerceptionGPTForConditionalGeneration",
    "PerceptionGPTGenerateOutput",
    "PerceptionGPTIdefics3Config",
    "PerceptionGPTIdefics3ForConditionalGeneration",
    "PerceptionGPTIdefics3Processor",
    "PerceptionGPTMixin",
    "PerceptionGPTModel",
    "PerceptionGPTPreTrainedModel",
    "PerceptionGPTProcessor",
    "PerceptionGPTQwen2_5_VLConfig",
    "PerceptionGPTQwen2_5_VLForConditionalGeneration",
    "PerceptionGPTQwen2_5_VLProcessor",
    "PerceptionGPTSmolVLMConfig",
    "PerceptionGPTSmolVLMForConditionalGeneration",
    "PerceptionGPTSmolVLMProcessor",
    "SUPPORTED_FAMILIES",
    "VisualGroundingPipeline",
    "add_vis_token",
    "convert_base_model",
    "from_base",
    "from_llava",
    "load_base_model",
    "save_grounding_pipeline",
]

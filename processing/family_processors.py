"""A PerceptionGPT processor around a family's own processor parts (`perceptiongpt.from_base`)."""

from dataclasses import dataclass, field

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin

from .processing_perceptiongpt import PerceptionGPTProcessor
from .processing_perceptiongpt_idefics3 import PerceptionGPTIdefics3Processor, PerceptionGPTSmolVLMProcessor
from .processing_perceptiongpt_qwen2_5_vl import PerceptionGPTQwen2_5_VLProcessor
from .templates import CHAT_TEMPLATE, IDEFICS3_CHAT_TEMPLATE, QWEN2_5_VL_CHAT_TEMPLATE


# PerceptionGPT model_type -> its processor class, the family processor's fields it keeps, and the chat template
# used when the given one has no `generation` block (the collator's labels need it)
FAMILY_PROCESSORS = {
    "perceptiongpt": (
        PerceptionGPTProcessor,
        ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"),
        CHAT_TEMPLATE,
    ),
    "perceptiongpt_qwen2_5_vl": (PerceptionGPTQwen2_5_VLProcessor, (), QWEN2_5_VL_CHAT_TEMPLATE),
    "perceptiongpt_idefics3": (PerceptionGPTIdefics3Processor, ("image_seq_len",), IDEFICS3_CHAT_TEMPLATE),
    "perceptiongpt_smolvlm": (PerceptionGPTSmolVLMProcessor, ("image_seq_len",), IDEFICS3_CHAT_TEMPLATE),
}


@dataclass
class ProcessorParts:
    tokenizer: PreTrainedTokenizerBase
    image_processor: object = None
    chat_template: str | None = None
    fields: dict = field(default_factory=dict)


def processor_parts(source) -> ProcessorParts:
    """The tokenizer, image processor, chat template and settings of `source`: a processor, a tokenizer (no image
    processor) or a path / repo id. A path loads its processor, or, where the stock processor cannot be built here
    (Qwen2.5-VL / SmolVLM without torchvision or num2words), its tokenizer and image processor separately."""
    if isinstance(source, ProcessorMixin):
        fields = {name: getattr(source, name) for name in vars(source) if not name.startswith("_")}
        return ProcessorParts(source.tokenizer, getattr(source, "image_processor", None), source.chat_template, fields)
    if isinstance(source, PreTrainedTokenizerBase):
        return ProcessorParts(source)
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        raise TypeError(
            f"`processor` must be a processor, a tokenizer or a path / repo id, got {type(source).__name__}."
        )
    try:  # the family's own processor, with its settings (LLaVA's patch size and image-token count)
        loaded = AutoProcessor.from_pretrained(source)
    except (ImportError, AttributeError, OSError, ValueError):  # Qwen2.5-VL / SmolVLM without torchvision, num2words
        loaded = None
    if isinstance(loaded, ProcessorMixin):
        return processor_parts(loaded)
    tokenizer = AutoTokenizer.from_pretrained(source)  # a folder without a processor config: its parts
    return ProcessorParts(tokenizer, AutoImageProcessor.from_pretrained(source), tokenizer.chat_template)


def build_family_processor(parts: ProcessorParts, config, image_position: str = "first"):
    """The PerceptionGPT processor of `config`'s family from `parts` (whose tokenizer has `<vis>` already). A chat
    template without a `generation` block (LLaVA-1.5's, Qwen2.5-VL's) is replaced by the family's marked one, which
    renders the same layout."""
    processor_class, kept, marked_template = FAMILY_PROCESSORS[config.model_type]
    template = parts.chat_template
    if template is None or "{% generation %}" not in template:
        template = marked_template
    if parts.image_processor is None:
        raise ValueError(
            f"`processor` must be the family's processor (or a path with its image processor) to build a "
            f"{processor_class.__name__}; got only a tokenizer."
        )
    return processor_class(
        image_processor=parts.image_processor,
        tokenizer=parts.tokenizer,
        chat_template=template,
        mask_size=config.mask_head_config.mask_size,
        image_position=image_position,
        **{name: parts.fields[name] for name in kept if name in parts.fields},
    )


__all__ = ["FAMILY_PROCESSORS", "ProcessorParts", "build_family_processor", "processor_parts"]

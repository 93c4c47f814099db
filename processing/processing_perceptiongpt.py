"""PerceptionGPT processor for LLaVA: LLaVA image expansion plus `<vis>` regions in, pixel boxes and masks out.

The region handling shared by every family is `PerceptionProcessorMixin` (region_processing.py). The geometry is
read from the image processor's own settings (pad-to-square, resize, center crop): exactly what the vision tower saw.
"""

from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor

from .region_geometry import geometry_from_image_processor
from .region_processing import PerceptionProcessorMixin
from .templates import CHAT_TEMPLATE


RESIZE_MODES = ("pad", "resize", "center_crop")


class PerceptionGPTProcessor(PerceptionProcessorMixin, LlavaProcessor):
    r"""LLaVA processor that also turns `<vis>` regions into the model's `vis_boxes` / `vis_masks`.

    Args:
        vis_token (`str`, defaults to `"<vis>"`): the object token; the tokenizer's named `vis_token` wins.
        mask_size (`int`, *optional*): the mask head's square resolution (the model config's mask size). Needed only
            to pass masks.
        image_position (`str`, defaults to `"first"`): the prompt layout, part of the model: "first" puts the image
            before the question, "after_text" after it. Saved with the processor; the collator, evaluation, the
            Trainer and the CLI default to it, and `user_content` builds a query in it.
        Other args: as `LlavaProcessor`.

    The resize mode is not an argument: it is what the image processor does (see `resize_mode`), so the box maths can
    never disagree with the pixels.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        vis_token="<vis>",
        mask_size=None,
        image_position="first",
        **kwargs,
    ):
        self._set_perception_fields(tokenizer, vis_token, mask_size, image_position)
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        geometry_from_image_processor(self.image_processor, (1, 2))  # fail now on an unsupported image processor

    @property
    def resize_mode(self) -> str:
        """ "pad" (pad to square, then resize), "center_crop" (resize the short side, then crop) or "resize"."""
        if getattr(self.image_processor, "do_pad", False):
            return "pad"
        return "center_crop" if self.image_processor.do_center_crop else "resize"


PerceptionGPTProcessor.register_for_auto_class("AutoProcessor")


def build_processor(
    image_size: int,
    patch_size: int,
    mask_size: int,
    tokenizer,
    resize_mode: str = "pad",
    chat_template: str | None = CHAT_TEMPLATE,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
    image_position: str = "first",
) -> PerceptionGPTProcessor:
    """A processor whose LLaVA image processor realizes `resize_mode` at `image_size` x `image_size`.

    Args:
        image_size, patch_size: the vision tower's input size and patch size; with the CLIP defaults
            (`num_additional_image_tokens=1` for CLS, `vision_feature_select_strategy="default"` dropping it) an
            image takes (image_size // patch_size) ** 2 `<image>` tokens. Match the model config.
        mask_size: the mask head's square resolution.
        resize_mode: "pad" (LLaVA-1.5: pad to a square with the mean color, then resize), "resize" (squash) or
            "center_crop" (CLIP: resize the short side, then crop the center).
        image_position: the prompt layout saved with the processor ("first" or "after_text").
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}.")
    square = {"height": image_size, "width": image_size}
    settings = {
        "pad": {"do_pad": True, "size": square, "do_center_crop": False},
        "resize": {"do_pad": False, "size": square, "do_center_crop": False},
        "center_crop": {"do_pad": False, "size": {"shortest_edge": image_size}, "do_center_crop": True},
    }[resize_mode]
    image_processor = LlavaImageProcessorPil(crop_size=square, **settings)
    return PerceptionGPTProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=chat_template,
        num_additional_image_tokens=num_additional_image_tokens,
        mask_size=mask_size,
        image_position=image_position,
    )


__all__ = ["PerceptionGPTProcessor", "build_processor"]

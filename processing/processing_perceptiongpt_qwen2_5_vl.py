"""PerceptionGPT processor for Qwen2.5-VL: Qwen's dynamic-resolution image expansion plus `<vis>` regions.

Images only. In transformers 5.24 a stock `Qwen2_5_VLProcessor` cannot be built, saved or loaded without torchvision
(its video processor needs it), so this processor has no video processor at all: it builds, saves and loads with the
PIL image processor on any machine, and with torchvision installed it is the same image-only processor (PerceptionGPT
grounds objects in images; videos are refused by the model's adapter). The vision frame of an image is the resized
image Qwen's ViT saw (`smart_resize`: multiples of patch x merge pixels, bounded pixel count).
"""

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from .region_geometry import geometry_from_image_processor
from .region_processing import PerceptionProcessorMixin


class PerceptionGPTQwen2_5_VLProcessor(PerceptionProcessorMixin, Qwen2_5_VLProcessor):
    r"""Qwen2.5-VL processor (image processor + tokenizer, no video processor) that also turns `<vis>` regions into
    the model's `vis_boxes` / `vis_masks`.

    Args:
        image_processor: a `Qwen2VLImageProcessor(Pil)`.
        tokenizer: Qwen's tokenizer, with `<vis>` added (`perceptiongpt.add_vis_token`).
        chat_template: the tokenizer's / Qwen's template; an image part renders as
            `<|vision_start|><|image_pad|><|vision_end|>`.
        vis_token, mask_size, image_position: as `PerceptionGPTProcessor`.
    """

    resize_mode = "dynamic"  # smart_resize: no pad, no crop

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        vis_token="<vis>",
        mask_size=None,
        image_position="first",
        **kwargs,
    ):
        self._set_perception_fields(tokenizer, vis_token, mask_size, image_position)
        # Qwen2_5_VLProcessor.__init__ would require a video processor: its token fields are set here instead
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        geometry_from_image_processor(self.image_processor, (28, 28))  # fail now on an unsupported image processor

    def __call__(self, images=None, text=None, boxes=None, masks=None, videos=None, **kwargs):
        """`PerceptionProcessorMixin.__call__` (Qwen adds `image_grid_thw` and `mm_token_type_ids`); no videos."""
        if videos is not None:
            raise ValueError("`videos` are not supported: PerceptionGPT grounds objects in images.")
        return super().__call__(images=images, text=text, boxes=boxes, masks=masks, **kwargs)


PerceptionGPTQwen2_5_VLProcessor.register_for_auto_class("AutoProcessor")


__all__ = ["PerceptionGPTQwen2_5_VLProcessor"]

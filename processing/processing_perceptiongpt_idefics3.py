"""PerceptionGPT processors for Idefics3 and SmolVLM: their tiling image expansion plus `<vis>` regions.

The frame of an image is its global image: the whole image squashed to `max_image_size` x `max_image_size`, with or
without image splitting (the tiles come first, the global image last), so a box maps by a pure scale.
Images only: in transformers 5.24 a stock `SmolVLMProcessor` needs `num2words` and a video processor (torchvision),
both only for videos; this one needs neither, and is the same image-only processor when they are installed.
"""

from transformers.models.idefics3.processing_idefics3 import Idefics3Processor
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
from transformers.processing_utils import ProcessorMixin

from .region_geometry import geometry_from_image_processor
from .region_processing import PerceptionProcessorMixin


class PerceptionGPTIdefics3Processor(PerceptionProcessorMixin, Idefics3Processor):
    r"""Idefics3 processor that also turns `<vis>` regions into the model's `vis_boxes` / `vis_masks`.

    Args: as `Idefics3Processor` (image_processor, tokenizer, image_seq_len, chat_template), plus vis_token,
    mask_size and image_position as `PerceptionGPTProcessor`.
    """

    resize_mode = "global_image"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_len=169,
        chat_template=None,
        vis_token="<vis>",
        mask_size=None,
        image_position="first",
        **kwargs,
    ):
        self._set_perception_fields(tokenizer, vis_token, mask_size, image_position)
        super().__init__(
            image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=chat_template, **kwargs
        )
        geometry_from_image_processor(self.image_processor, (16, 16))  # fail now on an unsupported image processor


class PerceptionGPTSmolVLMProcessor(PerceptionProcessorMixin, SmolVLMProcessor):
    r"""SmolVLM processor (image processor + tokenizer, no video processor) that also turns `<vis>` regions into the
    model's `vis_boxes` / `vis_masks`.

    Args: as `SmolVLMProcessor` without `video_processor`, plus vis_token, mask_size and image_position as
    `PerceptionGPTProcessor`.
    """

    resize_mode = "global_image"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_len=169,
        chat_template=None,
        vis_token="<vis>",
        mask_size=None,
        image_position="first",
        **kwargs,
    ):
        self._set_perception_fields(tokenizer, vis_token, mask_size, image_position)
        # SmolVLMProcessor.__init__ would require num2words and a video processor: its token fields are set here
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        geometry_from_image_processor(self.image_processor, (16, 16))

    def __call__(self, images=None, text=None, boxes=None, masks=None, videos=None, **kwargs):
        """`PerceptionProcessorMixin.__call__`; no videos."""
        if videos is not None:
            raise ValueError("`videos` are not supported: PerceptionGPT grounds objects in images.")
        return super().__call__(images=images, text=text, boxes=boxes, masks=masks, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`: SmolVLM's own reads video defaults from a video processor."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


PerceptionGPTIdefics3Processor.register_for_auto_class("AutoProcessor")
PerceptionGPTSmolVLMProcessor.register_for_auto_class("AutoProcessor")


__all__ = ["PerceptionGPTIdefics3Processor", "PerceptionGPTSmolVLMProcessor"]

"""PerceptionGPT on Idefics3 and SmolVLM: `PerceptionGPTMixin` over their `...ForConditionalGeneration`, plus the
adapter they share.

Both run a SigLIP tower without CLS on square tiles: with image splitting an image is several tiles plus a global
image, which comes LAST; each tile is its own placeholder run (row/column tokens separate them) and
`get_image_features` drops all-zero padding tiles, returning the real ones in order. A `<vis>` reads the latest run at
or before it, so a generated or trailing `<vis>` reads the global image: its normalized frame is that global image.
The decoder is `model.text_model`; the LLM gets (grid / scale_factor)^2 tokens per tile after the pixel shuffle.
Shapes: N_img tiles, P patches per tile, C ViT width, D text hidden, g mask-grid side.
"""

import torch
from transformers import GenerationMixin
from transformers.models.idefics3.modeling_idefics3 import Idefics3ForConditionalGeneration
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMForConditionalGeneration
from transformers.utils.versions import require_version

from .configuration_perceptiongpt_idefics3 import PerceptionGPTIdefics3Config, PerceptionGPTSmolVLMConfig
from .injection_perceptiongpt import forward_with_native_signature
from .loading_perceptiongpt import PerceptionGPTLoadingMixin
from .mixin_perceptiongpt import PerceptionGPTMixin
from .modeling_perceptiongpt_qwen2_5_vl import resample_grid
from .region_inputs import image_starts_by_run


require_version("transformers>=5.24,<6", "PerceptionGPT's modeling code: pip install 'transformers>=5.24,<6'")


class Idefics3FamilyAdapter:
    """The vision adapter Idefics3 and SmolVLM share; placed before `PerceptionGPTMixin` in the bases."""

    _image_encoder_kwargs = ("pixel_attention_mask",)

    def __init__(self, config):
        super().__init__(config)
        self._build_perception_heads(config.vision_config.hidden_size)
        self.post_init()  # initializes the heads added after the family's own post_init

    def image_starts(self, input_ids):
        return image_starts_by_run(input_ids, self.config.image_token_id)

    def vision_layer_grids(self, image_outputs, image_kwargs):
        side, grid = self.config.vision_grid_size, self.config.patch_grid_size
        # each recorded layer: (N_img, P, C) on the tile's side x side patch grid
        return [
            torch.stack([resample_grid(tile.view(side, side, -1), grid) for tile in states])
            for states in image_outputs.hidden_states
        ]

    def image_token_grids(self, input_ids, hidden, image_outputs):
        side = self.config.vision_grid_size // self.config.scale_factor  # the pixel-shuffled grid of a tile
        states = hidden[input_ids == self.config.image_token_id].view(-1, side, side, hidden.shape[-1])  # (N_img, ...)
        return torch.stack([resample_grid(tile, self.config.patch_grid_size) for tile in states])  # (N_img, g*g, D)


class PerceptionGPTIdefics3ForConditionalGeneration(
    Idefics3FamilyAdapter,
    PerceptionGPTMixin,
    PerceptionGPTLoadingMixin,
    Idefics3ForConditionalGeneration,
    GenerationMixin,
):
    config: PerceptionGPTIdefics3Config
    config_class = PerceptionGPTIdefics3Config
    forward = forward_with_native_signature(Idefics3ForConditionalGeneration, PerceptionGPTMixin.forward)


class PerceptionGPTSmolVLMForConditionalGeneration(
    Idefics3FamilyAdapter,
    PerceptionGPTMixin,
    PerceptionGPTLoadingMixin,
    SmolVLMForConditionalGeneration,
    GenerationMixin,
):
    config: PerceptionGPTSmolVLMConfig
    config_class = PerceptionGPTSmolVLMConfig
    forward = forward_with_native_signature(SmolVLMForConditionalGeneration, PerceptionGPTMixin.forward)


__all__ = ["PerceptionGPTIdefics3ForConditionalGeneration", "PerceptionGPTSmolVLMForConditionalGeneration"]

"""PerceptionGPT on LLaVA: `PerceptionGPTMixin` over `LlavaForConditionalGeneration`, plus LLaVA's vision adapter.

LLaVA gives every image a fixed number of `<image>` placeholders on a square CLIP patch grid (with a CLS token
under the "full" strategy), so the mask grid is the patch grid. The paper's fused ViT mix can also replace the LLM
path's features (`fuse_llm_features`), which is why the inner model is a subclass too.
Shapes: B batch, T tokens, P patches, C ViT width, D text hidden, g patch-grid side.
"""

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple
from transformers.utils.versions import require_version

from .configuration_perceptiongpt import PerceptionGPTConfig
from .heads_perceptiongpt import PERCEPTION_MODULE_NAMES, LayerFusion
from .injection_perceptiongpt import forward_with_native_signature
from .loading_perceptiongpt import PerceptionGPTLoadingMixin, preferred_attn_implementation
from .mixin_perceptiongpt import PerceptionGPTMixin
from .modeling_outputs_perceptiongpt import PerceptionGPTCausalLMOutput
from .region_inputs import image_starts_by_count


# This file also runs as remote code (`trust_remote_code=True`), where setup.py's pin does not apply: the generate
# hooks and the LLaVA internals it subclasses are those of transformers 5.24 and later 5.x.
require_version("transformers>=5.24,<6", "PerceptionGPT's modeling code: pip install 'transformers>=5.24,<6'")

# Folders saved before the heads moved to the top level (PerceptionGPTMixin) kept the region encoders in `model.`.
LEGACY_KEY_MAPPING = {
    rf"^model\.{name}\.": f"{name}." for name in ("box_encoder", "mask_encoder", "mask_feature_fusion")
}


class PerceptionGPTPreTrainedModel(PerceptionGPTLoadingMixin, LlavaPreTrainedModel):
    config: PerceptionGPTConfig
    config_class = PerceptionGPTConfig

    def _init_weights(self, module):
        if isinstance(module, LayerFusion):
            init.zeros_(module.logits)
        else:
            super()._init_weights(module)


class PerceptionGPTModel(PerceptionGPTPreTrainedModel, LlavaModel):
    """LlavaModel whose LLM path can read the paper's fused ViT mix (`fuse_llm_features`)."""

    def __init__(self, config: PerceptionGPTConfig):
        super().__init__(config)
        self.llm_feature_fusion = LayerFusion(config.vision_fusion_layers) if config.fuse_llm_features else None
        self.post_init()  # initializes the module added after LlavaModel's own post_init

    @can_return_tuple
    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None, **kwargs
    ):
        """Runs the ViT once and keeps every hidden state; `pooler_output` holds the projected LLM features (one
        (P, D) per image, as LLaVA)."""
        if image_sizes is not None:
            raise ValueError("`image_sizes` is not supported: PerceptionGPT uses fixed-size square vision inputs.")
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        kwargs.pop("return_dict", None)
        keep_hidden = kwargs.pop("output_hidden_states", None)
        keep_hidden = self.config.vision_config.output_hidden_states if keep_hidden is None else keep_hidden
        image_outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        hidden_states = image_outputs.hidden_states  # num_layers + 1 tensors (N_img, 1 + g*g, C)

        def select(states):  # "default" drops CLIP's CLS token, as LLaVA does
            return states[:, 1:] if strategy == "default" else states

        if self.llm_feature_fusion is not None:
            selected = self.llm_feature_fusion([select(h) for h in hidden_states])
        elif isinstance(layer, int):
            selected = select(hidden_states[layer])
        else:
            selected = torch.cat([select(hidden_states[i]) for i in layer], dim=-1)
        image_outputs.pooler_output = list(self.multi_modal_projector(selected))  # N_img x (P, D)
        if not keep_hidden:  # every layer was computed for the selection; returned only when asked, as LLaVA
            image_outputs.hidden_states = None
        return image_outputs


class PerceptionGPTForConditionalGeneration(
    PerceptionGPTMixin, PerceptionGPTPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin
):
    def __init__(self, config: PerceptionGPTConfig):
        # Skip LlavaForConditionalGeneration.__init__, which would build a plain LlavaModel.
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = PerceptionGPTModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._build_perception_heads(config.vision_config.hidden_size)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Also loads folders saved before the heads moved to the top level (`LEGACY_KEY_MAPPING`)."""
        if kwargs.get("key_mapping") is None:
            kwargs["key_mapping"] = LEGACY_KEY_MAPPING
        return super().from_pretrained(*args, **kwargs)

    _image_encoder_kwargs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")

    forward = forward_with_native_signature(LlavaForConditionalGeneration, PerceptionGPTMixin.forward)

    def image_starts(self, input_ids):
        return image_starts_by_count(input_ids, self.config.image_token_id, self.config.num_image_tokens)

    def vision_layer_grids(self, image_outputs, image_kwargs):
        grid_tokens = self.config.patch_grid_size**2
        return [states[:, -grid_tokens:] for states in image_outputs.hidden_states]  # CLS dropped: (N_img, g*g, C)

    def image_token_grids(self, input_ids, hidden, image_outputs):
        is_image = input_ids == self.config.image_token_id  # (B, T)
        states = hidden[is_image].unflatten(0, (-1, self.config.num_image_tokens))  # (N_img, tokens, D)
        return states[:, -(self.config.patch_grid_size**2) :]  # without CLS under "full"


__all__ = [
    "PERCEPTION_MODULE_NAMES",
    "preferred_attn_implementation",
    "PerceptionGPTCausalLMOutput",
    "PerceptionGPTForConditionalGeneration",
    "PerceptionGPTModel",
    "PerceptionGPTPreTrainedModel",
]

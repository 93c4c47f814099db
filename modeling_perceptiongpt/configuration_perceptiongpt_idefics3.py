"""PerceptionGPT on Idefics3 and SmolVLM: their composite configs plus the perception fields of
`PerceptionConfigMixin`."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.idefics3.configuration_idefics3 import Idefics3Config
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMConfig

from .configuration_perceptiongpt import PERCEPTION_SUB_CONFIGS, PerceptionConfigMixin


class Idefics3FamilyConfigMixin:
    """What Idefics3 and SmolVLM share: a SigLIP tower without CLS (embeddings and layers recorded), and tiles (each
    its own image) whose patch grid is resampled to the fixed `mask_grid_size` for the heads."""

    @property
    def num_vision_hidden_states(self) -> int:
        return self.vision_config.num_hidden_layers + 1  # the patch embeddings and every layer

    @property
    def patch_grid_size(self) -> int:
        return self.mask_grid_size

    @property
    def vision_grid_size(self) -> int:
        """Side of one tile's ViT patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.mask_grid_size <= 0:
            raise ValueError(f"`mask_grid_size` must be > 0, got {self.mask_grid_size}.")


@strict
class PerceptionGPTIdefics3Config(Idefics3FamilyConfigMixin, PerceptionConfigMixin, Idefics3Config):
    """Idefics3's composite config plus the perception fields, and `mask_grid_size` (the heads' patch grid side)."""

    model_type = "perceptiongpt_idefics3"
    # Idefics3-8B's vocabulary (its `<image>` is 128257), so that the defaults build
    sub_configs_defaults = {
        **Idefics3Config.sub_configs_defaults,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 128260}),
        **PERCEPTION_SUB_CONFIGS,
    }

    vis_token_id: int = 128259
    mask_grid_size: int = 32


@strict
class PerceptionGPTSmolVLMConfig(Idefics3FamilyConfigMixin, PerceptionConfigMixin, SmolVLMConfig):
    """SmolVLM's composite config plus the perception fields, and `mask_grid_size` (the heads' patch grid side)."""

    model_type = "perceptiongpt_smolvlm"
    # SmolVLM-256M's vocabulary and `<image>` (49190), so that the defaults build
    sub_configs_defaults = {
        **SmolVLMConfig.sub_configs_defaults,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 49280}),
        **PERCEPTION_SUB_CONFIGS,
    }

    image_token_id: int = 49190
    vis_token_id: int = 49279
    mask_grid_size: int = 32


__all__ = ["PerceptionGPTIdefics3Config", "PerceptionGPTSmolVLMConfig"]

"""PerceptionGPT on Qwen2.5-VL: `Qwen2_5_VLConfig` plus the perception fields of `PerceptionConfigMixin`."""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig

from .configuration_perceptiongpt import PERCEPTION_SUB_CONFIGS, TINY_HEADS, PerceptionConfigMixin


@strict
class PerceptionGPTQwen2_5_VLConfig(PerceptionConfigMixin, Qwen2_5_VLConfig):
    """Qwen2.5-VL's composite config plus the perception fields, and:

        mask_grid_size: side of the fixed patch grid the mask decoder (and the "query" box head) reads. Qwen's
            images come at any resolution: each image's ViT states (and LLM image states) are resampled to it.
    `vis_token_id` defaults to the first id past Qwen2.5's tokenizer (151,665 tokens; the vocabulary has 151,936).
    """

    model_type = "perceptiongpt_qwen2_5_vl"
    sub_configs_defaults = {**Qwen2_5_VLConfig.sub_configs_defaults, **PERCEPTION_SUB_CONFIGS}

    vis_token_id: int = 151665
    mask_grid_size: int = 32

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.mask_grid_size <= 0:
            raise ValueError(f"`mask_grid_size` must be > 0, got {self.mask_grid_size}.")

    @property
    def num_vision_hidden_states(self) -> int:
        return self.vision_config.depth + 1  # the patch embeddings and every block, in window order

    @property
    def patch_grid_size(self) -> int:
        return self.mask_grid_size

    @property
    def suppressed_token_ids(self) -> list[int]:
        return [self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PerceptionGPTQwen2_5_VLConfig":
        """`tiny`: CPU unit tests in seconds (4 px patches, 2x2 merge, 2-layer towers, the byte-level tokenizer's
        ids plus Qwen's vision start/end and video ids past it)."""
        if name != "tiny":
            raise ValueError(f"`name` must be one of ['tiny'], got {name!r}.")
        tiny = {
            "vision_config": {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": 4,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
                "window_size": 16,
                "fullatt_block_indexes": [1],
                "out_hidden_size": 32,
            },
            "text_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": 272,
                "max_position_embeddings": 512,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            "image_token_id": 4,
            "vis_token_id": 5,
            "video_token_id": 262,
            "vision_start_token_id": 263,
            "vision_end_token_id": 264,
            "mask_grid_size": 4,
            **TINY_HEADS,
        }
        for key, value in overrides.items():
            tiny[key] = (
                {**tiny[key], **value} if isinstance(value, dict) and isinstance(tiny.get(key), dict) else value
            )
        return cls(**tiny)


__all__ = ["PerceptionGPTQwen2_5_VLConfig"]

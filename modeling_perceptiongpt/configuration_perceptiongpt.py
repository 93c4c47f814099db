"""PerceptionGPT configuration: a LLaVA composite config plus typed head sub-configs.

Every number the heads and losses use is a field here. Presets (`tiny`, `demo`, `paper`) are built by
`PerceptionGPTConfig.from_preset`. Coordinates inside the model are normalized xyxy in [0, 1].
"""

import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.llava.configuration_llava import LlavaConfig


# Ids shared with the offline tokenizer factory (processing/tokenization_factory.py) for the tiny/demo presets.
SPECIAL_TOKEN_IDS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4, "<vis>": 5}


def _check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"`{name}` must be > 0, got {value}.")


@strict
class BoxHeadConfig(PreTrainedConfig):
    """Box encoder (normalized xyxy -> hidden) and box decoder (hidden -> normalized xyxy).

    decoder_type: how the box is read from the state that predicts `<vis>` (benchmarks/head_ablation.py measures them):
        "mlp": the paper's regression MLP, in an ordered parametrization (x1 <= x2, y1 <= y2, no clamp);
        "bins": per ordered coordinate, logits over `num_bins` values; expectation + distribution focal loss;
        "query": the state attends the image (see `query_source`); the box contains the attended centre;
        "mask": the box of the decoded mask (its mass centre and spread);
        "legacy_cxcywh": sigmoid cxcywh clamped to [0, 1], only for folders saved before this field existed.
    encoder_type: how a box becomes a `<vis>` input embedding:
        "mlp": the paper's MLP on the 4 coordinates;
        "raster": that MLP plus a projection of the box's coverage of an `encoder_grid` x `encoder_grid` layout, so
        the embedding says WHERE the box is in the image's own grid terms (folders without the field: "mlp").
    """

    model_type = "perceptiongpt_box_head"
    base_config_key = "box_head_config"

    hidden_size: int = 512  # width of the encoder/decoder MLPs (paper: 512)
    num_layers: int = 3  # Linear layers per MLP (paper: 3)
    # the default is the design that measured best against text coordinates (docs/head_ablation.md)
    decoder_type: Literal["mlp", "bins", "query", "mask", "legacy_cxcywh"] = "query"
    num_bins: int = 32  # values per coordinate of the "bins" design
    # what the "query" design attends: the fused ViT patches ("vision"), or the LLM's final states at the image
    # tokens ("llm"), which have read the question when it comes before the image
    query_source: Literal["vision", "llm"] = "llm"
    # the "query" design also moves the attended centre by up to one patch; off: no consistent gain in the demo
    # (REC +5 points at 48 px, -0.5 at 64 px, RES -4 at both; one seed each, benchmarks/results/demo_ablation/)
    query_centre_offset: bool = False
    # the extent around that centre: the fraction of the room to each border, or ("half_size", lower on every task
    # of the demo, seed 0) the distance to each side in image units, softly capped by the border
    query_extent: Literal["room_fraction", "half_size"] = "room_fraction"
    # L > 0: a second stage, where the fused ViT patches at L x L points over the first box (grown by a quarter per
    # side) move its centre and extent, so that it can settle between patch centres; 0: one stage
    query_refine_layout: int = 0
    encoder_type: Literal["mlp", "raster"] = "raster"
    encoder_grid: int = 8  # cells per side of the "raster" encoder's layout

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_positive(self, "hidden_size", "num_layers", "encoder_grid")
        if self.query_refine_layout < 0:
            raise ValueError(f"`query_refine_layout` must be >= 0, got {self.query_refine_layout}.")
        if self.num_bins < 2:
            raise ValueError(f"`num_bins` must be >= 2, got {self.num_bins}.")


@strict
class MaskHeadConfig(PreTrainedConfig):
    """SAM-like mask decoder and the conv mask encoder for prompt masks."""

    model_type = "perceptiongpt_mask_head"
    base_config_key = "mask_head_config"

    hidden_size: int = 1024  # two-way transformer width (paper: 1024)
    num_hidden_layers: int = 2  # two-way blocks (paper: 2)
    num_attention_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-6
    num_upsample_layers: int = 3  # each doubles the patch grid (paper: 3, 28 -> 224)
    upsample_channels: int = 128  # channels of the upscaled map and of the hypernetwork output
    mask_size: int = 256  # side of the square mask frame (supervision and output; paper: 256)
    encoder_channels: int = 64  # mask encoder width (paper's ResNet encoder: 32 -> 64)
    encoder_num_layers: int = 4  # stride-2 conv stages of the mask encoder
    # "grid": pool to encoder_grid x encoder_grid and flatten (keeps the location); "mean": global average (legacy)
    encoder_type: Literal["grid", "mean"] = "grid"
    encoder_grid: int = 4

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_positive(
            self,
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "mlp_dim",
            "attention_downsample_rate",
            "upsample_channels",
            "mask_size",
            "encoder_channels",
            "encoder_num_layers",
            "encoder_grid",
        )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        if self.hidden_size % 4:
            raise ValueError(f"`hidden_size` must be divisible by 4 (2-D sine encoding), got {self.hidden_size}.")
        if self.num_upsample_layers < 0:
            raise ValueError(f"`num_upsample_layers` must be >= 0, got {self.num_upsample_layers}.")
        inner = self.hidden_size // self.attention_downsample_rate
        if inner % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size // attention_downsample_rate` ({inner}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )


LOSS_WEIGHTS = (
    "lm_loss_weight",
    "box_l1_weight",
    "box_giou_weight",
    "mask_dice_weight",
    "mask_bce_weight",
    "box_aux_weight",
)
# Folders saved before a head field existed were built with these designs; `from_dict` fills them in when absent.
LEGACY_HEAD_FIELDS = {
    "box_head_config": {"decoder_type": "legacy_cxcywh", "encoder_type": "mlp"},
    "mask_head_config": {"encoder_type": "mean"},
}


@strict
class PerceptionConfigMixin(PreTrainedConfig):
    """The perception fields every family's config adds to its native composite config.

    Args:
        vis_token_id: id of the `<vis>` token; one per object.
        box_head_config / mask_head_config: the head sub-configs.
        vision_fusion_layers: ViT hidden-state indices mixed by learned softmax weights into the mask decoder's
            features; None means every hidden state but the last, as in the paper.
        region_embedding_mode: how a `<vis>` input embedding carries its region: "replace" it (paper) or "add" to it.
        pool_region_features: also add to a PROMPT region's `<vis>` embedding the mean of its image's fused ViT patches
            under the region (`RegionFeaturePooling`); answer `<vis>` (supervised or generated) are never pooled.
        region_feature_layout: with `pool_region_features`, also sample the patches at the centres of an L x L layout
            of the region's box (RoIAlign-style), so that the embedding keeps the region's shape; 0: the mean only.
        *_weight: loss weights; the total is lm + l1 + giou + dice + bce + aux, each times its weight.
    A family config subclasses `(PerceptionConfigMixin, <Family>Config)` and defines `num_vision_hidden_states`,
    `patch_grid_size` (the side of the mask decoder's patch grid) and `suppressed_token_ids`.
    """

    box_head_config: dict | PreTrainedConfig | None = None
    mask_head_config: dict | PreTrainedConfig | None = None
    vis_token_id: int = 32002
    vision_fusion_layers: list[int] | None = None
    region_embedding_mode: Literal["replace", "add"] = "replace"
    pool_region_features: bool = False
    region_feature_layout: int = 0
    lm_loss_weight: float = 1.0
    box_l1_weight: float = 1.0
    box_giou_weight: float = 1.0
    mask_dice_weight: float = 1.0
    mask_bce_weight: float = 1.0
    # the box design's own dense loss: "bins" its distribution focal loss, "query" the cross-entropy of its
    # attention against the patches inside the target box; the other designs have none
    box_aux_weight: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        num_hidden_states = self.num_vision_hidden_states
        if self.vision_fusion_layers is None:
            self.vision_fusion_layers = list(range(num_hidden_states - 1))
        if not self.vision_fusion_layers:
            raise ValueError("`vision_fusion_layers` must name at least one ViT layer, got [].")
        bad = [i for i in self.vision_fusion_layers if not -num_hidden_states <= i < num_hidden_states]
        if bad:
            raise ValueError(
                f"`vision_fusion_layers` must index the {num_hidden_states} ViT hidden states, got out-of-range {bad}."
            )
        if self.region_feature_layout < 0:
            raise ValueError(f"`region_feature_layout` must be >= 0, got {self.region_feature_layout}.")
        for name in LOSS_WEIGHTS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        vocab = self.text_config.vocab_size
        for name in ("vis_token_id", "image_token_id"):
            if not 0 <= getattr(self, name) < vocab:
                raise ValueError(
                    f"`{name}` must be in [0, {vocab}) (text_config.vocab_size), got {getattr(self, name)}."
                )
        if self.vis_token_id in self.suppressed_token_ids:
            raise ValueError(
                f"`vis_token_id` ({self.vis_token_id}) must differ from the modality token ids "
                f"{self.suppressed_token_ids}."
            )

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`, where a head sub-config without `decoder_type` / `encoder_type` (a folder
        saved before those fields) keeps the design it was saved with rather than today's default."""
        config_dict = dict(config_dict)
        for key, legacy in LEGACY_HEAD_FIELDS.items():
            if isinstance(config_dict.get(key), dict):
                config_dict[key] = {**legacy, **config_dict[key]}
        return super().from_dict(config_dict, **kwargs)

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Modality placeholders the model must never sample."""
        return [self.image_token_id]


PERCEPTION_SUB_CONFIGS = {
    "box_head_config": SubConfigSpec(config_class=BoxHeadConfig),
    "mask_head_config": SubConfigSpec(config_class=MaskHeadConfig),
}


@strict
class PerceptionGPTConfig(PerceptionConfigMixin, LlavaConfig):
    """LLaVA composite config (vision_config, text_config, projector) plus the perception fields of
    `PerceptionConfigMixin`, and:

        fuse_llm_features: also feed the fused ViT mix (instead of `vision_feature_layer`) to the LLM path (paper: on).
    """

    model_type = "perceptiongpt"
    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        # llava-1.5-7b-hf's padded vocabulary, so that the default `image_token_id` (32000) and `vis_token_id`
        # (32002) are inside it and `PerceptionGPTConfig()` builds
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 32064, "pad_token_id": 32001}
        ),
        **PERCEPTION_SUB_CONFIGS,
    }

    fuse_llm_features: bool = False

    @property
    def num_vision_hidden_states(self) -> int:
        return self.vision_config.num_hidden_layers + 1  # CLIP: the embeddings and every layer

    @property
    def patch_grid_size(self) -> int:
        """Side of the ViT patch grid that the mask decoder reads."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.patch_grid_size**2 + (self.vision_feature_select_strategy == "full")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PerceptionGPTConfig":
        """Build a preset: `tiny` (unit tests), `demo` (CPU demo) or `paper` (the paper's heads, LLaVA-1.5-7B layout).

        `overrides` replace top-level fields (e.g. `vocab_size` of the text config via `text_config={...}`).
        """
        if name not in _PRESETS:
            raise ValueError(f"`name` must be one of {sorted(_PRESETS)}, got {name!r}.")
        kwargs = {key: (dict(value) if isinstance(value, dict) else value) for key, value in _PRESETS[name].items()}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return cls(**kwargs)


# The heads of every family's `tiny` preset (CPU unit tests in seconds; the simplest box head).
TINY_HEADS = {
    "box_head_config": {"hidden_size": 32, "num_layers": 3, "decoder_type": "mlp"},
    "mask_head_config": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mlp_dim": 64,
        "num_upsample_layers": 2,
        "upsample_channels": 8,
        "mask_size": 16,
        "encoder_channels": 8,
        "encoder_num_layers": 2,
    },
}


def _small_preset(image_size, patch_size, vision_hidden, vision_layers, text_hidden, text_layers, heads, box, mask):
    grid = image_size // patch_size
    return {
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": heads,
            "projection_dim": vision_hidden,
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "vocab_size": 262,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "image_token_id": SPECIAL_TOKEN_IDS["<image>"],
        "vis_token_id": SPECIAL_TOKEN_IDS["<vis>"],
        "image_seq_length": grid * grid,
        "vision_feature_layer": -1,
        "box_head_config": box,
        "mask_head_config": mask,
    }


_PRESETS = {
    # Seconds on CPU: 16 px images, 4x4 patch grid, 2-layer towers. Vocab = byte-level tokenizer (256 + 6 specials).
    "tiny": _small_preset(
        image_size=16,
        patch_size=4,
        vision_hidden=32,
        vision_layers=2,
        text_hidden=32,
        text_layers=2,
        heads=2,
        box=TINY_HEADS["box_head_config"],
        mask=TINY_HEADS["mask_head_config"],
    ),
    # Learns grounding on 2 CPU cores in minutes: the synthetic scenes' own 64 px (48 px scored REC 0.540 against
    # 0.645 at 3000 steps), 8x8 patches. The demo sets vocab_size from its tokenizer.
    "demo": {
        **_small_preset(
            image_size=64,
            patch_size=8,
            vision_hidden=96,
            vision_layers=4,
            text_hidden=128,
            text_layers=4,
            heads=4,
            # the second box stage: REC hits 0.6 px too wide instead of 1.7; multi F1 0.501 / 0.422 over 2 seeds
            box={"hidden_size": 128, "num_layers": 3, "query_refine_layout": 4},
            mask={
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "mlp_dim": 128,
                "num_upsample_layers": 2,
                "upsample_channels": 16,
                # the upsampler's own 32 (8 x 8 patches, two 2x upsamplings): RES gIoU 0.624 against 0.550 at 24
                "mask_size": 32,
                "encoder_channels": 16,
                "encoder_num_layers": 3,
            },
        ),
        # a prompt region also brings what its image holds under it: REG from a box 0.224 -> 0.393 at 48 px
        "pool_region_features": True,
        # ... and its layout, which keeps the shape: REG shape errors 55 -> 29 of 107 (seed 0)
        "region_feature_layout": 3,
    },
    # The paper's heads and loss weights on the llava-hf/llava-1.5-7b-hf layout (CLIP-L/14-336, 2-layer projector,
    # Vicuna-7B). Deviations from the paper's LLaVA-v1 base are listed in the README.
    "paper": {
        "text_config": {"model_type": "llama", "vocab_size": 32064, "pad_token_id": 32001},
        "image_token_id": 32000,
        "vis_token_id": 32002,
        "image_seq_length": 576,
        "fuse_llm_features": True,
        "region_embedding_mode": "replace",
        "box_head_config": {"hidden_size": 512, "num_layers": 3, "decoder_type": "mlp", "encoder_type": "mlp"},
        "mask_head_config": {
            "hidden_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "mlp_dim": 2048,
            "num_upsample_layers": 3,
            "upsample_channels": 128,
            "mask_size": 256,
        },
    },
}


__all__ = [
    "BoxHeadConfig",
    "MaskHeadConfig",
    "PerceptionConfigMixin",
    "PerceptionGPTConfig",
    "SPECIAL_TOKEN_IDS",
    "TINY_HEADS",
]

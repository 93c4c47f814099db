"""Light perception heads: box encoder, mask encoder, adaptive ViT layer fusion (box decoders: box_decoders_*).

Shapes: N = number of `<vis>` slots, D = text hidden size, L = fused ViT layers, P = patches, C = ViT width,
S = mask frame side. Boxes are normalized xyxy in [0, 1].
"""

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamLayerNorm

from .box_decoders_perceptiongpt import BOX_DECODERS, mlp, sample_box_layout
from .configuration_perceptiongpt import BoxHeadConfig, MaskHeadConfig


# The heads every model has (trained in full under LoRA, new when converting a base checkpoint), and the optional ones
PERCEPTION_MODULE_NAMES = ["box_encoder", "mask_encoder", "mask_feature_fusion", "box_decoder", "mask_decoder"]
OPTIONAL_PERCEPTION_MODULES = {
    "fuse_llm_features": "llm_feature_fusion",
    "pool_region_features": "region_feature_pooling",
}
PERCEPTION_NO_SPLIT_MODULES = [
    "BoxEncoder",
    "MaskEncoder",
    "MaskDecoder",
    "LayerFusion",
    *sorted({decoder.__name__ for decoder in BOX_DECODERS.values()}),
]


def perception_module_names(config) -> list[str]:
    """The heads of a model with `config`: `PERCEPTION_MODULE_NAMES` plus the optional ones its flags turn on."""
    optional = [name for flag, name in OPTIONAL_PERCEPTION_MODULES.items() if getattr(config, flag, False)]
    return PERCEPTION_MODULE_NAMES + optional


def box_coverage(boxes_xyxy: torch.Tensor, grid: int) -> torch.Tensor:
    """(..., 4) normalized xyxy, ordered (x1 <= x2, y1 <= y2) -> (..., grid * grid): the fraction of each cell of a
    grid x grid layout (row-major) that the box covers. Elementwise, without branches: it traces inside a compiled
    decode step."""
    cells = torch.arange(grid, device=boxes_xyxy.device, dtype=boxes_xyxy.dtype)  # (g,)
    # how far each side of the box reaches into each row / column of cells, from 0 (before it) to 1 (past it)
    reach = (boxes_xyxy[..., None] * grid - cells).clamp(0, 1)  # (..., 4, g)
    cover = reach[..., 2:, :] - reach[..., :2, :]  # (..., 2, g): per axis, the covered fraction of each row / column
    return (cover[..., 1, :, None] * cover[..., 0, None, :]).flatten(-2)  # (y, x) row-major


def _first_and_end(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S) bool -> (N,), (N,): the index of each line's first True and one past its last (0 and S when none)."""
    return lines.float().argmax(-1), lines.shape[-1] - lines.flip(-1).float().argmax(-1)


class BoxEncoder(nn.Module):
    """Normalized xyxy box -> a `<vis>` input embedding (paper: MLP 4 -> 512 -> 512 -> D); `encoder_type="raster"`
    adds a projection of the box's coverage of the `encoder_grid` layout."""

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int):
        super().__init__()
        self.mlp = mlp(4, config.hidden_size, text_hidden_size, config.num_layers)
        self.grid = config.encoder_grid if config.encoder_type == "raster" else None
        self.raster = None if self.grid is None else nn.Linear(self.grid**2, text_hidden_size)

    def forward(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        embedding = self.mlp(boxes_xyxy)  # (..., 4) -> (..., D)
        if self.raster is not None:
            embedding = embedding + self.raster(box_coverage(boxes_xyxy, self.grid))  # (..., g*g) -> (..., D)
        return embedding


class MaskEncoder(nn.Module):
    """Bool/float mask in the mask frame -> a `<vis>` input embedding (a small strided conv net).

    `encoder_type="grid"` pools the conv map to a fixed `encoder_grid` x `encoder_grid` layout and flattens it, so
    the embedding keeps WHERE the mask is (the paper flattens its 8x8 map). `"mean"`, the global average of folders
    saved before the field existed, is nearly translation-invariant.
    """

    def __init__(self, config: MaskHeadConfig, text_hidden_size: int):
        super().__init__()
        layers, channels = [], 1
        for _ in range(config.encoder_num_layers):
            layers += [
                nn.Conv2d(channels, config.encoder_channels, kernel_size=3, stride=2, padding=1),
                SamLayerNorm(config.encoder_channels, data_format="channels_first"),
                nn.GELU(),
            ]
            channels = config.encoder_channels
        self.convs = nn.Sequential(*layers)
        cells = config.encoder_grid**2 if config.encoder_type == "grid" else 1
        self.pool = nn.AdaptiveAvgPool2d(config.encoder_grid if config.encoder_type == "grid" else 1)
        self.proj = nn.Linear(config.encoder_channels * cells, text_hidden_size)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        x = self.convs(masks[:, None].to(self.proj.weight.dtype))  # (N, S, S) -> (N, c, S', S')
        return self.proj(self.pool(x).flatten(1))  # (N, c * cells) -> (N, D)


class RegionFeaturePooling(nn.Module):
    """A prompt region's appearance: the mean of its image's fused ViT patches under the region, weighted by how much
    of each patch it covers, projected to the text width and added to its `<vis>` embedding. The box and mask
    encoders carry WHERE the region is; this carries WHAT is there (region features as in GPT4RoI and Osprey).
    With `layout` L > 0 the patches are also sampled (bilinearly, RoIAlign-style) at the centres of an L x L layout
    of the region's box (a mask's: its bounding box), so that the embedding keeps the region's shape, which a mean
    drops."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, grid: int, layout: int = 0):
        super().__init__()
        self.grid, self.layout = grid, layout
        self.norm = nn.LayerNorm(vision_hidden_size)
        self.proj = nn.Linear(vision_hidden_size * (1 + layout**2), text_hidden_size)

    def region_weights(self, boxes_xyxy, masks=None, use_mask=None) -> torch.Tensor:
        """(N, 4) normalized xyxy boxes, and (N_m, S, S) masks for the rows `use_mask` (N,) -> (N, g*g): the share of
        each patch that a row's mask, else its box, covers."""
        weights = box_coverage(boxes_xyxy.nan_to_num(0.0).float(), self.grid)  # (N, g*g)
        if masks is not None:
            weights[use_mask] = nn.functional.adaptive_avg_pool2d(masks[:, None].float(), self.grid).flatten(1)
        return weights

    @staticmethod
    def region_boxes(boxes_xyxy, masks=None, use_mask=None) -> torch.Tensor:
        """(N, 4) normalized xyxy, and (N_m, S, S) masks for the rows `use_mask` -> (N, 4): the box of each row's
        layout, a mask's bounding box where it has one (the whole frame for an empty mask)."""
        boxes = boxes_xyxy.nan_to_num(0.0).float().clone()  # (N, 4)
        if masks is not None:
            x1, x2 = _first_and_end(masks.bool().any(-2))  # (N_m,) each, in mask pixels
            y1, y2 = _first_and_end(masks.bool().any(-1))
            boxes[use_mask] = torch.stack([x1, y1, x2, y2], dim=-1) / masks.shape[-1]
        return boxes

    def forward(self, image_features: torch.Tensor, weights: torch.Tensor, boxes_xyxy=None) -> torch.Tensor:
        """image_features (N, g*g, C), weights (N, g*g), boxes_xyxy (N, 4) (`region_boxes`; with a layout) -> (N, D)."""
        weights = weights.to(image_features.dtype)
        pooled = (weights[..., None] * image_features).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-6)  # (N, C)
        parts = pooled[:, None]  # (N, 1, C)
        if self.layout:
            parts = torch.cat(
                [parts, sample_box_layout(image_features, boxes_xyxy, self.layout)], dim=1
            )  # (N, 1 + L*L, C)
        return self.proj(self.norm(parts).flatten(1))


class LayerFusion(nn.Module):
    """Adaptive multi-layer fusion: a learned softmax-weighted sum of ViT hidden states.

    Zero-initialized logits give the paper's uniform 1/L start.
    """

    def __init__(self, layers: list[int]):
        super().__init__()
        self.layers = list(layers)
        self.logits = nn.Parameter(torch.zeros(len(self.layers)))

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        stacked = torch.stack([hidden_states[i] for i in self.layers])  # (L, N_img, P, C)
        weights = self.logits.softmax(0).to(stacked.dtype)  # (L,)
        return torch.einsum("l,lnpc->npc", weights, stacked)  # (N_img, P, C)


__all__ = [
    "OPTIONAL_PERCEPTION_MODULES",
    "PERCEPTION_MODULE_NAMES",
    "PERCEPTION_NO_SPLIT_MODULES",
    "BoxEncoder",
    "LayerFusion",
    "MaskEncoder",
    "RegionFeaturePooling",
    "perception_module_names",
]

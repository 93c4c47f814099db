"""Light perception heads: box encoder/decoder, mask encoder, adaptive ViT layer fusion.

Shapes: N = number of `<vis>` slots, D = text hidden size, L = fused ViT layers, P = patches, C = ViT width,
S = mask frame side. Boxes are normalized xyxy in [0, 1].
"""

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamLayerNorm

from .box_ops import box_cxcywh_to_xyxy
from .configuration_perceptiongpt import BoxHeadConfig, MaskHeadConfig


def _mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int) -> nn.Sequential:
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < num_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BoxEncoder(nn.Module):
    """Normalized xyxy box -> a `<vis>` input embedding (paper: MLP 4 -> 512 -> 512 -> D)."""

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int):
        super().__init__()
        self.mlp = _mlp(4, config.hidden_size, text_hidden_size, config.num_layers)

    def forward(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        return self.mlp(boxes_xyxy)  # (N, 4) -> (N, D)


class BoxDecoder(nn.Module):
    """Hidden state -> normalized xyxy box.

    The MLP predicts sigmoid (cx, cy, w, h); converting to corners and clamping to [0, 1] guarantees x1 <= x2 and
    y1 <= y2 for any input. The last layer starts at zero, so the first prediction is the centred half-size box.
    """

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int):
        super().__init__()
        self.mlp = _mlp(text_hidden_size, config.hidden_size, 4, config.num_layers)
        self.mlp[-1].zero_init = True  # read by PerceptionGPTPreTrainedModel._init_weights

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        boxes_cxcywh = self.mlp(hidden).float().sigmoid()  # (N, D) -> (N, 4)
        return box_cxcywh_to_xyxy(boxes_cxcywh).clamp(0.0, 1.0)  # (N, 4) xyxy


class MaskEncoder(nn.Module):
    """Bool/float mask in the mask frame -> a `<vis>` input embedding (a small strided conv net)."""

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
        self.proj = nn.Linear(config.encoder_channels, text_hidden_size)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        x = self.convs(masks[:, None].to(self.proj.weight.dtype))  # (N, S, S) -> (N, c, S', S')
        return self.proj(x.mean(dim=(2, 3)))  # (N, c) -> (N, D)


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


__all__ = ["BoxEncoder", "BoxDecoder", "MaskEncoder", "LayerFusion"]

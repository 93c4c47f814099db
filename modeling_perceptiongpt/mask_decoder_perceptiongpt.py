"""SAM-like mask decoder: the `<vis>` hidden state queries fused ViT features through a two-way transformer.

Reuses transformers' SAM two-way transformer and layer norm rather than copying them. Unlike the official code,
the 2-D sine positional encoding here has its channel and spatial axes the right way round.

Shapes: N = `<vis>` slots to decode, D = text hidden, C = ViT width, g = patch grid side, d = mask_head hidden,
u = upsample channels, S = mask frame side.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamLayerNorm, SamTwoWayTransformer

from .configuration_perceptiongpt import MaskHeadConfig


def sine_position_encoding_2d(dim: int, height: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR-style 2-D sine/cosine encoding, (dim, height, width); half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"`dim` must be divisible by 4 for a 2-D sine encoding, got {dim}.")
    quarter = dim // 4
    freqs = temperature ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 * math.pi  # (h,)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 * math.pi  # (w,)
    y = ys[:, None] * freqs[None]  # (h, dim/4)
    x = xs[:, None] * freqs[None]  # (w, dim/4)
    y_enc = torch.cat([y.sin(), y.cos()], dim=-1)[:, None, :].expand(height, width, dim // 2)  # (h, w, dim/2)
    x_enc = torch.cat([x.sin(), x.cos()], dim=-1)[None, :, :].expand(height, width, dim // 2)  # (h, w, dim/2)
    return torch.cat([y_enc, x_enc], dim=-1).permute(2, 0, 1).contiguous()  # (dim, h, w)


def sam_attention(implementation: str | None) -> str:
    """The mask decoder's attention for the model's: eager when asked, else sdpa (the decoder runs in fp32, where
    half-precision kernels such as flash attention do not apply)."""
    return "eager" if implementation == "eager" else "sdpa"


class MaskDecoder(nn.Module):
    def __init__(
        self,
        config: MaskHeadConfig,
        text_hidden_size: int,
        vision_hidden_size: int,
        grid_size: int,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        d, u = config.hidden_size, config.upsample_channels
        self.grid_size = grid_size
        self.mask_size = config.mask_size
        self.query_proj = nn.Linear(text_hidden_size, d)
        # residual MLP adaptor from ViT width to the decoder width (the paper's `visual_adaptor`)
        self.feature_shortcut = nn.Linear(vision_hidden_size, d)
        self.feature_mlp = nn.Sequential(nn.Linear(vision_hidden_size, d), nn.ReLU(), nn.Linear(d, d))
        self.register_buffer(
            "position_encoding", sine_position_encoding_2d(d, grid_size, grid_size), persistent=False
        )  # (d, g, g)
        sam_config = SamMaskDecoderConfig(
            hidden_size=d,
            hidden_act=config.hidden_act,
            mlp_dim=config.mlp_dim,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            attention_downsample_rate=config.attention_downsample_rate,
            layer_norm_eps=config.layer_norm_eps,
        )
        sam_config._attn_implementation = sam_attention(attn_implementation)  # see `set_attn_implementation`
        self.transformer = SamTwoWayTransformer(sam_config)
        upsample, channels = [], d
        for i in range(config.num_upsample_layers):
            out = u if i == config.num_upsample_layers - 1 else max(u, channels // 2)
            upsample += [
                nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2),
                SamLayerNorm(out, data_format="channels_first"),
                nn.GELU(),
            ]
            channels = out
        upsample.append(nn.Conv2d(channels, u, kernel_size=1))
        self.upsample = nn.Sequential(*upsample)
        self.hypernetwork = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, u))

    def set_attn_implementation(self, implementation: str | None) -> None:
        """Follows the model's choice: the SAM layers read it from their own config, which no sub-config reaches."""
        self.transformer.config._attn_implementation = sam_attention(implementation)

    def forward(self, hidden: torch.Tensor, image_features: torch.Tensor, image_index=None) -> torch.Tensor:
        """hidden (N, D): states that predict `<vis>`; image_features (N, g*g, C): fused ViT patches of each slot's
        image, or (M, g*g, C) of M images with image_index (N,) picking each slot's (each image is then adapted
        once). Returns mask logits (N, S, S) in the model's (resized/padded) image frame."""
        g = self.grid_size
        dtype = self.query_proj.weight.dtype
        query = self.query_proj(hidden.to(dtype))[:, None, None, :]  # (N, 1, 1, d)
        feats = image_features.to(dtype)
        feats = self.feature_shortcut(feats) + self.feature_mlp(feats)  # (N or M, g*g, d)
        feats = feats if image_index is None else feats[image_index]  # (N, g*g, d)
        feats = feats.transpose(1, 2).reshape(feats.shape[0], -1, g, g)  # (N, d, g, g)
        pos = self.position_encoding.to(dtype)[None]  # (1, d, g, g)
        query, keys = self.transformer(
            point_embeddings=query, image_embeddings=feats, image_positional_embeddings=pos, attention_similarity=None
        )  # (N, 1, 1, d), (N, 1, g*g, d)
        keys = keys[:, 0].transpose(1, 2).reshape(feats.shape)  # (N, d, g, g)
        upscaled = self.upsample(keys)  # (N, u, g', g')
        weights = self.hypernetwork(query[:, 0, 0])  # (N, u)
        logits = torch.einsum("nu,nuhw->nhw", weights, upscaled)  # (N, g', g')
        if logits.shape[-1] != self.mask_size:
            logits = F.interpolate(logits[:, None], size=(self.mask_size, self.mask_size), mode="bilinear")[:, 0]
        return logits.float()  # (N, S, S)


__all__ = ["MaskDecoder", "sam_attention", "sine_position_encoding_2d"]

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
from .region_inputs import heads_inference_mode


# Inference decodes many masks in chunks whose upscaled maps fit this many bytes: buffers the allocator reuses between
# chunks, where one pass over all of them page-faults fresh memory for every intermediate map. At 4 MiB, glibc still
# returned each chunk's freed maps to the system between chunks: 512 demo-sized masks at batch 8 of
# benchmarks/generate_overhead.py took ~12k page faults and 68 ms, against ~250 faults and 55 ms at 2 MiB (1 MiB: 60 ms).
INFERENCE_CHUNK_BYTES = 2 * 2**20


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


class UpsampleConvTranspose(nn.ConvTranspose2d):
    """A 2x2, stride-2 transposed conv on channels-last maps as one matmul: (..., C) -> (..., 2, 2, C'), each input
    pixel's 2 x 2 output block (dy, dx) kept beside it. Every later step of the upsampler works per pixel (the norm,
    GELU, the next such conv, the 1x1 projection), so `blocks_to_raster` puts the pixels in raster order once, on the
    one-channel logits: no pixel-shuffle copies of the wide maps. About twice as fast on CPU as the convolution
    kernel at these widths. Parameters as nn.ConvTranspose2d's (weight (C, C', 2, 2)), so checkpoints load unchanged."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        channels, out = features.shape[-1], self.out_channels
        weight = self.weight.permute(0, 2, 3, 1).reshape(channels, 4 * out)  # (C, 2*2*C'): (dy, dx, c') per channel
        blocks = torch.addmm(self.bias.repeat(4), features.reshape(-1, channels), weight)  # (pixels, 4C')
        return blocks.view(*features.shape[:-1], 2, 2, out)  # (..., dy, dx, C')


def blocks_to_raster(blocks: torch.Tensor) -> torch.Tensor:
    """(N, H, W, [dy, dx] * k) the per-pixel 2 x 2 blocks of k `UpsampleConvTranspose` -> (N, H * 2^k, W * 2^k) maps:
    row h * 2^k + (dy_1 ... dy_k in binary), column w * 2^k + (dx_1 ... dx_k)."""
    n, height, width = blocks.shape[:3]
    k = (blocks.dim() - 3) // 2
    rows, columns = list(range(3, 3 + 2 * k, 2)), list(range(4, 4 + 2 * k, 2))
    return blocks.permute(0, 1, *rows, 2, *columns).reshape(n, height * 2**k, width * 2**k)


class HypernetworkProjection(nn.Conv2d):
    """The upsampler's last 1x1 conv, applied with the per-slot hypernetwork weights: mask logits are
    sum_o weights[n, o] * conv(x)[n, o], computed as x . (weights @ W) + weights . b, so the conv is folded into the
    (N, u) weights instead of run on every pixel. A module of its own, so that accelerate's hooks (offload) see its
    weights used inside its forward. Parameters as nn.Conv2d's (weight (u, C, 1, 1))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """features (N, ..., C) channels-last, weights (N, u) -> (N, ...) mask logits."""
        folded = weights @ self.weight.flatten(1)  # (N, C)
        bias = (weights @ self.bias)[:, None, None]  # (N, 1, 1)
        return torch.baddbmm(bias, features.flatten(1, -2), folded[:, :, None]).view(features.shape[:-1])


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
        # channels-last throughout: every step is a matmul or a norm over the last dim (see `UpsampleConvTranspose`)
        upsample, channels = [], d
        for i in range(config.num_upsample_layers):
            out = u if i == config.num_upsample_layers - 1 else max(u, channels // 2)
            upsample += [
                UpsampleConvTranspose(channels, out),
                SamLayerNorm(out, data_format="channels_last"),
                nn.GELU(),
            ]
            channels = out
        upsample.append(HypernetworkProjection(channels, u))
        self.upsample = nn.Sequential(*upsample)
        self.hypernetwork = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, u))

    def set_attn_implementation(self, implementation: str | None) -> None:
        """Follows the model's choice: the SAM layers read it from their own config, which no sub-config reaches."""
        self.transformer.config._attn_implementation = sam_attention(implementation)

    def decode_in_chunks(self, hidden: torch.Tensor, image_features: torch.Tensor, image_index: torch.Tensor):
        """`forward` with image_index, run over chunks of slots (see `INFERENCE_CHUNK_BYTES`): for generate()'s returned
        masks, which are decoded without gradients. Returns (N, S, S) mask logits."""
        side = self.grid_size * 2 ** (len(self.upsample) // 3)
        per_slot = side * side * self.upsample[-1].in_channels * self.query_proj.weight.element_size()
        step = max(INFERENCE_CHUNK_BYTES // per_slot, 1)
        with heads_inference_mode():
            chunks = [
                self(hidden[i : i + step], image_features, image_index[i : i + step])
                for i in range(0, len(hidden), step)
            ]
        return torch.cat(chunks)  # (N, S, S), a normal tensor

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
        feats = feats.transpose(1, 2).unflatten(-1, (g, g))  # (N, d, g, g): a view, which SAM flattens back
        pos = self.position_encoding.to(dtype)[None]  # (1, d, g, g)
        query, keys = self.transformer(
            point_embeddings=query, image_embeddings=feats, image_positional_embeddings=pos, attention_similarity=None
        )  # (N, 1, 1, d), (N, 1, g*g, d)
        upscaled = keys[:, 0].reshape(len(keys), g, g, -1)  # (N, g, g, d): channels-last
        for layer in self.upsample[:-1]:
            upscaled = layer(upscaled)  # (N, g, g, [2, 2] * k, u) at the end: per-pixel blocks
        weights = self.hypernetwork(query[:, 0, 0])  # (N, u)
        logits = blocks_to_raster(self.upsample[-1](upscaled, weights))  # (N, g', g')
        if logits.shape[-1] != self.mask_size:
            logits = F.interpolate(logits[:, None], size=(self.mask_size, self.mask_size), mode="bilinear")[:, 0]
        return logits.float()  # (N, S, S)


__all__ = [
    "HypernetworkProjection",
    "MaskDecoder",
    "UpsampleConvTranspose",
    "blocks_to_raster",
    "sam_attention",
    "sine_position_encoding_2d",
]

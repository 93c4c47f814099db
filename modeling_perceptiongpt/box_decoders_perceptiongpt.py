"""Box decoders: the state that predicts `<vis>` -> a normalized xyxy box, one design per `decoder_type`.

Every design but `legacy_cxcywh` builds its box in an ordered parametrization, so x1 <= x2 and y1 <= y2 inside
[0, 1] hold by construction and no clamp zeroes a gradient before the loss:
    x1 = u_x,  x2 = x1 + f_x * (1 - x1),  u_x, f_x in [0, 1]   (the same for y)
Shapes: N slots, D text hidden, P = g*g patches, C ViT width, S mask side, n bins, d head width.
Every forward takes (hidden, image_features, has_image, mask_logits, vision_patches); each design reads what it needs.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .configuration_perceptiongpt import BoxHeadConfig


# The box decoders are in `_keep_in_fp32_modules_strict`: built in fp32 even under a half default dtype.
FP32 = torch.float32

# The second stage of the query design reads the first box grown by this fraction of its size on each side.
REFINE_GROWTH = 0.25

# Offsets that make zero logits the centred half-size box (0.25, 0.25, 0.75, 0.75): u = 1/4, f = 2/3.
_CENTRED_OFFSETS = (math.log(1 / 3), math.log(2), math.log(1 / 3), math.log(2))

IMAGE_CORNERS_XYXY = (0.0, 0.0, 1.0, 1.0)


def mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int, dtype=None) -> nn.Sequential:
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < num_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def ordered_box_xyxy(unit: torch.Tensor) -> torch.Tensor:
    """(N, 4) (u_x, f_x, u_y, f_y) in [0, 1] -> (N, 4) xyxy with x1 <= x2, y1 <= y2 in [0, 1]."""
    ux, fx, uy, fy = unit.unbind(-1)
    return torch.stack([ux, uy, ux + fx * (1 - ux), uy + fy * (1 - uy)], dim=-1)


def ordered_params_from_box_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """The inverse of `ordered_box_xyxy` on valid boxes: (N, 4) xyxy -> (N, 4) (u_x, f_x, u_y, f_y); f = 0 at u = 1."""
    x1, y1, x2, y2 = boxes.clamp(0, 1).unbind(-1)  # targets only: no gradient flows here

    def fraction(low, high):
        room = 1 - low
        return torch.where(room > 0, (high - low).clamp(min=0) / room.clamp(min=1e-12), torch.zeros_like(low))

    return torch.stack([x1, fraction(x1, x2), y1, fraction(y1, y2)], dim=-1)


def box_around_centre_xyxy(centre: torch.Tensor, spread: torch.Tensor, corners=None) -> torch.Tensor:
    """A box that contains `centre` (N, 2) (x, y) in [0, 1]: `spread` (N, 4) in [0, 1] are the fractions of the room
    to the left, top, right and bottom that it covers -> (N, 4) xyxy, ordered by construction. `corners`: the
    image's (0, 0, 1, 1), given by a caller that keeps it (this runs at every decoded `<vis>`)."""
    corners = centre.new_tensor(IMAGE_CORNERS_XYXY) if corners is None else corners  # (4,)
    return torch.lerp(torch.cat([centre, centre], dim=-1), corners, spread)  # from the centre toward each border


def patch_centres(grid: int, device=None) -> torch.Tensor:
    """(g*g, 2) normalized (x, y) centres of a row-major patch grid."""
    steps = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) / grid
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def layout_steps(layout: int, grow: float = 0.0, device=None) -> torch.Tensor:
    """(L,) where the centres of L equal cells lie along a box side, as fractions of the side from its low end,
    after growing the box by `grow` of its size on each side."""
    return (torch.arange(layout, dtype=torch.float32, device=device) + 0.5) / layout * (1 + 2 * grow) - grow


def layout_points(layout: int, grow: float = 0.0, device=None) -> torch.Tensor:
    """(4, L*L*2): normalized xyxy boxes (N, 4) @ this - 1 = the (x, y) of their L x L cell centres (row-major,
    `layout_steps` along each side) in grid_sample's [-1, 1] frame, as one matmul."""
    steps = layout_steps(layout, grow, device)  # (L,)
    weights = torch.zeros(4, layout, layout, 2, device=device)  # (xyxy, cell row, cell column, x or y)
    weights[0, :, :, 0], weights[2, :, :, 0] = 2 * (1 - steps), 2 * steps  # x from x1, x2: along the columns
    weights[1, :, :, 1], weights[3, :, :, 1] = 2 * (1 - steps[:, None]), 2 * steps[:, None]  # y: along the rows
    return weights.flatten(1)


def sample_box_layout(patches: torch.Tensor, boxes_xyxy: torch.Tensor, layout: int, points=None) -> torch.Tensor:
    """patches (N, g*g, C) of a row-major g x g grid, boxes_xyxy (N, 4) -> (N, L*L, C): the patch map read
    bilinearly (RoIAlign-style) at the centres of each box's L x L cells, row-major; points past the outer patch
    centres read the border patches. `points` (4, L*L*2): other points in each box (`layout_points`)."""
    n, num_patches, channels = patches.shape
    grid = math.isqrt(num_patches)
    patch_map = patches.transpose(1, 2).reshape(n, channels, grid, grid)  # (N, C, g, g)
    points = layout_points(layout, device=boxes_xyxy.device) if points is None else points
    grid_points = (boxes_xyxy @ points.to(boxes_xyxy.dtype) - 1).view(n, layout, layout, 2)  # (N, L, L, 2): (x, y)
    sampled = nn.functional.grid_sample(
        patch_map, grid_points.to(patch_map.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )  # (N, C, L, L)
    return sampled.flatten(2).transpose(1, 2)  # (N, L*L, C)


@dataclass
class BoxPrediction:
    """boxes (N, 4) normalized xyxy; bin_logits (N, 4, n) over (u_x, f_x, u_y, f_y) for `bins`; patch_logits
    (N, P) attention logits of `query` (rows without an image: zeros, never supervised)."""

    boxes: torch.Tensor
    bin_logits: torch.Tensor | None = None
    patch_logits: torch.Tensor | None = None


class LegacyBoxDecoder(nn.Module):
    """The design of folders saved before `decoder_type` existed: sigmoid (cx, cy, w, h), corners clamped to [0, 1].

    Kept so that such folders load with their outputs unchanged. The clamp zeroes the gradient of a coordinate that
    overshoots a border; new models use `mlp` instead.
    """

    needs_image = needs_masks = reads_llm_image_states = False

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int, vision_hidden_size: int, grid_size: int):
        super().__init__()
        self.mlp = mlp(text_hidden_size, config.hidden_size, 4, config.num_layers, dtype=FP32)
        self.mlp[-1].zero_init = True  # read by PerceptionGPTPreTrainedModel._init_weights

    def forward(
        self, hidden, image_features=None, has_image=None, mask_logits=None, vision_patches=None
    ) -> BoxPrediction:
        boxes_cxcywh = self.mlp(hidden).float().sigmoid()  # (N, D) -> (N, 4)
        return BoxPrediction(box_cxcywh_to_xyxy(boxes_cxcywh).clamp(0.0, 1.0))


class MlpBoxDecoder(LegacyBoxDecoder):
    """The paper's regression MLP on the `<vis>` state, in the ordered parametrization (zero init = centred box)."""

    def forward(
        self, hidden, image_features=None, has_image=None, mask_logits=None, vision_patches=None
    ) -> BoxPrediction:
        logits = self.mlp(hidden).float() + hidden.new_tensor(_CENTRED_OFFSETS, dtype=torch.float32)  # (N, 4)
        return BoxPrediction(ordered_box_xyxy(logits.sigmoid()))


class BinBoxDecoder(nn.Module):
    """Per ordered coordinate, logits over `num_bins` values in [0, 1] read from the `<vis>` state; the box is the
    expectation (trained with L1/GIoU), the logits get GFL's distribution focal loss (`box_dfl_loss_sum`)."""

    needs_image = needs_masks = reads_llm_image_states = False

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int, vision_hidden_size: int, grid_size: int):
        super().__init__()
        self.num_bins = config.num_bins
        self.mlp = mlp(text_hidden_size, config.hidden_size, 4 * config.num_bins, config.num_layers, dtype=FP32)
        self.mlp[-1].zero_init = True  # uniform bins at the start

    def forward(
        self, hidden, image_features=None, has_image=None, mask_logits=None, vision_patches=None
    ) -> BoxPrediction:
        logits = self.mlp(hidden).float().unflatten(-1, (4, self.num_bins))  # (N, 4, n)
        values = torch.linspace(0, 1, self.num_bins, device=logits.device)  # (n,)
        unit = (logits.softmax(-1) * values).sum(-1)  # (N, 4)
        return BoxPrediction(ordered_box_xyxy(unit), bin_logits=logits)


def soft_capped_spread(half: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Distances (N, 4) >= 0 from `centre` (N, 2) to the left, top, right and bottom sides -> the fractions (N, 4) of
    the room to each border they cover, for `box_around_centre_xyxy`: r / (1 + r^4)^(1/4) with r = half / room, which
    is r itself (the distance unchanged) up to about half the room and stays below 1 (the border) without a clamp."""
    room = torch.cat([centre, 1 - centre], dim=-1).clamp(min=1e-6)  # (N, 4): left, top, right, bottom
    ratio = half / room
    return ratio * (1 + ratio**4) ** -0.25


class QueryBoxDecoder(nn.Module):
    """The `<vis>` state queries the image's patches: the box contains the attention-weighted patch centre and its
    extent is read from the query, what it attended and (`query_extent="half_size"`) where the centre lies. The LLM
    says WHAT; the patches say WHERE. The patches are the fused ViT features (`query_source="vision"`) or the LLM's
    final states at the image tokens (`"llm"`). Rows without an image attend nothing: their centre is the image
    centre."""

    needs_image, needs_masks = True, False

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int, vision_hidden_size: int, grid_size: int):
        super().__init__()
        d = config.hidden_size
        self.grid_size = grid_size
        self.reads_llm_image_states = config.query_source == "llm"
        patch_width = text_hidden_size if self.reads_llm_image_states else vision_hidden_size
        self.query = nn.Linear(text_hidden_size, d, dtype=FP32)
        self.key = nn.Linear(patch_width, d, dtype=FP32)
        self.value = nn.Linear(patch_width, d, dtype=FP32)
        self.centre_offset = config.query_centre_offset
        self.half_size = config.query_extent == "half_size"
        # the extent on each side (with "half_size" also read from the centre), and with `query_centre_offset` the
        # centre's (x, y) offset
        inputs = 2 * d + (2 if self.half_size else 0)
        self.extent = mlp(inputs, d, 6 if self.centre_offset else 4, max(config.num_layers - 1, 1), dtype=FP32)
        self.extent[-1].zero_init = True  # a quarter of the image (or half of the room) on each side, no offset
        # constants of every decoded `<vis>`, built once (non-persistent: `_init_weights` fills them again after
        # from_pretrained materializes them uninitialized)
        centres, points, corners = self.constants(grid_size, config.query_refine_layout)
        self.register_buffer("patch_centres", centres, persistent=False)
        self.register_buffer("refine_points", points, persistent=False)
        self.register_buffer("corners", corners, persistent=False)
        # the second stage (`query_refine_layout` L > 0): the fused ViT patches under the first box (grown by a
        # quarter of its size on each side) move its centre and extent, in their logit space (zero init: unchanged)
        self.refine_layout = config.query_refine_layout
        if self.refine_layout:
            self.refine_norm = nn.LayerNorm(vision_hidden_size, dtype=FP32)
            refine_inputs = d + self.refine_layout**2 * vision_hidden_size
            self.refine = mlp(refine_inputs, d, 6, max(config.num_layers - 1, 1), dtype=FP32)
            self.refine[-1].zero_init = True

    @staticmethod
    def constants(grid_size: int, refine_layout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffers' values: the (P, 2) patch centres, the (4, L*L*2) `layout_points` where the second stage reads
        the first box (grown by `REFINE_GROWTH`), and the image's (4,) corners for `box_around_centre_xyxy`."""
        corners = torch.tensor(IMAGE_CORNERS_XYXY)
        return patch_centres(grid_size), layout_points(refine_layout, grow=REFINE_GROWTH), corners

    def project_patches(self, patches):
        """(N, P, C) patches -> their (keys, values), each (N, P, d), the keys scaled by 1/sqrt(d) for the dot-product
        attention: generate() projects each sample's once and passes the pair as `image_features`, instead of
        projecting them again for every decoded `<vis>`."""
        patches = patches.to(self.key.weight.dtype)
        return self.key(patches) / math.sqrt(self.key.out_features), self.value(patches)

    def forward(
        self, hidden, image_features=None, has_image=None, mask_logits=None, vision_patches=None
    ) -> BoxPrediction:
        """image_features: (N, P, C) patches, or their `project_patches` pair; vision_patches (N, P, C_vit): the fused
        ViT patches the refinement reads; any value on rows without an image."""
        query = self.query(hidden.to(self.query.weight.dtype))  # (N, d)
        no_image = None if has_image is None else ~has_image[:, None]  # (N, 1)
        if image_features is None or has_image is None:
            centre = hidden.new_full((len(hidden), 2), 0.5, dtype=torch.float32)  # (N, 2)
            attended = torch.zeros_like(query)  # (N, d)
            patch_logits = hidden.new_zeros(len(hidden), self.grid_size**2, dtype=torch.float32)  # (N, P)
        else:
            # every row attends and rows without an image are masked out after: no boolean indexing, no host sync
            # (this runs at every decoded `<vis>` of generate())
            keys, values = (
                image_features if isinstance(image_features, tuple) else self.project_patches(image_features)
            )
            # in place where a tensor is new and its producer's backward does not read it (fewer copies per step)
            scores = torch.bmm(keys.to(query.dtype), query[:, :, None])[..., 0].float()  # (N, P)
            attention = scores.softmax(-1)  # (N, P)
            patch_logits = scores.masked_fill_(no_image, 0.0)
            centre = torch.mm(attention, self.patch_centres).masked_fill_(no_image, 0.5)  # (N, 2); else the image's
            attended = torch.bmm(attention[:, None].to(values.dtype), values.to(query.dtype))[:, 0]  # (N, d)
            attended = attended.masked_fill_(no_image, 0.0)
        features = [query, attended, centre] if self.half_size else [query, attended]
        out = self.extent(torch.cat(features, dim=-1)).float()  # (N, 4) or (N, 6)
        if self.centre_offset and has_image is not None:  # up to one patch; rows without an image keep the centre
            moved = (centre + out[:, 4:].tanh() / self.grid_size).clamp(0.0, 1.0)
            centre = torch.where(has_image[:, None], moved, centre)
        spread_logits = out[:, :4]  # (N, 4)
        if self.refine_layout and vision_patches is not None and has_image is not None:
            first = box_around_centre_xyxy(centre, self._spread(spread_logits, centre), self.corners).detach()
            samples = sample_box_layout(vision_patches.to(query.dtype), first, self.refine_layout, self.refine_points)
            features = torch.cat([query, self.refine_norm(samples).flatten(1)], dim=-1)  # (N, d + L*L*C)
            delta = self.refine(features).float().masked_fill_(no_image, 0.0)  # (N, 6): none without an image
            # logit moves of the centre (x, y) and of the 4 extents; a row without an image has the centre 0.5, whose
            # logit is 0: it keeps its first box exactly
            centre = (centre.logit(eps=1e-6) + delta[:, :2]).sigmoid()  # (N, 2); inside (0, 1) but for an offset
            spread_logits = spread_logits + delta[:, 2:]
        boxes = box_around_centre_xyxy(centre, self._spread(spread_logits, centre), self.corners)  # (N, 4)
        return BoxPrediction(boxes, patch_logits=patch_logits)

    def _spread(self, logits, centre):
        """(N, 4) extent logits -> the fractions of the room to each border (`box_around_centre_xyxy`)."""
        if self.half_size:  # up to half the image on each side, the same at every position away from the borders
            return soft_capped_spread(logits.sigmoid() / 2, centre)
        return logits.sigmoid()


class MaskBoxDecoder(nn.Module):
    """The box of the decoded mask: its probability mass gives the centre, and sqrt(3) standard deviations (the
    half side of a uniform box) give the extent, squashed smoothly into the room on each side. No parameters."""

    needs_image = needs_masks = True
    reads_llm_image_states = False

    def __init__(self, config: BoxHeadConfig, text_hidden_size: int, vision_hidden_size: int, grid_size: int):
        super().__init__()

    def forward(
        self, hidden, image_features=None, has_image=None, mask_logits=None, vision_patches=None
    ) -> BoxPrediction:
        centre = hidden.new_full((len(hidden), 2), 0.5, dtype=torch.float32)  # (N, 2)
        half = hidden.new_full((len(hidden), 2), 0.25, dtype=torch.float32)  # (N, 2)
        if mask_logits is not None and has_image is not None and has_image.any():
            probs = mask_logits.float().sigmoid()  # (N_img, S, S)
            side = probs.shape[-1]
            coords = (torch.arange(side, dtype=torch.float32, device=probs.device) + 0.5) / side  # (S,)
            marginals = torch.stack([probs.sum(-2), probs.sum(-1)], dim=1)  # (N_img, 2, S): over x, over y
            weights = marginals / (marginals.sum(-1, keepdim=True) + 1e-6)  # (N_img, 2, S)
            mean = (weights * coords).sum(-1)  # (N_img, 2)
            std = ((weights * (coords - mean[..., None]) ** 2).sum(-1) + 1e-8).sqrt()  # (N_img, 2)
            rows = has_image.nonzero(as_tuple=True)[0]
            centre, half = centre.index_put((rows,), mean), half.index_put((rows,), math.sqrt(3) * std)
        room = torch.cat([centre, 1 - centre], dim=-1).clamp(min=1e-6)  # (N, 4): left, top, right, bottom
        spread = torch.tanh(half.repeat(1, 2) / room)  # (N, 4) in [0, 1): smooth, never clamped
        return BoxPrediction(box_around_centre_xyxy(centre, spread))


BOX_DECODERS = {
    "mlp": MlpBoxDecoder,
    "bins": BinBoxDecoder,
    "query": QueryBoxDecoder,
    "mask": MaskBoxDecoder,
    "legacy_cxcywh": LegacyBoxDecoder,
}


def build_box_decoder(config: BoxHeadConfig, text_hidden_size: int, vision_hidden_size: int, grid_size: int):
    return BOX_DECODERS[config.decoder_type](config, text_hidden_size, vision_hidden_size, grid_size)


__all__ = [
    "BOX_DECODERS",
    "BinBoxDecoder",
    "BoxPrediction",
    "LegacyBoxDecoder",
    "MaskBoxDecoder",
    "MlpBoxDecoder",
    "QueryBoxDecoder",
    "box_around_centre_xyxy",
    "build_box_decoder",
    "layout_points",
    "layout_steps",
    "ordered_box_xyxy",
    "ordered_params_from_box_xyxy",
    "patch_centres",
    "sample_box_layout",
    "soft_capped_spread",
]

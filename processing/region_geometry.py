"""Pixel <-> normalized region maths: the only place the two coordinate frames meet (DESIGN.md, "Coordinates").

Frames:
- original: absolute pixels of the user's image, x in [0, W], y in [0, H]; a pixel (i, j) covers [j, j+1] x [i, i+1].
- vision frame: the image the vision tower saw after the image processor's pad-to-square, resize and center crop,
  `frame_width` x `frame_height` pixels. The model's normalized xyxy is vision-frame pixels / frame size, in [0, 1].

Every step of that chain is an axis-aligned affine map, so one `ImageGeometry` (scale + offset per axis) describes it
exactly. Sizes are computed with the same transformers helpers the image processors call, so they match to the pixel.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import ChannelDimension, SizeDict, get_image_size_for_max_height_width
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


@dataclass(frozen=True)
class ImageGeometry:
    """frame_x = original_x * scale_x + offset_x (likewise y), in pixels; the frame is frame_width x frame_height."""

    original_height: int
    original_width: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    frame_height: int
    frame_width: int


def _resized_size(height: int, width: int, size) -> tuple[int, int]:
    # Mirrors PilBackend.resize / TorchvisionBackend.resize (transformers 5.x) branch by branch.
    if size.shortest_edge and size.longest_edge:
        return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        shape_only = np.broadcast_to(np.uint8(0), (1, height, width))  # the helper reads only the shape
        return get_resize_output_image_size(
            shape_only, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    if size.max_height and size.max_width:
        return get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(f"`size` must define shortest_edge, max_height/max_width or height/width, got {size}.")


def _center_crop_offset(length: int, crop: int, backend: str) -> int:
    # Top/left pixel of the crop in the input; negative when the crop pads. The two backends round padding
    # differently (numpy center_crop pads ceil((crop - length) / 2) before, torchvision floor).
    if crop > length and backend == "torchvision":
        return -((crop - length) // 2)
    return (length - crop) // 2


def compute_image_geometry(
    original_size: tuple[int, int],
    *,
    pad_to_square: bool = False,
    resize_size=None,
    crop_size=None,
    backend: str = "pil",
) -> ImageGeometry:
    """Geometry of pad-to-square (centered, LLaVA-1.5) -> resize -> center crop, each step optional.

    Args:
        original_size: (H, W) of the original image.
        resize_size, crop_size: `transformers.image_utils.SizeDict`, as stored on an image processor, or None to skip.
        backend: the image processor backend, "pil" or "torchvision" (they round center-crop padding differently).
    """
    height, width = int(original_size[0]), int(original_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"`original_size` must be a positive (H, W), got {tuple(original_size)}.")
    scale_x = scale_y = 1.0
    offset_x = offset_y = 0.0
    if pad_to_square and height != width:
        side = max(height, width)
        offset_x, offset_y = float((side - width) // 2), float((side - height) // 2)
        height = width = side
    if resize_size is not None:
        new_height, new_width = _resized_size(height, width, resize_size)
        factor_x, factor_y = new_width / width, new_height / height
        scale_x, offset_x = scale_x * factor_x, offset_x * factor_x
        scale_y, offset_y = scale_y * factor_y, offset_y * factor_y
        height, width = new_height, new_width
    if crop_size is not None:
        offset_y -= _center_crop_offset(height, crop_size.height, backend)
        offset_x -= _center_crop_offset(width, crop_size.width, backend)
        height, width = crop_size.height, crop_size.width
    return ImageGeometry(
        int(original_size[0]), int(original_size[1]), scale_x, scale_y, offset_x, offset_y, height, width
    )


def geometry_from_image_processor(image_processor, original_size: tuple[int, int]) -> ImageGeometry:
    """Read the geometry an image processor applies to an image of `original_size` (H, W) from its own settings."""
    if hasattr(image_processor, "merge_size") and hasattr(image_processor, "temporal_patch_size"):
        return _dynamic_resize_geometry(image_processor, original_size)
    if hasattr(image_processor, "max_image_size") and hasattr(image_processor, "do_image_splitting"):
        # Idefics3 / SmolVLM: the frame is the global image, the whole image squashed to a square (the tiles and
        # the batch padding only add images, never pixels to it)
        side = image_processor.max_image_size["longest_edge"]
        return compute_image_geometry(original_size, resize_size=SizeDict(height=side, width=side))
    do_pad = bool(getattr(image_processor, "do_pad", False))
    pad_to_square = do_pad and hasattr(image_processor, "pad_to_square")
    if do_pad and not pad_to_square:
        # Generic `do_pad` pads bottom-right to the largest image of the batch: the frame would depend on the batch.
        raise ValueError(
            f"`image_processor.do_pad` must be False unless the processor pads to a square (e.g. LlavaImageProcessor), "
            f"got do_pad=True on {type(image_processor).__name__}."
        )
    return compute_image_geometry(
        original_size,
        pad_to_square=pad_to_square,
        resize_size=image_processor.size if image_processor.do_resize else None,
        crop_size=image_processor.crop_size if image_processor.do_center_crop else None,
        backend=getattr(image_processor, "backend", "pil"),
    )


def _dynamic_resize_geometry(image_processor, original_size: tuple[int, int]) -> ImageGeometry:
    """Qwen2-VL / Qwen2.5-VL: each image is resized to its own multiple of patch x merge pixels with about the same
    aspect ratio and a bounded pixel count (`smart_resize`); that resized image is the frame."""
    height, width = int(original_size[0]), int(original_size[1])
    if not image_processor.do_resize:
        return compute_image_geometry((height, width))
    size = image_processor.size
    new_height, new_width = smart_resize(
        height,
        width,
        factor=image_processor.patch_size * image_processor.merge_size,
        min_pixels=size.shortest_edge,
        max_pixels=size.longest_edge,
    )
    return compute_image_geometry((height, width), resize_size=SizeDict(height=new_height, width=new_width))


def _affine_params(geometry: ImageGeometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.tensor([geometry.scale_x, geometry.scale_y] * 2, dtype=torch.float64)
    offset = torch.tensor([geometry.offset_x, geometry.offset_y] * 2, dtype=torch.float64)
    frame = torch.tensor([geometry.frame_width, geometry.frame_height] * 2, dtype=torch.float64)
    return scale, offset, frame


def boxes_xyxy_pixel_to_normalized(boxes_xyxy_pixel: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    """(n, 4) absolute xyxy on the original image -> (n, 4) normalized xyxy of the vision frame, NOT clipped.

    Values outside [0, 1] mean the box extends past what the vision tower saw (e.g. cut by a center crop).
    """
    scale, offset, frame = _affine_params(geometry)
    boxes = boxes_xyxy_pixel.to(torch.float64)
    return ((boxes * scale + offset) / frame).to(boxes_xyxy_pixel.dtype)


def boxes_xyxy_normalized_to_pixel(
    boxes_xyxy_normalized: torch.Tensor, geometry: ImageGeometry, clip: bool = True
) -> torch.Tensor:
    """(n, 4) normalized xyxy of the vision frame -> (n, 4) absolute xyxy on the original image, clipped to it unless
    `clip=False` (the strict REC protocol scores boxes as predicted, padding included)."""
    scale, offset, frame = _affine_params(geometry)
    boxes = (boxes_xyxy_normalized.to(torch.float64) * frame - offset) / scale
    if not clip:
        return boxes.to(boxes_xyxy_normalized.dtype)
    limits = torch.tensor([geometry.original_width, geometry.original_height] * 2, dtype=torch.float64)
    return torch.minimum(boxes.clamp(min=0), limits).to(boxes_xyxy_normalized.dtype)


def boxes_xyxy_from_masks(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) bool -> (n, 4) tight absolute xyxy (x2, y2 exclusive edges); NaN rows for empty masks."""
    boxes = np.full((len(masks), 4), np.nan, dtype=np.float64)
    for index, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[index] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def mask_pixel_to_frame(mask: np.ndarray, geometry: ImageGeometry, mask_size: int) -> np.ndarray:
    """(H, W) bool on the original image -> (mask_size, mask_size) bool over the vision frame.

    A frame cell is on when at least half of its area is on (area resampling), so large downscales don't alias.
    """
    height, width = mask.shape
    # The vision frame expressed in original pixels; may reach past the image (padding) or inside it (crop).
    left, right = -geometry.offset_x / geometry.scale_x, (geometry.frame_width - geometry.offset_x) / geometry.scale_x
    top, bottom = -geometry.offset_y / geometry.scale_y, (geometry.frame_height - geometry.offset_y) / geometry.scale_y
    pad_left, pad_top = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_right, pad_bottom = max(0, math.ceil(right - width)), max(0, math.ceil(bottom - height))
    padded = np.pad(mask.astype(np.float32), ((pad_top, pad_bottom), (pad_left, pad_right)))
    box = (left + pad_left, top + pad_top, right + pad_left, bottom + pad_top)
    resized = Image.fromarray(padded, mode="F").resize((mask_size, mask_size), Image.Resampling.BOX, box=box)
    return np.asarray(resized) >= 0.5


def _linear_weights(source_positions: torch.Tensor, source_length: int) -> torch.Tensor:
    # (N, source_length) 1-D linear interpolation weights at continuous positions (pixel centers at i + 0.5),
    # border-clamped: the separable factor of bilinear resampling with align_corners=False.
    index = (source_positions - 0.5).clamp(0, source_length - 1)
    low = index.floor().long()
    high = (low + 1).clamp(max=source_length - 1)
    fraction = index - low
    weights = torch.zeros(len(source_positions), source_length, dtype=torch.float32)
    weights.scatter_add_(1, low[:, None], (1 - fraction)[:, None].float())
    weights.scatter_add_(1, high[:, None], fraction[:, None].float())
    return weights


def mask_logits_frame_to_pixel(
    mask_logits: torch.Tensor, geometry: ImageGeometry, threshold: float = 0.0
) -> torch.Tensor:
    """(n, h, w) logits over the vision frame -> (n, H, W) bool on the original image (logit > threshold).

    Logits are resampled bilinearly before thresholding; pixels the vision tower never saw (cropped away) are False.
    """
    n, mask_height, mask_width = mask_logits.shape
    height, width = geometry.original_height, geometry.original_width
    centers_x = torch.arange(width, dtype=torch.float64) + 0.5
    centers_y = torch.arange(height, dtype=torch.float64) + 0.5
    frame_x = (centers_x * geometry.scale_x + geometry.offset_x) / geometry.frame_width  # (W,) normalized
    frame_y = (centers_y * geometry.scale_y + geometry.offset_y) / geometry.frame_height  # (H,) normalized
    weights_x = _linear_weights(frame_x * mask_width, mask_width)  # (W, w)
    weights_y = _linear_weights(frame_y * mask_height, mask_height)  # (H, h)
    logits = torch.einsum("yh,nhw,xw->nyx", weights_y, mask_logits.detach().float().cpu(), weights_x)  # (n, H, W)
    visible_x = (frame_x >= 0) & (frame_x <= 1)
    visible_y = (frame_y >= 0) & (frame_y <= 1)
    return (logits > threshold) & visible_y[None, :, None] & visible_x[None, None, :]


__all__ = [
    "ImageGeometry",
    "compute_image_geometry",
    "geometry_from_image_processor",
    "boxes_xyxy_pixel_to_normalized",
    "boxes_xyxy_normalized_to_pixel",
    "boxes_xyxy_from_masks",
    "mask_pixel_to_frame",
    "mask_logits_frame_to_pixel",
]

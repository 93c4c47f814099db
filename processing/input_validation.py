"""Validation of the processor's user inputs: images of any common type and mode, per-sample lists, pixel regions.

Each error names the argument (with its sample and slot index), the expected and the actual value.
"""

import warnings

import numpy as np
import torch
from PIL import Image


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb_image(image, name: str) -> Image.Image:
    """PIL, (H, W[, C]) numpy or (C, H, W) torch image of any common mode -> RGB PIL; 16-bit is scaled, not clipped."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        image = np.moveaxis(image, 0, -1) if image.ndim == 3 else image  # torch images are channel-first
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"`{name}` must be an (H, W) or (H, W, C) array with C in 1, 3, 4, got {image.shape}.")
        if image.dtype == np.uint16:
            image = (image.astype(np.float64) / 257).round().astype(np.uint8)
        elif image.dtype == bool:
            image = image.astype(np.uint8) * 255
        elif np.issubdtype(image.dtype, np.floating):
            image = (np.clip(np.nan_to_num(image), 0, 1) * 255).round().astype(np.uint8)
        elif image.dtype != np.uint8:
            raise TypeError(f"`{name}` must be uint8, uint16, bool or float in [0, 1], got dtype {image.dtype}.")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"`{name}` must have a positive size, got {image.width}x{image.height}.")
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(values, 0, 65535) / 257).round().astype(np.uint8))
    elif image.mode == "F":
        raise ValueError(f"`{name}` has PIL mode 'F' (float), which has no defined color range; convert it first.")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
    return [images]


def per_sample(values, batch_size: int, name: str) -> list:
    if values is None:
        return [None] * batch_size
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"`{name}` must be a list with one entry per text, got {type(values).__name__}.")
    if len(values) != batch_size:
        raise ValueError(f"`{name}` must be a list with one entry per text ({batch_size}), got {len(values)}.")
    return list(values)


def slot_list(values, n_vis: int, name: str) -> list:
    if values is None:
        return [None] * n_vis
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = list(values)  # an (n, 4) box array or an (n, H, W) mask array: one slot per row
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"`{name}` must be a list with one entry per `<vis>`, got {type(values).__name__}.")
    if len(values) != n_vis:
        raise ValueError(f"`{name}` has {len(values)} entries but its text has {n_vis} `<vis>` tokens.")
    return list(values)


def validated_mask(mask, image_size: tuple[int, int], name: str) -> np.ndarray:
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`{name}` must be an (H, W) bool array or None, got {type(mask).__name__}.")
    if mask.shape != tuple(image_size):
        raise ValueError(f"`{name}` must have the image's size (H, W) = {tuple(image_size)}, got shape {mask.shape}.")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"`{name}` must be boolean (or 0/1), got values outside {{0, 1}} of dtype {mask.dtype}.")
    return mask.astype(bool)


def is_no_region(box) -> bool:
    """True for None and for the all-NaN box, the explicit "this `<vis>` has no region"."""
    if box is None:
        return True
    try:
        values = np.asarray(box.cpu() if isinstance(box, torch.Tensor) else box, dtype=np.float64)
    except (TypeError, ValueError):
        return False  # not numbers: `validated_box` names the problem
    return values.shape == (4,) and bool(np.isnan(values).all())


def validated_box(box, image_size: tuple[int, int], name: str) -> np.ndarray:
    try:
        box = np.asarray(box.cpu() if isinstance(box, torch.Tensor) else box, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be 4 numbers [x1, y1, x2, y2], got {box!r}.") from error
    if box.shape != (4,):
        raise ValueError(f"`{name}` must be 4 numbers [x1, y1, x2, y2], got shape {box.shape}.")
    if not np.isfinite(box).all():
        raise ValueError(f"`{name}` must be finite, got {box.tolist()}.")
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"`{name}` must have x2 > x1 and y2 > y1 (pixel xyxy), got {box.tolist()}.")
    height, width = image_size
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ValueError(f"`{name}` lies entirely outside the {width}x{height} (WxH) image, got {box.tolist()}.")
    clipped = np.clip(box, 0, [width, height, width, height])
    if not np.array_equal(clipped, box):
        warnings.warn(f"`{name}` = {box.tolist()} extends past the {width}x{height} image; clipped to it.")
    return clipped

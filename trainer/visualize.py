"""Drawing predictions on images (PIL only): boxes, translucent masks and labels."""

import textwrap

import numpy as np
from PIL import Image, ImageDraw


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_grounding(image, boxes_xyxy=(), masks=None, labels=None, scale: int = 1, colors=PALETTE) -> Image.Image:
    """Returns an RGB copy of `image` (optionally upscaled by `scale`) with pixel xyxy boxes, (H, W) bool masks
    and labels drawn in one colour per object."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for index, mask in enumerate(masks if masks is not None else []):
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        canvas[mask] = 0.55 * canvas[mask] + 0.45 * np.array(colors[index % len(colors)], dtype=np.float32)
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if scale != 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for index, box in enumerate(boxes_xyxy):
        color = colors[index % len(colors)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=color, width=max(1, scale // 2))
        if labels is not None and index < len(labels):
            draw.text((x1 + 2, y1 + 1), str(labels[index]), fill=color)
    return out


def captioned(image, text: str, width_chars: int | None = None, lines: int = 3) -> Image.Image:
    """`image` with `text` wrapped in a white band of `lines` lines under it (PIL's default font)."""
    width_chars = width_chars or max(image.width // 6, 8)
    wrapped = textwrap.wrap(text, width_chars)[:lines]
    band = 12 * lines + 4
    out = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for index, line in enumerate(wrapped):
        draw.text((2, image.height + 2 + 12 * index), line, fill=(0, 0, 0))
    return out


def tile_images(images, columns: int = 4, background=(255, 255, 255)) -> Image.Image:
    """Puts equally sized images on a grid."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, rows * height), background)
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


__all__ = ["draw_grounding", "tile_images"]

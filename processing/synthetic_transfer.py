"""A second synthetic domain for the transfer check: other objects, textures, words and renderer than `synthetic.py`.

Rings, bars, frames and plus signs drawn with PIL's ImageDraw (anti-aliasing off, outlines, not filled shapes) on
checkerboard, dotted or wooden textures; colours and sizes named with words the demo never saw ("the tiny cyan
ring"). Rows are REC in DESIGN.md's schema (one `<vis>` per answer, pixel boxes, RLE masks), so the demo model can be
fine-tuned on them through the public API and measured by generation.
"""

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import GROUNDING_FEATURES, SPLITS, _mask_box_xyxy, _mask_rle
from .templates import build_task_messages


TRANSFER_OBJECTS = ("ring", "bar", "frame", "plus")
TRANSFER_COLOURS = {
    "purple": (150, 60, 200),
    "orange": (250, 150, 30),
    "cyan": (40, 220, 230),
    "pink": (250, 120, 190),
}
TRANSFER_SIZES = (("tiny", 0.09, 0.11), ("big", 0.17, 0.21))
TEXTURES = ("checker", "dots", "wood")
_MAX_TRIES = 50


def _texture(kind, size, rng):
    base = rng.uniform(60, 170, 3)
    other = base + rng.uniform(-35, 35, 3)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(image)
    step = int(rng.integers(4, 9))
    if kind == "checker":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=tuple(int(v) for v in other))
    elif kind == "dots":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=tuple(int(v) for v in other))
    else:  # wood: wavy horizontal grain
        for y in range(0, size, 2):
            shade = other + 12 * np.sin(y / step)
            draw.line([0, y, size, y + int(3 * np.sin(y))], fill=tuple(int(v) for v in shade))
    return image


def _draw_object(kind, cx, cy, radius, size):
    """The object's (S, S) bool mask, drawn with ImageDraw on its own layer."""
    layer = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    r, width = radius, max(2, int(radius * 0.35))
    if kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, width=width)
    elif kind == "frame":
        draw.rectangle([cx - r, cy - 0.75 * r, cx + r, cy + 0.75 * r], outline=1, width=width)
    elif kind == "bar":
        draw.rectangle([cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r], fill=1)
    else:  # plus
        draw.rectangle([cx - r, cy - width / 2, cx + r, cy + width / 2], fill=1)
        draw.rectangle([cx - width / 2, cy - r, cx + width / 2, cy + r], fill=1)
    return np.asarray(layer, dtype=bool)


def _scene(size, rng):
    image = _texture(TEXTURES[rng.integers(len(TEXTURES))], size, rng)
    canvas = np.asarray(image, dtype=np.float32).copy()
    owner = np.full((size, size), -1, dtype=np.int16)
    objects = []
    for _ in range(int(rng.integers(3, 6))):
        kind = TRANSFER_OBJECTS[rng.integers(len(TRANSFER_OBJECTS))]
        colour = list(TRANSFER_COLOURS)[rng.integers(len(TRANSFER_COLOURS))]
        size_name, low, high = TRANSFER_SIZES[rng.integers(len(TRANSFER_SIZES))]
        radius = rng.uniform(low, high) * size
        for _ in range(_MAX_TRIES):
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            mask = _draw_object(kind, cx, cy, radius, size)
            if not (owner[mask] >= 0).any():  # no overlaps: every object whole
                owner[mask] = len(objects)
                canvas[mask] = TRANSFER_COLOURS[colour]
                objects.append({"kind": kind, "colour": colour, "size": size_name})
                break
    return np.clip(canvas, 0, 255).astype(np.uint8), owner, objects


def generate_transfer_samples(split="train", num_samples=1000, seed=0, image_size=64):
    """Yields REC rows whose expression ("the big orange frame", or shorter when that is already unique) names
    exactly one object of the scene; row i depends only on (split, seed, i)."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    for index in range(num_samples):
        rng = np.random.default_rng([seed, 7 + SPLITS.index(split), index])
        while True:
            image, owner, objects = _scene(image_size, rng)
            if len(objects) < 2:
                continue
            target = int(rng.integers(len(objects)))
            attrs = objects[target]
            for keys in (("colour", "kind"), ("size", "kind"), ("size", "colour", "kind")):
                same = [o for o in objects if all(o[k] == attrs[k] for k in keys)]
                if len(same) == 1:
                    break
            else:
                continue
            expression = "the " + " ".join(attrs[k] for k in keys)
            mask = owner == target
            yield {
                "image": Image.fromarray(image),
                "task": "rec",
                "messages": build_task_messages("rec", expression, seed=int(rng.integers(2**31))),
                "boxes": [list(_mask_box_xyxy(mask))],
                "masks": [_mask_rle(mask)],
            }
            break


def build_transfer_dataset(split="train", num_samples=1000, seed=0, image_size=64):
    """`datasets.Dataset` of transfer rows with features `GROUNDING_FEATURES`."""
    import datasets

    rows = list(generate_transfer_samples(split, num_samples, seed, image_size))
    return datasets.Dataset.from_list(rows, features=GROUNDING_FEATURES, split=datasets.NamedSplit(split))


__all__ = ["TRANSFER_COLOURS", "TRANSFER_OBJECTS", "build_transfer_dataset", "generate_transfer_samples"]

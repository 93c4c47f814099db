"""Embedded synthetic referring dataset: procedural shape scenes with guaranteed-unique referring expressions.

A scene is 2-6 coloured shapes painted in order on a noise, gradient or stripes background; later shapes occlude
earlier ones. Every object's mask is its VISIBLE part and its box the exact pixel xyxy box of that mask (a pixel
(i, j) covers [j, j + 1] x [i, i + 1]), so boxes and masks always agree. Positions (`cx`, `cy`) are visible-box centres.

Referring expressions (attribute, position, relation and ordinal levels, never ambiguous) come from
`synthetic_expressions`.

Rows follow DESIGN.md ("Data"): rec/res/reg get one `<vis>`, multi one per matching object in reading order
(box x1, then y1), caption one per object. Masks (RLE) are given for res only; rec, reg and multi supervise
boxes, so their masks are null. Every sample draws from its own generator seeded by (seed, split, index).
"""

import functools
import math
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .synthetic_expressions import (
    ATTRIBUTE_KINDS,
    MAX_QUERIES,
    ORDINALS,
    find_expression,
    matching,
    noun_phrase,
    random_attrs,
)
from .templates import build_task_messages


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
BACKGROUNDS = ("noise", "gradient", "stripes")
LEVELS = ("attribute", "position", "relation", "ordinal")
TASKS = ("rec", "res", "reg", "multi", "caption")
SPLITS = ("train", "validation", "test")

GROUNDING_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "task": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),  # pixel xyxy per <vis>
        "masks": datasets.List({"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")}),
    }
)
# synthetic rows also carry, for REG, the regions of the scene's other objects (the region-blind control's swaps)
SYNTHETIC_FEATURES = datasets.Features(
    {
        **GROUNDING_FEATURES,
        "other_regions": datasets.List(
            {
                "box": datasets.List(datasets.Value("float64"), length=4),
                "mask": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
            }
        ),
    }
)

_NOISE_AMPLITUDE = 6  # per-pixel noise on the whole image, far below the gap between palette colours
_MAX_PLACEMENTS = 20  # tries to place one object before dropping it
_MAX_SCENES = 50  # fresh scenes per sample before the config is declared infeasible


@dataclass(frozen=True)
class SyntheticConfig:
    """The difficulty knob. Sizes are (name, min radius, max radius) as fractions of `image_size`."""

    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 6
    shapes: tuple = SHAPES
    colours: tuple = tuple(COLOURS)
    sizes: tuple = (("small", 0.06, 0.08), ("medium", 0.105, 0.125), ("large", 0.16, 0.2))
    backgrounds: tuple = BACKGROUNDS
    levels: tuple = LEVELS
    tasks: tuple = ("rec", "res", "reg", "multi")
    min_visible: float = 0.5  # every object keeps at least this fraction of its own area visible
    position_margin: float = 0.08  # image fraction separating ranks, relations and extremes
    size_margin: float = 1.3  # radius ratio separating "biggest" / "smallest"
    colour_jitter: int = 15  # per-object colour offset, below the gap between palette colours
    vary_answer: bool = False  # paraphrase answers too (see templates.build_task_messages)
    rec_masks: bool = False  # give REC rows their target's mask too: dense supervision for the same `<vis>`
    reg_mask_fraction: float = 0.5  # REG rows whose prompt region is the target's mask (the others: its box)

    def __post_init__(self):
        for name, allowed in (
            ("shapes", SHAPES),
            ("colours", tuple(COLOURS)),
            ("backgrounds", BACKGROUNDS),
            ("levels", LEVELS),
            ("tasks", TASKS),
        ):
            values = getattr(self, name)
            if not values or not set(values) <= set(allowed):
                raise ValueError(f"`{name}` must be a non-empty subset of {allowed}, got {values!r}")
        if self.image_size < 16:
            raise ValueError(f"`image_size` must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= len(ORDINALS):
            raise ValueError(
                f"`min_objects` and `max_objects` must satisfy 1 <= min <= max <= {len(ORDINALS)}, "
                f"got {self.min_objects} and {self.max_objects}"
            )
        if not self.sizes or any(not 0 < low <= high < 0.5 for _, low, high in self.sizes):
            raise ValueError(f"`sizes` must be (name, low, high) with 0 < low <= high < 0.5, got {self.sizes!r}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"`min_visible` must be in (0, 1], got {self.min_visible}")
        if not 0 <= self.reg_mask_fraction <= 1:
            raise ValueError(f"`reg_mask_fraction` must be in [0, 1], got {self.reg_mask_fraction}")

    def attribute_vocabulary(self) -> dict[str, tuple]:
        """Attribute kind -> its words: what a REG description is scored on."""
        return {"size": tuple(name for name, _, _ in self.sizes), "colour": self.colours, "shape": self.shapes}

    @classmethod
    def demo(cls):
        """The CPU demo: 64 px, 3-5 objects, attribute expressions only (colour, shape or size)."""
        return cls(
            image_size=64,
            min_objects=3,
            max_objects=5,
            shapes=("circle", "square", "triangle"),
            colours=("red", "green", "blue", "yellow"),
            sizes=(("small", 0.08, 0.1), ("large", 0.15, 0.19)),
            backgrounds=("noise", "gradient"),
            levels=("attribute",),
            min_visible=0.7,
        )

    @classmethod
    def hard(cls):
        """The benchmark: 224 px, 4-6 objects, every shape, colour, background and expression level."""
        return cls(image_size=224, min_objects=4, max_objects=6, min_visible=0.4, position_margin=0.06, tasks=TASKS)


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    size: str
    radius: float
    box_xyxy: tuple  # visible part, pixels
    index: int  # paint order, = the object's value in the owner map

    @property
    def centre(self):
        return (self.box_xyxy[0] + self.box_xyxy[2]) / 2, (self.box_xyxy[1] + self.box_xyxy[3]) / 2


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size):
    centres = np.arange(image_size, dtype=np.float32) + 0.5
    return centres[None, :], centres[:, None]  # (1, S), (S, 1)


def _shape_mask(shape, dx, dy, radius):
    """Bool (S, S) mask of a shape of `radius` centred at offsets dx (1, S), dy (S, 1); it stays inside radius."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (ax <= 0.8 * radius) & (ay <= 0.8 * radius)
    if shape == "diamond":
        return ax + ay <= radius
    if shape == "cross":
        arm = 0.35 * radius
        return ((ax <= arm) & (ay <= radius)) | ((ay <= arm) & (ax <= radius))
    up = (dy <= 0.5 * radius) & (math.sqrt(3) * ax <= dy + radius)
    if shape == "triangle":
        return up
    return up | ((dy >= -0.5 * radius) & (math.sqrt(3) * ax <= radius - dy))  # star: two triangles


def _background(kind, size, rng):
    """Float (S, S, 3) RGB background between two low-saturation colours, which never read as a palette colour."""
    low, high = (rng.uniform(70, 180) + rng.uniform(-20, 20, 3) for _ in range(2))
    xs, ys = _pixel_centres(size)
    if kind == "noise":
        coarse = rng.uniform(0, 255, (4, 4, 1)).astype(np.uint8)
        weight = np.asarray(Image.fromarray(coarse[..., 0]).resize((size, size), Image.BILINEAR))[..., None] / 255.0
    else:
        angle = rng.uniform(0, math.pi)
        along = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]  # (S, S, 1)
        if kind == "gradient":
            weight = (along - along.min()) / (along.max() - along.min())
        else:
            weight = (along // rng.integers(2, max(3, size // 12)) % 2).astype(np.float32)
    return low + (high - low) * weight


def _draw_scene(config, rng):
    """(uint8 image (S, S, 3), owner map (S, S) int16 with -1 for background, objects) or None if crowded."""
    size = config.image_size
    image = _background(config.backgrounds[rng.integers(len(config.backgrounds))], size, rng)
    owner = np.full((size, size), -1, dtype=np.int16)
    xs, ys = _pixel_centres(size)
    specs, full_areas = [], []
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
        shape = config.shapes[rng.integers(len(config.shapes))]
        colour = config.colours[rng.integers(len(config.colours))]
        size_name, low, high = config.sizes[rng.integers(len(config.sizes))]
        radius = rng.uniform(low, high) * size
        for _ in range(_MAX_PLACEMENTS):
            cx, cy = rng.uniform(radius, size - radius, 2)
            full = _shape_mask(shape, xs - cx, ys - cy, radius)
            trial = owner.copy()
            trial[full] = len(specs)
            visible = np.bincount(trial.ravel() + 1, minlength=len(specs) + 2)[1:]
            if all(visible[i] >= config.min_visible * area for i, area in enumerate(full_areas)):
                owner = trial
                full_areas.append(int(full.sum()))
                specs.append((shape, colour, size_name, radius, full))
                break
    if len(specs) < config.min_objects:
        return None
    objects = []
    for index, (shape, colour, size_name, radius, full) in enumerate(specs):
        image[full] = np.asarray(COLOURS[colour]) + rng.integers(-config.colour_jitter, config.colour_jitter + 1, 3)
        objects.append(_Object(shape, colour, size_name, radius, _mask_box_xyxy(owner == index), index))
    image += rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), owner, objects


def _mask_box_xyxy(mask):
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    x1, y1 = int(cols.argmax()), int(rows.argmax())
    return (float(x1), float(y1), float(len(cols) - cols[::-1].argmax()), float(len(rows) - rows[::-1].argmax()))


def _mask_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _reading_order(objects):
    return sorted(objects, key=lambda o: (o.box_xyxy[0], o.box_xyxy[1]))


def _region(owner, obj):
    return {"box": list(obj.box_xyxy), "mask": _mask_rle(owner == obj.index)}


def _make_row(task, level, scene, rng, config):
    """(messages, boxes, masks, other regions) for `task` on `scene`, or None when the scene cannot support it."""
    _, owner, objects = scene
    template_seed = int(rng.integers(2**31))
    if task == "reg":  # the prompt region (box or mask) -> the target's full description
        target = objects[rng.integers(len(objects))]
        description = noun_phrase([(k, getattr(target, k)) for k in ATTRIBUTE_KINDS])
        messages = build_task_messages("reg", description, seed=template_seed, vary_answer=config.vary_answer)
        mask = _mask_rle(owner == target.index) if rng.random() < config.reg_mask_fraction else None
        return messages, [target.box_xyxy], [mask], [_region(owner, o) for o in objects if o is not target]
    if task == "caption":
        ordered = _reading_order(objects)
        phrases = [noun_phrase([(k, getattr(o, k)) for k in ATTRIBUTE_KINDS], article="a") for o in ordered]
        messages = build_task_messages("caption", phrases, seed=template_seed, vary_answer=config.vary_answer)
        return messages, [o.box_xyxy for o in ordered], [None] * len(ordered), []
    if task == "multi":
        for _ in range(MAX_QUERIES):
            attrs = random_attrs(objects[rng.integers(len(objects))], rng, nonempty=False)
            matches = _reading_order(matching(objects, attrs))
            if len(matches) >= 2:
                expression = noun_phrase(attrs, plural=True, article="")
                messages = build_task_messages(
                    "multi", expression, n_objects=len(matches), seed=template_seed, vary_answer=config.vary_answer
                )
                return messages, [o.box_xyxy for o in matches], [None] * len(matches), []
        return None
    found = find_expression(level, objects, rng, config)
    if found is None:
        return None
    target, expression = found
    messages = build_task_messages(task, expression, seed=template_seed, vary_answer=config.vary_answer)
    with_mask = task == "res" or (task == "rec" and config.rec_masks)
    return messages, [target.box_xyxy], [_mask_rle(owner == target.index) if with_mask else None], []


def generate_synthetic_samples(config=None, split="train", num_samples=1000, seed=0, start=0):
    """Yields rows (dicts in DESIGN.md's schema, `image` a PIL image) for sample indices [start, start + num_samples).

    Row i depends only on (config, seed, split, i), so any slice of a split can be rebuilt on its own.
    """
    config = config or SyntheticConfig()
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    for index in range(start, start + num_samples):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        task = config.tasks[rng.integers(len(config.tasks))]
        level = config.levels[rng.integers(len(config.levels))]
        for _ in range(_MAX_SCENES):
            scene = _draw_scene(config, rng)
            made = scene and _make_row(task, level, scene, rng, config)
            if made:
                break
        else:
            raise RuntimeError(
                f"No {task!r} sample at level {level!r} after {_MAX_SCENES} scenes: `config` is infeasible "
                f"(too many or too large objects for image_size={config.image_size}, or too few attributes)"
            )
        messages, boxes_xyxy, masks, others = made
        yield {
            "image": Image.fromarray(scene[0]),
            "task": task,
            "messages": messages,
            "boxes": [list(box) for box in boxes_xyxy],
            "masks": masks,
            "other_regions": others,
        }


def build_synthetic_dataset(config=None, split="train", num_samples=1000, seed=0):
    """`datasets.Dataset` of `num_samples` synthetic rows with features `SYNTHETIC_FEATURES`, built in memory."""
    rows = list(generate_synthetic_samples(config, split, num_samples, seed))
    return datasets.Dataset.from_list(rows, features=SYNTHETIC_FEATURES, split=datasets.NamedSplit(split))


def build_synthetic_splits(config=None, train_size=1000, validation_size=200, test_size=200, seed=0):
    """`datasets.DatasetDict` with train / validation / test drawn from disjoint seed streams."""
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    return datasets.DatasetDict({name: build_synthetic_dataset(config, name, n, seed) for name, n in sizes.items()})


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "GROUNDING_FEATURES",
    "SYNTHETIC_FEATURES",
    "LEVELS",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "SyntheticConfig",
    "build_synthetic_dataset",
    "build_synthetic_splits",
    "generate_synthetic_samples",
]

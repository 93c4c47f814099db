"""Synthetic referring dataset: schema, determinism, exact boxes/masks and unique referents."""

import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from perceptiongpt.processing.synthetic import (
    COLOURS,
    GROUNDING_FEATURES,
    SYNTHETIC_FEATURES,
    SyntheticConfig,
    _draw_scene,
    _make_row,
    _Object,
    build_synthetic_dataset,
    build_synthetic_splits,
    generate_synthetic_samples,
)
from perceptiongpt.processing.synthetic_expressions import Query, resolve


VIS = "<vis>"


def _rows_equal(a, b):
    return (
        a["task"] == b["task"]
        and a["messages"] == b["messages"]
        and a["boxes"] == b["boxes"]
        and a["masks"] == b["masks"]
        and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    )


def test_same_seed_gives_identical_rows_and_slices_rebuild():
    config = SyntheticConfig.demo()
    first = list(generate_synthetic_samples(config, "train", 12, seed=7))
    second = list(generate_synthetic_samples(config, "train", 12, seed=7))
    assert all(_rows_equal(a, b) for a, b in zip(first, second))
    tail = list(generate_synthetic_samples(config, "train", 4, seed=7, start=8))
    assert all(_rows_equal(a, b) for a, b in zip(first[8:], tail))
    other_seed = list(generate_synthetic_samples(config, "train", 12, seed=8))
    assert not any(_rows_equal(a, b) for a, b in zip(first, other_seed))


def test_splits_are_disjoint_and_follow_the_schema():
    splits = build_synthetic_splits(SyntheticConfig.demo(), train_size=30, validation_size=10, test_size=10, seed=0)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 30, "validation": 10, "test": 10}
    images = {name: {np.asarray(img).tobytes() for img in ds["image"]} for name, ds in splits.items()}
    assert len(images["train"]) == 30
    assert not images["train"] & images["validation"] and not images["train"] & images["test"]
    assert not images["validation"] & images["test"]
    assert all(ds.features == SYNTHETIC_FEATURES for ds in splits.values())  # the schema + REG's other regions
    assert set(GROUNDING_FEATURES) <= set(SYNTHETIC_FEATURES)


def test_rows_have_one_box_and_mask_per_vis():
    config = SyntheticConfig(image_size=96, tasks=("rec", "res", "reg", "multi", "caption"))
    dataset = build_synthetic_dataset(config, "validation", 40, seed=1)
    assert set(dataset["task"]) == {"rec", "res", "reg", "multi", "caption"}
    for row in dataset:
        num_vis = sum(message["content"].count(VIS) for message in row["messages"])
        assert num_vis == len(row["boxes"]) == len(row["masks"]) >= 1
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all("<image>" not in m["content"] for m in row["messages"])
        assert row["image"].size == (96, 96)
        for x1, y1, x2, y2 in row["boxes"]:
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
        if row["task"] != "reg":  # a REG prompt region is a box or a mask
            assert all((mask is not None) == (row["task"] == "res") for mask in row["masks"])
        if row["task"] == "reg":
            assert VIS in row["messages"][0]["content"] and VIS not in row["messages"][1]["content"]


def test_res_mask_is_decodable_and_its_box_is_the_row_box():
    rows = [r for r in generate_synthetic_samples(SyntheticConfig.hard(), "test", 30, seed=2) if r["task"] == "res"]
    assert rows
    for row in rows:
        mask = mask_utils.decode(dict(row["masks"][0], counts=row["masks"][0]["counts"].encode())).astype(bool)
        ys, xs = np.nonzero(mask)
        assert row["boxes"][0] == [xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]


def test_scene_objects_are_visible_parts_in_their_colour():
    config = SyntheticConfig(image_size=64, min_objects=6, max_objects=6, min_visible=0.3, colour_jitter=15)
    for seed in range(5):
        image, owner, objects = _draw_scene(config, np.random.default_rng(seed))
        assert sorted(set(np.unique(owner)) - {-1}) == [o.index for o in objects]
        for obj in objects:
            visible = owner == obj.index
            ys, xs = np.nonzero(visible)
            assert obj.box_xyxy == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
            # Occluded pixels belong to the occluder, so every visible pixel shows this object's colour.
            deviation = np.abs(image[visible].astype(int) - np.asarray(COLOURS[obj.colour])).max()
            assert deviation <= 15 + 6


def _object(index, cx, cy=30.0, radius=5.0, shape="circle", colour="red", size="small"):
    return _Object(shape, colour, size, radius, (cx - radius, cy - radius, cx + radius, cy + radius), index)


def _ids(query, objects):
    return resolve(query, objects, position_margin_px=5.0, size_margin=1.3)


RED = (("colour", "red"),)
BLUE_SQUARE = (("colour", "blue"), ("shape", "square"))


def test_resolve_attributes_and_position_superlatives():
    objects = [_object(0, 10), _object(1, 40), _object(2, 25, shape="square", colour="blue")]
    assert _ids(Query(RED), objects) == [0, 1]
    assert _ids(Query(BLUE_SQUARE), objects) == [2]
    assert _ids(Query(RED, rank_axis="x", k=1), objects) == [0]
    assert _ids(Query(RED, rank_axis="x", descending=True, k=1), objects) == [1]
    close = [_object(0, 10), _object(1, 13)]  # 3 px apart: "leftmost" would be a guess
    assert _ids(Query(RED, rank_axis="x", k=1), close) is None
    sized = [_object(0, 10, radius=4.0), _object(1, 40, radius=8.0)]
    assert _ids(Query((), rank_axis="size", descending=True, k=1), sized) == [1]
    assert _ids(Query((), rank_axis="size", k=1), [_object(0, 10, radius=5.0), _object(1, 40, radius=6.0)]) is None


def test_resolve_ordinals():
    objects = [_object(0, 50), _object(1, 10), _object(2, 30), _object(3, 13, colour="blue")]
    assert _ids(Query(RED, rank_axis="x", k=2), objects) == [2]
    assert _ids(Query(RED, rank_axis="x", descending=True, k=3), objects) == [1]
    assert _ids(Query(RED, rank_axis="x", k=4), objects) == []
    assert _ids(Query((), rank_axis="x", k=3), objects) == [2]
    assert _ids(Query((), rank_axis="x", k=2), objects) is None  # the blue one is 3 px from the first


def test_resolve_relations():
    square = _object(2, 30, shape="square", colour="blue")
    assert _ids(Query(RED, relation="left of", anchor=BLUE_SQUARE), [_object(0, 10), _object(1, 50), square]) == [0]
    assert _ids(Query(RED, relation="right of", anchor=BLUE_SQUARE), [_object(0, 10), _object(1, 50), square]) == [1]
    assert _ids(Query(RED, relation="above", anchor=BLUE_SQUARE), [_object(0, 10, cy=10), square]) == [0]
    # A candidate within the margin of the anchor makes "left of" ambiguous.
    assert _ids(Query(RED, relation="left of", anchor=BLUE_SQUARE), [_object(0, 10), _object(1, 28), square]) is None
    two_anchors = [_object(0, 10), _object(1, 60, shape="square", colour="blue"), square]
    assert _ids(Query(RED, relation="left of", anchor=BLUE_SQUARE), two_anchors) is None


_WORDS = {"size": ("small", "large"), "colour": tuple(COLOURS), "shape": ("circle", "square", "triangle")}


def _parse_attributes(expression):
    words = set(re.findall(r"[a-z]+", expression.lower()))
    words |= {w[:-1] for w in words if w.endswith("s")}  # plurals
    return {kind: value for kind, values in _WORDS.items() for value in values if value in words}


@pytest.mark.parametrize("task", ["rec", "multi"])
def test_demo_expressions_pick_exactly_their_objects(task):
    config = SyntheticConfig.demo()
    checked = 0
    for seed in range(15):
        rng = np.random.default_rng(seed)
        scene = _draw_scene(config, rng)
        made = scene and _make_row(task, "attribute", scene, rng, config)
        if not made:
            continue
        messages, boxes, _, _ = made
        attributes = _parse_attributes(messages[0]["content"])
        matches = [o for o in scene[2] if all(getattr(o, k) == v for k, v in attributes.items())]
        expected = sorted((o.box_xyxy for o in matches)) if task == "multi" else [matches[0].box_xyxy]
        assert len(matches) >= 2 if task == "multi" else len(matches) == 1
        assert boxes == expected
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    "level, pattern",
    [
        ("position", r"(left|right|top)most|lowest|far (left|right)|at the (top|bottom)|biggest|largest|smallest"),
        ("relation", r"(left of|right of|above|below) the "),
        ("ordinal", r"(first|second|third|fourth|fifth|sixth) .*from the (left|right|top|bottom)"),
    ],
)
def test_levels_produce_their_expression_kind(level, pattern):
    config = SyntheticConfig(image_size=96, levels=(level,), tasks=("rec",))
    questions = [row["messages"][0]["content"] for row in generate_synthetic_samples(config, "train", 8, seed=4)]
    assert all(re.search(pattern, q) for q in questions), questions


def test_config_validation_and_infeasible_configs():
    with pytest.raises(ValueError, match=r"`shapes` must be a non-empty subset of .*got \('hexagon',\)"):
        SyntheticConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match=r"got 4 and 2"):
        SyntheticConfig(min_objects=4, max_objects=2)
    with pytest.raises(ValueError, match=r"`split` must be one of"):
        next(generate_synthetic_samples(split="dev"))
    crowded = SyntheticConfig(
        image_size=16, min_objects=6, max_objects=6, sizes=(("big", 0.4, 0.45),), min_visible=1.0
    )
    with pytest.raises(RuntimeError, match=r"`config` is infeasible"):
        next(generate_synthetic_samples(crowded))


def test_rec_masks_option_gives_rec_rows_their_target_mask():

    base = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec",)})
    dense = SyntheticConfig(**{**base.__dict__, "rec_masks": True})
    plain = list(generate_synthetic_samples(base, "train", 5, seed=3))
    rows = list(generate_synthetic_samples(dense, "train", 5, seed=3))
    for a, b in zip(plain, rows):
        assert a["masks"] == [None] and a["messages"] == b["messages"] and a["boxes"] == b["boxes"]
        mask = mask_utils.decode({"size": b["masks"][0]["size"], "counts": b["masks"][0]["counts"].encode()})
        ys, xs = mask.nonzero()
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == b["boxes"][0]  # the box is the mask's box

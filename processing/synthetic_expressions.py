"""The synthetic scenes' referring expressions: a grammar that only keeps expressions resolving to one object.

A referring expression is a `Query` (attributes plus at most one of: a rank along x / y / size, or a relation to
a uniquely described anchor). `resolve` evaluates it against every object of the scene and refuses ambiguity
(objects closer than the margin); an expression is kept only if it resolves to exactly its target, and, above the
attribute level, only if its attributes alone would not. Levels:
- attribute: "the small red circle";
- position (superlatives and absolute position): "the leftmost circle", "the biggest shape", "the square at the top";
- relation: "the circle left of the blue square";
- ordinal: "the second circle from the left".
Objects are the scenes' (`synthetic._Object`): shape, colour, size, radius, visible box and paint index.
"""

import math
from dataclasses import dataclass


ATTRIBUTE_KINDS = ("size", "colour", "shape")  # also the word order of a noun phrase
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
SUPERLATIVES = {  # (axis, descending) -> templates around the noun phrase
    ("x", False): ("the leftmost {}", "the {} on the far left"),
    ("x", True): ("the rightmost {}", "the {} on the far right"),
    ("y", False): ("the topmost {}", "the {} at the top"),
    ("y", True): ("the lowest {}", "the {} at the bottom"),
    ("size", False): ("the smallest {}",),
    ("size", True): ("the biggest {}", "the largest {}"),
}
ORDINAL_SIDES = {("x", False): "left", ("x", True): "right", ("y", False): "top", ("y", True): "bottom"}
MAX_QUERIES = 30  # expressions tried per scene


@dataclass(frozen=True)
class Query:
    attrs: tuple = ()  # ((kind, value), ...) in ATTRIBUTE_KINDS order
    rank_axis: str = ""  # "x", "y" or "size": the k-th candidate along that axis
    descending: bool = False  # rank from the right / bottom / biggest
    k: int = 0
    relation: str = ""  # one of RELATIONS
    anchor: tuple = ()  # the anchor's attrs; it must resolve to one object


def rank_value(obj, axis):
    return math.log(obj.radius) if axis == "size" else obj.centre[0 if axis == "x" else 1]


def relation_distance(obj, anchor, relation):
    """Positive when `obj` is `relation` the anchor (e.g. left of), in pixels between visible-box centres."""
    (x, y), (anchor_x, anchor_y) = obj.centre, anchor.centre
    return {"left of": anchor_x - x, "right of": x - anchor_x, "above": anchor_y - y, "below": y - anchor_y}[relation]


def matching(objects, attrs):
    return [o for o in objects if all(getattr(o, kind) == value for kind, value in attrs)]


def resolve(query, objects, position_margin_px, size_margin):
    """Indices of the objects `query` refers to, or None when the scene makes it ambiguous."""
    candidates = matching(objects, query.attrs)
    if query.relation:
        anchors = matching(objects, query.anchor)
        if len(anchors) != 1:
            return None
        anchor = anchors[0]
        distances = [(relation_distance(o, anchor, query.relation), o) for o in candidates if o is not anchor]
        if any(abs(d) < position_margin_px for d, _ in distances):
            return None
        candidates = [o for d, o in distances if d > 0]
    if query.rank_axis:
        margin = math.log(size_margin) if query.rank_axis == "size" else position_margin_px
        ordered = sorted(candidates, key=lambda o: rank_value(o, query.rank_axis), reverse=query.descending)
        if len(ordered) < query.k:
            return []
        target_value = rank_value(ordered[query.k - 1], query.rank_axis)
        if any(
            abs(rank_value(o, query.rank_axis) - target_value) < margin
            for i, o in enumerate(ordered)
            if i != query.k - 1
        ):
            return None
        candidates = [ordered[query.k - 1]]
    return [o.index for o in candidates]


def noun_phrase(attrs, plural=False, article="the"):
    values = dict(attrs)
    noun = values.get("shape", "shape")
    if plural:
        noun += "es" if noun.endswith("s") else "s"
    return " ".join([article, *[values[k] for k in ATTRIBUTE_KINDS[:2] if k in values], noun]).strip()


def render(query, rng):
    phrase = noun_phrase(query.attrs, article="")
    if query.relation:
        return f"the {phrase} {query.relation} {noun_phrase(query.anchor)}"
    if query.rank_axis and query.k == 1:
        templates = SUPERLATIVES[(query.rank_axis, query.descending)]
        return templates[rng.integers(len(templates))].format(phrase)
    if query.rank_axis:
        side = ORDINAL_SIDES[(query.rank_axis, query.descending)]
        return f"the {ORDINALS[query.k - 1]} {phrase} from the {side}"
    return f"the {phrase}"


def random_attrs(obj, rng, nonempty, exclude=()):
    kinds = [k for k in ATTRIBUTE_KINDS if k not in exclude and rng.random() < 0.5]
    if nonempty and not kinds:
        kinds = [rng.choice([k for k in ATTRIBUTE_KINDS if k not in exclude])]
    return tuple((k, getattr(obj, k)) for k in ATTRIBUTE_KINDS if k in kinds)


def propose(level, target, objects, rng, config):
    """A random candidate expression of `level` for `target`; None when the level does not apply."""
    if level == "attribute":
        return Query(random_attrs(target, rng, nonempty=True))
    if level == "position":
        axis = ("x", "y", "size")[rng.integers(3)]
        exclude = ("size",) if axis == "size" else ()
        return Query(random_attrs(target, rng, False, exclude), rank_axis=axis, descending=bool(rng.integers(2)), k=1)
    if level == "ordinal":
        attrs, axis, descending = random_attrs(target, rng, False), ("x", "y")[rng.integers(2)], bool(rng.integers(2))
        ordered = sorted(matching(objects, attrs), key=lambda o: rank_value(o, axis), reverse=descending)
        k = ordered.index(target) + 1
        return Query(attrs, rank_axis=axis, descending=descending, k=k) if k > 1 else None  # k = 1: position
    anchor = objects[rng.integers(len(objects))]
    margin = config.position_margin * config.image_size
    relations = [r for r in RELATIONS if relation_distance(target, anchor, r) >= margin]
    if anchor is target or not relations:
        return None
    relation = relations[rng.integers(len(relations))]
    return Query(random_attrs(target, rng, False), relation=relation, anchor=random_attrs(anchor, rng, True))


def find_expression(level, objects, rng, config):
    """(target, text) for a uniquely resolving expression of `level`, or None after MAX_QUERIES tries."""
    margins = (config.position_margin * config.image_size, config.size_margin)
    for _ in range(MAX_QUERIES):
        target = objects[rng.integers(len(objects))]
        query = propose(level, target, objects, rng, config)
        if query is None or resolve(query, objects, *margins) != [target.index]:
            continue
        if level != "attribute" and len(matching(objects, query.attrs)) == 1:
            continue  # the rank or relation must be needed
        return target, render(query, rng)
    return None


__all__ = [
    "ATTRIBUTE_KINDS",
    "MAX_QUERIES",
    "ORDINALS",
    "Query",
    "find_expression",
    "matching",
    "noun_phrase",
    "random_attrs",
    "resolve",
]

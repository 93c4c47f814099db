"""The comparison baseline (Shikra-style): answer boxes written as text, `[0.123,0.456,0.789,0.901]`, and parsed back.

Coordinates are normalized xyxy of the vision frame with three decimals, the same frame `vis_boxes` use, so both
variants see the same geometry. Only ANSWER `<vis>` become text; prompt regions keep their `<vis>` embedding.
"""

import re

import torch

from .region_geometry import boxes_xyxy_normalized_to_pixel, boxes_xyxy_pixel_to_normalized


COORDINATE_FORMATS = ("vis", "text")
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_TEXT_PATTERN = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def box_xyxy_normalized_to_text(box) -> str:
    """(4,) normalized xyxy -> "[x1,y1,x2,y2]" with three decimals, clipped to [0, 1]."""
    return "[" + ",".join(f"{min(max(float(v), 0.0), 1.0):.3f}" for v in box) + "]"


def parse_boxes_xyxy_normalized(text: str) -> list[list[float]]:
    """Every well-formed box in `text`, in order: 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1; others are skipped."""
    boxes = []
    for match in BOX_TEXT_PATTERN.finditer(text):
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        if 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1:
            boxes.append([x1, y1, x2, y2])
    return boxes


def text_boxes_to_pixel(text: str, processor, image_size: tuple[int, int]) -> torch.Tensor:
    """The boxes written in `text` as (n, 4) pixel xyxy on the original (H, W) image."""
    boxes = torch.tensor(parse_boxes_xyxy_normalized(text), dtype=torch.float32).reshape(-1, 4)
    return boxes_xyxy_normalized_to_pixel(boxes, processor.image_geometry(tuple(image_size)))


def row_with_text_coordinates(row: dict, processor) -> dict:
    """A copy of a grounding row whose assistant `<vis>` are replaced by their boxes as text (and dropped from
    `boxes`/`masks`); user-turn `<vis>` are kept."""
    vis = processor.vis_token
    geometry = processor.image_geometry((row["image"].height, row["image"].width))
    boxes, masks = list(row.get("boxes") or []), row.get("masks")
    kept_boxes, kept_masks, messages, slot = [], [], [], 0
    for message in row["messages"]:
        pieces = message["content"].split(vis)
        content = pieces[0]
        for piece in pieces[1:]:
            if message["role"] == "assistant":
                pixel = torch.tensor([boxes[slot]], dtype=torch.float64)
                content += box_xyxy_normalized_to_text(boxes_xyxy_pixel_to_normalized(pixel, geometry)[0].tolist())
            else:
                content += vis
                kept_boxes.append(boxes[slot])
                kept_masks.append(None if masks is None else masks[slot])
            content += piece
            slot += 1
        messages.append({"role": message["role"], "content": content})
    return {**row, "messages": messages, "boxes": kept_boxes, "masks": kept_masks if masks is not None else None}


__all__ = [
    "BOX_TEXT_PATTERN",
    "COORDINATE_FORMATS",
    "box_xyxy_normalized_to_text",
    "parse_boxes_xyxy_normalized",
    "row_with_text_coordinates",
    "text_boxes_to_pixel",
]

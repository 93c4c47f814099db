"""Any `datasets` source in the grounding schema (DESIGN.md, "Data"): load, check every row, encode once.

`load_grounding_dataset` takes a Hub id, a folder written by `save_to_disk`, a folder of data files, or one
JSON-lines / JSON / parquet / CSV file whose `image` column holds paths (relative to the data file) or bytes;
other column names map onto the schema. `check_grounding_rows` refuses a malformed row with its index and field
before any training. `encode_grounding_dataset` runs the collator's chat templating through `datasets.map` (cached,
`num_proc`), so that training only pads.
"""

import json
import math
from pathlib import Path

import datasets
import numpy as np

from .collator import ROLES
from .templates import VIS_TOKEN


SCHEMA = ("image", "messages", "boxes", "masks", "task")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
JSON_COLUMNS = ("messages", "boxes", "masks")  # CSV cells hold them as JSON text


def _load_source(source: str, split: str):
    """(dataset, folder that relative image paths start from, or None)."""
    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get("".join(path.suffixes[-1:]).lower())
        if builder is None:
            raise ValueError(f"`dataset` file {source!r} must end with one of {sorted(FILE_BUILDERS)}.")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split), path.parent
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"`split` {split!r} is not in the saved dataset {source!r}: {sorted(loaded)}.")
            loaded = loaded[split]
        return loaded, path
    return datasets.load_dataset(source, split=split), (path if path.is_dir() else None)


def load_grounding_dataset(source: str, split: str = "train", columns: dict | None = None) -> datasets.Dataset:
    """The rows of `source` in the grounding schema: `image` (decoded lazily), `messages`, `boxes`, `masks`, `task`.

    Args:
        source: a Hub dataset id, a `save_to_disk` folder, a folder of data files, or a .jsonl/.json/.parquet/.csv
            file. String images are paths, relative to the data file's folder unless absolute.
        split: the split to read.
        columns: schema name -> the source's column name, for sources that name them otherwise
            (e.g. `{"image": "img_path", "messages": "conversation"}`).

    A missing `masks` column means no masks; a missing `task` column is "res" for rows with a mask, else "rec".
    """
    columns = dict(columns or {})
    unknown = set(columns) - set(SCHEMA)
    if unknown:
        raise ValueError(f"`columns` maps schema names {sorted(unknown)} that are not in {SCHEMA}.")
    dataset, base = _load_source(source, split)
    renames = {name: schema for schema, name in columns.items() if name != schema}
    missing = [name for name in renames if name not in dataset.column_names]
    if missing:
        raise ValueError(f"`dataset` {source!r} has no column {missing}; its columns: {dataset.column_names}.")
    dataset = dataset.rename_columns(renames)
    for required in ("image", "messages", "boxes"):
        if required not in dataset.column_names:
            raise ValueError(
                f"`dataset` {source!r} has no {required!r} column (columns: {dataset.column_names}); map yours "
                f"with the `--{required}_column` flag."
            )
    dataset = dataset.map(_normalized_row, fn_kwargs={"base": None if base is None else str(base)}, desc="schema")
    return dataset.cast_column("image", datasets.Image())


def _normalized_row(row, base):
    out = {}
    for name in JSON_COLUMNS:
        if isinstance(row.get(name), str):
            out[name] = json.loads(row[name])
    image = row["image"]
    if isinstance(image, str) and base is not None and not Path(image).is_absolute():
        out["image"] = str(Path(base) / image)
    if "masks" not in row:
        out["masks"] = None
    if "task" not in row:
        masks = out.get("masks", row.get("masks"))
        out["task"] = "res" if masks and any(mask is not None for mask in masks) else "rec"
    return out


def _row_problem(row) -> str | None:
    """What is wrong with one row (the field and the value), or None."""
    if row.get("image") is None:
        return "`image` is missing"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return f"`messages` must be a non-empty list of {{role, content}}, got {messages!r}"
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"`messages[{turn}]['role']` must be one of {ROLES}, got {message!r}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"`messages[{turn}]['content']` must be non-empty text, got {message.get('content')!r}"
    n_vis = sum(message["content"].count(VIS_TOKEN) for message in messages)
    boxes = row.get("boxes") or []
    if len(boxes) != n_vis:
        return f"`boxes` has {len(boxes)} boxes but the messages have {n_vis} `{VIS_TOKEN}`"
    for k, box in enumerate(boxes):
        if box is None:
            continue
        if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            return f"`boxes[{k}]` must be 4 finite numbers (pixel x1, y1, x2, y2), got {box!r}"
        if box[2] <= box[0] or box[3] <= box[1]:
            return f"`boxes[{k}]` must have x2 > x1 and y2 > y1, got {box!r}"
    masks = row.get("masks")
    if masks is not None and len(masks) != n_vis:
        return f"`masks` has {len(masks)} entries but the messages have {n_vis} `{VIS_TOKEN}`"
    for k, mask in enumerate(masks or []):
        if mask is not None and not (isinstance(mask, dict) and {"size", "counts"} <= set(mask)):
            return f"`masks[{k}]` must be None or an RLE dict with 'size' and 'counts', got {type(mask).__name__}"
    return None


def check_grounding_rows(dataset, name: str = "dataset") -> None:
    """Raises a ValueError naming the first malformed row's index and field (images are not decoded)."""
    rows = dataset.cast_column("image", datasets.Image(decode=False)) if "image" in dataset.features else dataset
    for index, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"Row {index} of `{name}`: {problem}.")


def _encoded_row(row, index, collator):
    encoded = collator.encode(row, index)
    out = {key: value.numpy() for key, value in encoded.items() if key != "assistant_masks"}
    if "vis_masks" not in out:  # Arrow needs the same columns in every row; an all-invalid mask is dropped again
        slots, side = out["vis_boxes"].shape[1], collator.processor.mask_size
        out["vis_masks"] = np.zeros((1, slots, side, side), dtype=bool)
        out["vis_mask_valid"] = np.zeros((1, slots), dtype=bool)
    return out


def encode_grounding_dataset(dataset, collator, num_proc: int | None = None) -> datasets.Dataset:
    """The collator's encoding of every row, through `datasets.map` (cached for file-backed sources); the result is
    a pre-encoded training set for the same collator, which then only pads."""
    return dataset.map(
        _encoded_row,
        with_indices=True,
        fn_kwargs={"collator": collator},
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="encode",
    ).with_format("numpy")


__all__ = ["check_grounding_rows", "encode_grounding_dataset", "load_grounding_dataset"]

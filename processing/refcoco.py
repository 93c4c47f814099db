"""RefCOCO / RefCOCO+ / RefCOCOg loaders into the grounding schema of DESIGN.md ("Data"), one row per expression.

Two source layouts (notes/peers-and-protocols.md, section 5):
- the original refer layout: `<dataset_dir>/refs(<split_by>).p` (a pickled list of refs) and
  `<dataset_dir>/instances.json` (COCO), with the COCO train2014 images in `images_dir`;
- the HF parquet layout (lmms-lab/RefCOCO, RefCOCOplus, RefCOCOg): one row per OBJECT with `question_id` (the
  annotation id), `image`, `answer` (its expressions), `segmentation` (one flattened polygon), `bbox` (COCO
  xywh). Its "val" files hold rows beyond the papers' split; `refs_file` keeps only the annotations that the
  refer split names.

Boxes are converted from COCO xywh to pixel xyxy. Masks are given for task "res" only, as pycocotools RLE with
str counts, built from polygons (merged, like refer's getMask) or RLE segmentations; "rec" rows have null masks.
Split names follow the papers: train, val, testA, testB (RefCOCO, RefCOCO+) and test (RefCOCOg umd).
"""

import glob
import io
import json
import os
import pickle

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from .synthetic import GROUNDING_FEATURES
from .templates import build_task_messages


REFER_SPLITS = ("train", "val", "testA", "testB", "test")
REFER_TASKS = ("rec", "res")


def box_xywh_to_xyxy(box_xywh):
    """COCO [x, y, width, height] in pixels -> [x1, y1, x2, y2] in pixels, as floats."""
    x, y, width, height = (float(v) for v in box_xywh)
    return [x, y, x + width, y + height]


def segmentation_to_rle(segmentation, height, width):
    """A COCO segmentation (polygon list, uncompressed RLE or compressed RLE) -> RLE dict with str counts."""
    if isinstance(segmentation, list):
        if not segmentation or not all(len(polygon) >= 6 for polygon in segmentation):
            raise ValueError(f"`segmentation` polygons need at least 3 points each, got {segmentation!r}")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _check_arguments(split, task):
    if split not in REFER_SPLITS:
        raise ValueError(f"`split` must be one of {REFER_SPLITS}, got {split!r}")
    if task not in REFER_TASKS:
        raise ValueError(f"`task` must be one of {REFER_TASKS}, got {task!r}")


def _load_refs(refs_file):
    # The published refs(*).p were pickled by Python 2; latin1 reads their byte strings without failing.
    # Pickles run code when loaded: only load files from a trusted source.
    with open(refs_file, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def _split_refs(refs, split, source):
    selected = [ref for ref in refs if ref["split"] == split]
    if not selected:
        available = sorted({ref["split"] for ref in refs})
        raise ValueError(f"`split` {split!r} has no refs in {source}; available splits: {available}")
    return selected


def _row(image, task, expression, box_xywh, mask, template_seed):
    return {
        "image": image,
        "task": task,
        "messages": build_task_messages(task, expression, seed=template_seed),
        "boxes": [box_xywh_to_xyxy(box_xywh)],
        "masks": [mask],
    }


def _to_dataset(rows, split):
    return datasets.Dataset.from_list(rows, features=GROUNDING_FEATURES, split=datasets.NamedSplit(split))


def _find_refs_file(dataset_dir, split_by):
    if split_by is not None:
        return os.path.join(dataset_dir, f"refs({split_by}).p")
    found = sorted(glob.glob(os.path.join(glob.escape(dataset_dir), "refs(*).p")))
    if len(found) != 1:
        raise ValueError(f"`split_by` is needed: found {len(found)} refs(*).p files in {dataset_dir}: {found}")
    return found[0]


def load_refcoco_refer(dataset_dir, images_dir, split, split_by=None, task="rec"):
    """Rows of one split from the original refer layout.

    Args:
        dataset_dir: the folder with `refs(<split_by>).p` and `instances.json` (e.g. `refer/data/refcocog`).
        images_dir: the folder with the COCO train2014 images named as in `instances.json`.
        split: one of `REFER_SPLITS`.
        split_by: "unc" (RefCOCO, RefCOCO+), "umd" or "google" (RefCOCOg); None uses the only refs file present.
        task: "rec" or "res".

    Returns:
        A `datasets.Dataset` with one row per sentence, in refs-file order; images are stored as paths.
    """
    _check_arguments(split, task)
    refs_file = _find_refs_file(dataset_dir, split_by)
    refs = _split_refs(_load_refs(refs_file), split, refs_file)
    with open(os.path.join(dataset_dir, "instances.json"), encoding="utf-8") as handle:
        instances = json.load(handle)
    images = {image["id"]: image for image in instances["images"]}
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    rows = []
    for ref in refs:
        image, annotation = images[ref["image_id"]], annotations[ref["ann_id"]]
        path = os.path.join(images_dir, image["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image {image['file_name']!r} of ref {ref['ref_id']} is not in {images_dir}")
        mask = None
        if task == "res":
            mask = segmentation_to_rle(annotation["segmentation"], image["height"], image["width"])
        for sentence in ref["sentences"]:
            rows.append(_row(path, task, sentence["sent"], annotation["bbox"], mask, sentence["sent_id"]))
    return _to_dataset(rows, split)


def _image_size(image):
    """(height, width) of an HF image struct {"bytes", "path"}, read from the header only."""
    source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    with Image.open(source) as opened:
        return opened.height, opened.width


def _annotation_id(question_id):
    if not str(question_id).isdigit():
        raise ValueError(f"`question_id` must be a COCO annotation id to filter with `refs_file`, got {question_id!r}")
    return int(question_id)


def load_refcoco_parquet(parquet_files, split="val", refs_file=None, task="rec"):
    """Rows of one split from the HF parquet layout, one per expression of each object row.

    Args:
        parquet_files: a path or a list of paths to the split's parquet files.
        split: the split these files hold, one of `REFER_SPLITS`; with `refs_file`, the refer split to keep.
        refs_file: optional `refs(<split_by>).p`; when given, only objects whose `question_id` is an annotation
            id of a `split` ref are kept (the papers' split, without the extra rows of the "val" files).
        task: "rec" or "res".
    """
    _check_arguments(split, task)
    paths = [parquet_files] if isinstance(parquet_files, (str, os.PathLike)) else list(parquet_files)
    columns = ["question_id", "image", "answer", "segmentation", "bbox"]
    table = pa.concat_tables([pq.read_table(path, columns=columns) for path in paths])
    keep = None
    if refs_file is not None:
        keep = {ref["ann_id"] for ref in _split_refs(_load_refs(refs_file), split, refs_file)}
    rows = []
    for record in table.to_pylist():
        if keep is not None and _annotation_id(record["question_id"]) not in keep:
            continue
        mask = None
        if task == "res":
            segmentation = record["segmentation"]
            polygons = segmentation if segmentation and isinstance(segmentation[0], list) else [segmentation]
            mask = segmentation_to_rle(polygons, *_image_size(record["image"]))
        answers = [record["answer"]] if isinstance(record["answer"], str) else record["answer"]
        for answer in answers:
            rows.append(_row(record["image"], task, answer, record["bbox"], mask, template_seed=len(rows)))
    return _to_dataset(rows, split)


__all__ = [
    "REFER_SPLITS",
    "REFER_TASKS",
    "box_xywh_to_xyxy",
    "load_refcoco_parquet",
    "load_refcoco_refer",
    "segmentation_to_rle",
]

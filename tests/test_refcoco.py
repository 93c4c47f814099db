"""RefCOCO loaders on tiny fixtures in both layouts: exact boxes, masks and row counts."""

import io
import json
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from perceptiongpt.processing.refcoco import (
    box_xywh_to_xyxy,
    load_refcoco_parquet,
    load_refcoco_refer,
    segmentation_to_rle,
)
from perceptiongpt.processing.synthetic import GROUNDING_FEATURES


RECT = [[2, 3, 12, 3, 12, 8, 2, 8]]  # annotation 101 on image 1 (40 x 30)
TWO_SQUARES = [[20, 2, 26, 2, 26, 8, 20, 8], [30, 20, 36, 20, 36, 26, 30, 26]]  # annotation 102, two parts
SQUARE = [[5, 5, 10, 5, 10, 10, 5, 10]]  # annotation 201 on image 2 (20 x 20), as a polygon in the parquet rows


def _uncompressed_rle(mask):
    """Column-major run lengths starting with a run of zeros, as COCO's uncompressed RLE."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


SQUARE_MASK = np.zeros((20, 20), dtype=bool)
SQUARE_MASK[5:10, 5:10] = True


def _decode(rle):
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _polygon_mask(polygons, height, width):
    """refer's getMask: decode every polygon and take the union."""
    return mask_utils.decode(mask_utils.frPyObjects(polygons, height, width)).sum(axis=2) > 0


def _ref(ref_id, ann_id, image_id, split, sentences):
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        "sent_ids": [sent_id for sent_id, _ in sentences],
        "file_name": f"ignored_{ann_id}.jpg",
        "sentences": [
            {"sent_id": sent_id, "sent": text, "raw": text.upper(), "tokens": text.split()}
            for sent_id, text in sentences
        ],
    }


REFS = [
    _ref(1, 101, 1, "val", [(11, "left box"), (12, "small box")]),
    _ref(2, 102, 1, "testA", [(13, "two squares")]),
    _ref(3, 201, 2, "val", [(14, "square")]),
    _ref(4, 102, 1, "train", [(15, "squares")]),
]


@pytest.fixture()
def refer_layout(tmp_path):
    dataset_dir, images_dir = tmp_path / "refcoco", tmp_path / "train2014"
    dataset_dir.mkdir()
    images_dir.mkdir()
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 20, "width": 20},
        ],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5], "iscrowd": 0, "segmentation": RECT},
            {
                "id": 102,
                "image_id": 1,
                "category_id": 1,
                "bbox": [20, 2, 16, 24],
                "iscrowd": 0,
                "segmentation": TWO_SQUARES,
            },
            {
                "id": 201,
                "image_id": 2,
                "category_id": 1,
                "bbox": [5, 5, 5, 5],
                "iscrowd": 0,
                "segmentation": _uncompressed_rle(SQUARE_MASK),
            },
        ],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    (dataset_dir / "instances.json").write_text(json.dumps(instances))
    with open(dataset_dir / "refs(unc).p", "wb") as handle:
        pickle.dump(REFS, handle)
    for image in instances["images"]:
        Image.new("RGB", (image["width"], image["height"]), (90, 120, 200)).save(images_dir / image["file_name"])
    return dataset_dir, images_dir


def test_box_xywh_to_xyxy():
    assert box_xywh_to_xyxy([2, 3, 10, 5.5]) == [2.0, 3.0, 12.0, 8.5]


def test_segmentation_to_rle_formats():
    rle = segmentation_to_rle(_uncompressed_rle(SQUARE_MASK), 20, 20)
    assert np.array_equal(_decode(rle), SQUARE_MASK)
    compressed = mask_utils.encode(np.asfortranarray(SQUARE_MASK.astype(np.uint8)))
    assert segmentation_to_rle(compressed, 20, 20) == {"size": [20, 20], "counts": compressed["counts"].decode()}
    assert np.array_equal(_decode(segmentation_to_rle(TWO_SQUARES, 30, 40)), _polygon_mask(TWO_SQUARES, 30, 40))
    with pytest.raises(ValueError, match=r"at least 3 points"):
        segmentation_to_rle([[1, 2, 3, 4]], 30, 40)  # 4 numbers would silently read as a box


def test_refer_rec_rows_boxes_and_images(refer_layout):
    dataset_dir, images_dir = refer_layout
    rows = load_refcoco_refer(dataset_dir, images_dir, "val")
    assert rows.features == GROUNDING_FEATURES
    assert len(rows) == 3
    assert rows["boxes"] == [[[2.0, 3.0, 12.0, 8.0]], [[2.0, 3.0, 12.0, 8.0]], [[5.0, 5.0, 10.0, 10.0]]]
    assert rows["masks"] == [[None], [None], [None]]
    assert set(rows["task"]) == {"rec"}
    for row, sentence in zip(rows, ["left box", "small box", "square"]):
        assert sentence in row["messages"][0]["content"]
        assert row["messages"][1]["content"].count("<vis>") == 1
    assert [row["image"].size for row in rows] == [(40, 30), (40, 30), (20, 20)]


def test_refer_res_masks_match_pycocotools(refer_layout):
    dataset_dir, images_dir = refer_layout
    val = load_refcoco_refer(dataset_dir, images_dir, "val", split_by="unc", task="res")
    rect_mask = _decode(val[0]["masks"][0])
    assert np.array_equal(rect_mask, _polygon_mask(RECT, 30, 40))
    assert rect_mask.sum() == 50  # the 10 x 5 box, pixel for pixel
    assert rect_mask[3:8, 2:12].all()
    assert np.array_equal(_decode(val[2]["masks"][0]), SQUARE_MASK)  # RLE annotation, 25 pixels
    assert _decode(val[2]["masks"][0]).sum() == 25
    test_a = load_refcoco_refer(dataset_dir, images_dir, "testA", task="res")
    assert len(test_a) == 1
    assert test_a[0]["boxes"] == [[20.0, 2.0, 36.0, 26.0]]
    assert np.array_equal(_decode(test_a[0]["masks"][0]), _polygon_mask(TWO_SQUARES, 30, 40))
    assert _decode(test_a[0]["masks"][0]).sum() == 2 * 36  # both parts of the annotation
    assert len(load_refcoco_refer(dataset_dir, images_dir, "train")) == 1


def test_refer_errors(refer_layout, tmp_path):
    dataset_dir, images_dir = refer_layout
    with pytest.raises(ValueError, match=r"'testB' has no refs .*available splits: \['testA', 'train', 'val'\]"):
        load_refcoco_refer(dataset_dir, images_dir, "testB")
    with pytest.raises(ValueError, match=r"`split` must be one of"):
        load_refcoco_refer(dataset_dir, images_dir, "validation")
    with pytest.raises(ValueError, match=r"`task` must be one of \('rec', 'res'\), got 'reg'"):
        load_refcoco_refer(dataset_dir, images_dir, "val", task="reg")
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000001.jpg"):
        load_refcoco_refer(dataset_dir, tmp_path, "val")
    (dataset_dir / "refs(google).p").write_bytes((dataset_dir / "refs(unc).p").read_bytes())
    with pytest.raises(ValueError, match=r"`split_by` is needed: found 2"):
        load_refcoco_refer(dataset_dir, images_dir, "val")


def _png_bytes(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def parquet_layout(tmp_path, refer_layout):
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.List(datasets.Value("string")),
            "segmentation": datasets.List(datasets.Value("float32")),
            "bbox": datasets.List(datasets.Value("float32")),
            "iscrowd": datasets.Value("int8"),
            "file_name": datasets.Value("string"),
        }
    )
    image_1, image_2 = {"bytes": _png_bytes(40, 30), "path": None}, {"bytes": _png_bytes(20, 20), "path": None}
    columns = {
        "question_id": ["101", "102", "201", "999"],
        "image": [image_1, image_1, image_2, image_2],
        "question": ["Describe the region."] * 4,
        "answer": [["left box", "small box"], ["two squares"], ["square"], ["extra one", "extra two"]],
        "segmentation": [RECT[0], TWO_SQUARES[0], SQUARE[0], SQUARE[0]],
        "bbox": [[2, 3, 10, 5], [20, 2, 6, 6], [5, 5, 5, 5], [5.5, 5, 4.25, 5]],
        "iscrowd": [0, 0, 0, 0],
        "file_name": ["a.jpg", "a.jpg", "b.jpg", "b.jpg"],
    }
    first, second = tmp_path / "val-00000-of-00002.parquet", tmp_path / "val-00001-of-00002.parquet"
    dataset = datasets.Dataset.from_dict(columns, features=features)
    dataset.select(range(2)).to_parquet(str(first))
    dataset.select(range(2, 4)).to_parquet(str(second))
    return [str(first), str(second)], refer_layout[0] / "refs(unc).p"


def test_parquet_rows_explode_answers(parquet_layout):
    files, _ = parquet_layout
    rows = load_refcoco_parquet(files)
    assert rows.features == GROUNDING_FEATURES
    assert len(rows) == 6
    assert rows[5]["boxes"] == [[5.5, 5.0, 9.75, 10.0]]
    assert rows[5]["masks"] == [None]
    assert "extra two" in rows[5]["messages"][0]["content"]
    assert rows[0]["image"].size == (40, 30)


def test_parquet_refs_file_filters_the_split(parquet_layout):
    files, refs_file = parquet_layout
    val = load_refcoco_parquet(files, split="val", refs_file=refs_file, task="res")
    assert len(val) == 3
    assert val["boxes"] == [[[2.0, 3.0, 12.0, 8.0]], [[2.0, 3.0, 12.0, 8.0]], [[5.0, 5.0, 10.0, 10.0]]]
    assert np.array_equal(_decode(val[0]["masks"][0]), _polygon_mask(RECT, 30, 40))
    assert np.array_equal(_decode(val[2]["masks"][0]), _polygon_mask(SQUARE, 20, 20))
    test_a = load_refcoco_parquet(files, split="testA", refs_file=refs_file)
    assert test_a["boxes"] == [[[20.0, 2.0, 26.0, 8.0]]]


def test_parquet_refs_filter_needs_annotation_ids(parquet_layout, tmp_path):
    files, refs_file = parquet_layout
    odd = tmp_path / "odd.parquet"
    table = pq.read_table(files[0])
    table = table.set_column(table.schema.get_field_index("question_id"), "question_id", pa.array(["q101", "q102"]))
    pq.write_table(table, odd)
    with pytest.raises(ValueError, match=r"`question_id` must be a COCO annotation id .*got 'q101'"):
        load_refcoco_parquet(str(odd), refs_file=refs_file)

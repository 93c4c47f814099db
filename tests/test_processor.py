"""PerceptionGPTProcessor: geometry in every resize mode, regions in, pixel results out, validation, serialization."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BLOCK_PACKAGE, CROSS_PROCESS_TOLERANCE, subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptiongpt.processing.processing_perceptiongpt import RESIZE_MODES, PerceptionGPTProcessor, build_processor
from perceptiongpt.processing.tokenization_factory import build_tokenizer


TOKENIZER = build_tokenizer("char")
# 16 px frame, patch 4, CLS added then dropped -> 16 `<image>` tokens; 8x8 masks.
PROCESSORS = {mode: build_processor(16, 4, 8, TOKENIZER, resize_mode=mode) for mode in RESIZE_MODES}
SIZES = {"square": (48, 48), "wide": (30, 80), "tall": (80, 30)}  # (H, W)
NO_REGION = [float("nan")] * 4  # the explicit "this `<vis>` has no region"


def _image(height, width, value=0):
    return Image.new("RGB", (width, height), (value, value, value))


def _prompt(n_vis):
    return "USER: <image>\n" + " ".join(["<vis>"] * n_vis) + " ASSISTANT:"


def _generation(sequences, pred_boxes, vis_scores, pred_masks=None, scores=None):
    return SimpleNamespace(
        sequences=sequences,
        pred_boxes=pred_boxes,
        vis_scores=vis_scores,
        pred_masks=pred_masks,
        vis_positions=[torch.zeros(len(boxes), dtype=torch.long) for boxes in pred_boxes],
        scores=scores,
    )


def _visible_region(processor, height, width):
    """The part of the original image inside the vision frame, in original pixels."""
    geometry = processor.image_geometry((height, width))
    left = max(0.0, -geometry.offset_x / geometry.scale_x)
    right = min(width, (geometry.frame_width - geometry.offset_x) / geometry.scale_x)
    top = max(0.0, -geometry.offset_y / geometry.scale_y)
    bottom = min(height, (geometry.frame_height - geometry.offset_y) / geometry.scale_y)
    return left, top, right, bottom


def test_image_token_count_and_output_keys():
    out = PROCESSORS["pad"](images=[_image(20, 30)], text=[_prompt(1)], boxes=[[[1, 2, 10, 12]]], return_tensors="pt")
    assert out["input_ids"][0].tolist().count(TOKENIZER.image_token_id) == 16
    assert out["pixel_values"].shape == (1, 3, 16, 16)
    assert out["vis_boxes"].shape == (1, 1, 4) and out["vis_boxes"].dtype == torch.float32
    assert "vis_masks" not in out and "vis_mask_valid" not in out


@pytest.mark.parametrize(
    "mode, size, box, expected",
    [
        ("pad", (32, 64), [8, 4, 40, 20], [0.125, 0.3125, 0.625, 0.5625]),  # 16 px of padding above and below
        ("resize", (40, 80), [20, 10, 60, 30], [0.25, 0.25, 0.75, 0.75]),
        ("center_crop", (40, 80), [30, 10, 50, 30], [0.25, 0.25, 0.75, 0.75]),  # resized to 16x32, 8 px cut left
        ("center_crop", (80, 40), [10, 30, 30, 50], [0.25, 0.25, 0.75, 0.75]),
    ],
)
def test_normalized_boxes_equal_hand_computed_values(mode, size, box, expected):
    out = PROCESSORS[mode](images=[_image(*size)], text=[_prompt(1)], boxes=[[box]], return_tensors="pt")
    torch.testing.assert_close(out["vis_boxes"][0, 0], torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "mode, expected_frame_box", [("pad", [2, 5, 10, 9]), ("resize", [2, 2, 10, 10]), ("center_crop", [4, 2, 12, 10])]
)
def test_boxes_land_on_the_pixels_the_vision_tower_sees(mode, expected_frame_box):
    # A white block on black, resized with NEAREST, must occupy exactly the frame cells its normalized box names.
    box = [24, 4, 40, 20] if mode == "center_crop" else [8, 4, 40, 20]
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[box[1] : box[3], box[0] : box[2]] = 255
    image = Image.fromarray(array)
    out = PROCESSORS[mode](images=[image], text=[_prompt(1)], boxes=[[box]], resample=0, return_tensors="pt")
    rows, cols = (out["pixel_values"][0, 0] > 1.0).nonzero().unbind(1)
    observed = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
    assert observed == expected_frame_box
    assert (out["vis_boxes"][0, 0] * 16).tolist() == expected_frame_box


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("shape", sorted(SIZES))
def test_pixel_to_model_to_pixel_round_trip_within_half_a_pixel(mode, shape):
    processor, (height, width) = PROCESSORS[mode], SIZES[shape]
    left, top, right, bottom = _visible_region(processor, height, width)
    rng = np.random.default_rng(0)
    corners = rng.uniform([left, top, left, top], [right, bottom, right, bottom], size=(6, 4))
    low, high = np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:]) + 1
    boxes = np.concatenate([low, high], 1)
    boxes = np.minimum(boxes, [right, bottom, right, bottom])
    boxes[:, :2] = np.minimum(boxes[:, :2], boxes[:, 2:] - 0.5)
    out = processor(images=[_image(height, width)], text=[_prompt(6)], boxes=[boxes.tolist()], return_tensors="pt")
    generation = _generation(out["input_ids"], [out["vis_boxes"][0]], [torch.ones(6)])
    result = processor.post_process_generation(generation, image_sizes=[(height, width)])[0]
    assert (result["boxes"] - torch.from_numpy(boxes).float()).abs().max().item() < 0.5


def test_masks_are_resampled_to_the_frame_and_give_missing_boxes():
    processor = PROCESSORS["pad"]
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 0:16] = True
    image, boxes, masks = _image(32, 32), [[None, [0, 0, 8, 8]]], [[mask, None]]
    out = processor(images=[image], text=[_prompt(2)], boxes=boxes, masks=masks, return_tensors="pt")
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 0:4] = True
    assert torch.equal(out["vis_masks"][0, 0], expected)
    assert out["vis_masks"].shape == (1, 2, 8, 8) and out["vis_masks"].dtype == torch.bool
    assert out["vis_mask_valid"].tolist() == [[True, False]]
    torch.testing.assert_close(out["vis_boxes"][0], torch.tensor([[0.0, 0.25, 0.5, 0.75], [0.0, 0.0, 0.25, 0.25]]))


def test_post_process_generation_gives_exact_pixel_results():
    processor = PROCESSORS["pad"]
    generated = TOKENIZER("It is <vis> and <vis>.</s>", add_special_tokens=False)["input_ids"]
    prompt = [1, 60, 61]
    row = torch.tensor(prompt + generated + [0, 0])
    sequences = torch.stack([row] * 4)  # 2 samples x num_return_sequences=2
    frame_boxes = torch.tensor([[0.125, 0.3125, 0.625, 0.5625], [0.0, 0.0, 1.0, 1.0]])
    mask_logits = torch.full((2, 8, 8), -5.0)
    mask_logits[:, :, :4] = 5.0  # left half of the frame
    generation = _generation(
        sequences,
        pred_boxes=[frame_boxes, frame_boxes, torch.tensor([[0.25, 0.5, 0.75, 1.0]]), torch.zeros(0, 4)],
        vis_scores=[torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.5]), torch.tensor([0.7]), torch.zeros(0)],
        pred_masks=[mask_logits, mask_logits, mask_logits[:1], None],
        scores=tuple(range(len(generated) + 2)),  # one per generated step -> the prompt length is derivable
    )
    results = processor.post_process_generation(
        generation, image_sizes=[(32, 64), (16, 16)], vis_marker="[obj{index}]"
    )
    assert [result["text"] for result in results] == ["It is [obj1] and [obj2]."] * 4
    assert results[0]["boxes"].tolist() == [[8.0, 4.0, 40.0, 20.0], [0.0, 0.0, 64.0, 32.0]]  # padding clipped away
    assert results[1]["boxes"].tolist() == results[0]["boxes"].tolist()
    assert results[2]["boxes"].tolist() == [[4.0, 8.0, 12.0, 16.0]]
    assert results[3]["boxes"].shape == (0, 4) and results[3]["masks"] is None
    torch.testing.assert_close(results[0]["scores"], torch.tensor([0.9, 0.6]))
    expected_mask = torch.zeros(32, 64, dtype=torch.bool)
    expected_mask[:, :32] = True
    assert results[0]["masks"].shape == (2, 32, 64) and torch.equal(results[0]["masks"][1], expected_mask)
    assert results[2]["masks"][0].sum() == 16 * 8 and results[2]["masks"][0][:, :8].all()
    plain = processor.post_process_generation(generation, image_sizes=[(32, 64), (16, 16)], prompt_length=3)
    assert plain[0]["text"] == "It is <vis> and <vis>."
    generation.scores = None  # nothing to derive the prompt length from: the whole row is decoded
    whole = processor.post_process_generation(generation, image_sizes=[(32, 64), (16, 16)])
    assert whole[0]["text"] == TOKENIZER.decode(prompt[1:]) + "It is <vis> and <vis>."


def test_post_process_masks_are_false_where_the_crop_cut():
    processor = PROCESSORS["center_crop"]  # a 16x32 image is cropped to its middle 16 columns
    full_frame = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    generation = _generation(torch.tensor([[1, 5]]), [full_frame], [torch.ones(1)], [torch.full((1, 8, 8), 5.0)])
    result = processor.post_process_generation(generation, image_sizes=[(16, 32)], prompt_length=1)[0]
    assert result["boxes"].tolist() == [[8.0, 0.0, 24.0, 16.0]]
    assert result["masks"][0].sum().item() == 16 * 16 and result["masks"][0][:, 8:24].all()


def test_post_process_generation_rejects_bad_arguments():
    processor = PROCESSORS["pad"]
    generation = _generation(torch.ones(3, 4, dtype=torch.long), [torch.zeros(0, 4)] * 3, [torch.zeros(0)] * 3)
    with pytest.raises(ValueError, match="one \\(H, W\\) per sample, dividing 3 rows, got 2"):
        processor.post_process_generation(generation, image_sizes=[(8, 8), (8, 8)])
    with pytest.raises(TypeError, match="`image_sizes` must be a list of \\(H, W\\) pairs"):
        processor.post_process_generation(generation, image_sizes=(8, 8))
    with pytest.raises(TypeError, match="return_dict_in_generate=True"):
        processor.post_process_generation(torch.ones(1, 4, dtype=torch.long), image_sizes=[(8, 8)])


def test_post_process_image_text_to_text_keeps_working():
    ids = TOKENIZER("USER: hi ASSISTANT: a <vis></s>")["input_ids"]
    assert PROCESSORS["pad"].post_process_image_text_to_text(ids) == "USER: hi ASSISTANT: a"  # `<vis>` took " "


def test_multi_turn_chat_passes_earlier_assistant_vis_like_a_prompt_region():
    processor = PROCESSORS["resize"]
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Find it."}, {"type": "image", "image": _image(40, 80)}],
        },
        {"role": "assistant", "content": "<vis>"},
        {"role": "user", "content": [{"type": "text", "text": "What is left of <vis>?"}]},
    ]
    out = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"boxes": [[[20, 10, 60, 30], [0, 0, 40, 40]]]},
    )
    torch.testing.assert_close(out["vis_boxes"], torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 1.0]]]))
    assert TOKENIZER.decode(out["input_ids"][0][-11:]) == " ASSISTANT:"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"boxes": [[[0, 0, 4, 4], [1, 1, 2, 2]]]}, ValueError, "`boxes\\[0\\]` has 2 entries but its text has 1"),
        ({"boxes": [[[0, 0, float("nan"), 4]]]}, ValueError, "`boxes\\[0\\]\\[0\\]` must be finite"),
        ({"boxes": [[[5, 0, 5, 4]]]}, ValueError, "must have x2 > x1 and y2 > y1"),
        ({"boxes": [[[40, 0, 50, 4]]]}, ValueError, "lies entirely outside the 32x16"),
        ({"boxes": [[["a", 0, 1, 2]]]}, TypeError, "must be 4 numbers"),
        ({"boxes": [[[0, 0, 1]]]}, ValueError, "must be 4 numbers .* got shape \\(3,\\)"),
        ({"masks": [[np.ones((8, 8), bool)]]}, ValueError, "size \\(H, W\\) = \\(16, 32\\), got shape \\(8, 8\\)"),
        ({"masks": [[np.zeros((16, 32), bool)]]}, ValueError, "`masks\\[0\\]\\[0\\]` is empty and `boxes"),
        ({"boxes": [[[0, 0, 4, 4]], [[0, 0, 4, 4]]]}, ValueError, "one entry per text \\(1\\), got 2"),
    ],
)
def test_invalid_regions_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        PROCESSORS["pad"](images=[_image(16, 32)], text=[_prompt(1)], return_tensors="pt", **kwargs)


@pytest.mark.parametrize(
    "boxes, masks",
    [
        (None, None),
        ([None], None),
        ([[None, [0, 0, 4, 4]]], None),
        ([[None, None]], [[None, np.ones((16, 32), bool)]]),
    ],
    ids=["no-boxes", "sample-none", "slot-none", "slot-without-box-or-mask"],
)
def test_a_prompt_vis_without_its_region_raises_with_both_counts(boxes, masks):
    with pytest.raises(ValueError, match=r"`text\[0\]` has 2 `<vis>` tokens but (0|1) regions \(none for slots \[0"):
        PROCESSORS["pad"](images=[_image(16, 32)], text=[_prompt(2)], boxes=boxes, masks=masks, return_tensors="pt")


def test_a_nan_box_says_no_region_and_needs_no_image():
    out = PROCESSORS["pad"](images=[_image(16, 32)], text=[_prompt(2)], boxes=[[NO_REGION, [0, 0, 16, 16]]])
    assert np.isnan(out["vis_boxes"][0, 0]).all() and np.isfinite(out["vis_boxes"][0, 1]).all()
    text_only = PROCESSORS["pad"](text=["USER: <vis> ASSISTANT:"], boxes=[[NO_REGION]], return_tensors="pt")
    assert text_only["vis_boxes"].isnan().all() and "pixel_values" not in text_only
    with pytest.raises(ValueError, match=r"`boxes\[0\]\[0\]` must be finite"):  # half NaN is a broken box
        PROCESSORS["pad"](images=[_image(16, 32)], text=[_prompt(1)], boxes=[[[float("nan")] * 2 + [4, 4]]])


def test_invalid_texts_and_images_raise_clear_errors():
    processor = PROCESSORS["pad"]
    with pytest.raises(ValueError, match="`text\\[1\\]` must be non-empty"):
        processor(images=[_image(8, 8)] * 2, text=[_prompt(0), "  "])
    with pytest.raises(ValueError, match="need exactly one image in `text\\[0\\]`, got 0"):
        processor(text=["<vis>"], boxes=[[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="PIL mode 'F'"):
        processor(images=[Image.new("F", (4, 4))], text=[_prompt(0)])
    with pytest.raises(TypeError, match="must be a PIL image, a numpy array or a torch tensor, got str"):
        processor(images=["cat.png"], text=[_prompt(0)])
    with pytest.raises(ValueError, match="`masks` need the processor's `mask_size`"):
        without_mask_size = PerceptionGPTProcessor(processor.image_processor, TOKENIZER, patch_size=4)
        without_mask_size(images=[_image(4, 4)], text=[_prompt(1)], masks=[[None]])


def test_boxes_partly_outside_are_clipped_with_a_warning():
    inputs = {"images": [_image(40, 80)], "text": [_prompt(1)], "return_tensors": "pt"}
    with pytest.warns(UserWarning, match="partly cropped away"):
        out = PROCESSORS["center_crop"](boxes=[[[0, 10, 40, 30]]], **inputs)
    torch.testing.assert_close(out["vis_boxes"][0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    with pytest.warns(UserWarning, match="extends past the 80x40 image"):
        out = PROCESSORS["resize"](boxes=[[[-20, 10, 40, 50]]], **inputs)
    torch.testing.assert_close(out["vis_boxes"][0, 0], torch.tensor([0.0, 0.25, 0.5, 1.0]))
    with pytest.raises(ValueError, match="outside the part of the image the vision tower sees \\(center_crop mode\\)"):
        PROCESSORS["center_crop"](images=[_image(40, 80)], text=[_prompt(1)], boxes=[[[0, 0, 15, 40]]])


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (20, 10), 255),
        Image.new("LA", (20, 10), (255, 3)),
        Image.new("RGBA", (20, 10), (255, 255, 255, 0)),
        Image.new("P", (20, 10), 0).convert("P"),
        Image.new("1", (20, 10), 1),
        Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16)),  # 16-bit "I;16"
        Image.fromarray(np.full((10, 20), 65535, dtype=np.int32)),  # 32-bit "I" holding 16-bit data
        np.full((10, 20, 3), 65535, dtype=np.uint16),
        np.ones((10, 20), dtype=np.float32),
        torch.full((3, 10, 20), 255, dtype=torch.uint8),
    ],
    ids=["L", "LA", "RGBA", "P", "1", "I;16", "I", "uint16", "float", "torch"],
)
def test_image_modes_are_converted_to_rgb(image):
    processor = PROCESSORS["resize"]
    out = processor(images=[image], text=[_prompt(1)], boxes=[[[0, 0, 10, 5]]], return_tensors="pt")
    white = processor(images=[_image(10, 20, 255)], text=[_prompt(1)], boxes=[[NO_REGION]], return_tensors="pt")
    white = white["pixel_values"]
    expected = white if not isinstance(image, Image.Image) or image.mode not in ("P",) else out["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected)
    torch.testing.assert_close(out["vis_boxes"][0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))


@pytest.mark.parametrize("size", [(1, 1), (4000, 6000)])
def test_tiny_and_huge_images_work(size):
    height, width = size
    image = _image(height, width)
    out = PROCESSORS["pad"](images=[image], text=[_prompt(1)], boxes=[[[0, 0, width, height]]], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 16, 16)
    aspect = height / width
    expected = [0.0, 0.0, 1.0, 1.0] if height == width else [0.0, (1 - aspect) / 2, 1.0, (1 + aspect) / 2]
    torch.testing.assert_close(out["vis_boxes"][0, 0], torch.tensor(expected))


def test_save_load_round_trip(tmp_path):
    processor = PROCESSORS["center_crop"]
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["mask_size"] == 8 and config["vis_token"] == "<vis>"
    assert config["auto_map"] == {"AutoProcessor": "processing_perceptiongpt.PerceptionGPTProcessor"}
    assert {"processing_perceptiongpt.py", "region_geometry.py", "templates.py"} <= set(os.listdir(tmp_path))
    loaded = PerceptionGPTProcessor.from_pretrained(tmp_path)
    assert (loaded.mask_size, loaded.vis_token_id, loaded.resize_mode) == (8, 5, "center_crop")
    assert loaded.chat_template == processor.chat_template
    inputs = {"images": [_image(30, 50, 90)], "text": [_prompt(2)], "boxes": [[[12, 5, 36, 25], NO_REGION]]}
    expected, actual = processor(**inputs, return_tensors="pt"), loaded(**inputs, return_tensors="pt")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], equal_nan=True)


_REMOTE_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    """
    import json, sys
    try:
        import perceptiongpt  # noqa: F401
        sys.exit("perceptiongpt must not be importable here")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    inputs = processor(images=[Image.new("RGB", (64, 32))], text=["USER: <image>\\n<vis> ASSISTANT:"],
                       boxes=[[[8, 4, 40, 20]]], return_tensors="pt")
    generation = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    prompt_length = inputs["input_ids"].shape[1]
    result = processor.post_process_generation(generation, image_sizes=[(32, 64)], prompt_length=prompt_length)[0]
    print(json.dumps({"module": type(processor).__module__, "class": type(processor).__name__,
                      "input_ids": inputs["input_ids"][0].tolist(), "vis_boxes": inputs["vis_boxes"][0].tolist(),
                      "sequence": generation.sequences[0].tolist(), "boxes": result["boxes"].tolist(),
                      "text": result["text"]}))
    """
)


def test_model_folder_loads_as_remote_code_without_the_package(tmp_path):
    # The processor files are copied flat next to the modeling files: one folder serves both Auto classes.
    from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration

    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # make `<vis>` likely so that boxes come out
        model.lm_head.weight[TOKENIZER.vis_token_id] = model.model.language_model.norm.weight * 3
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    PROCESSORS["pad"].save_pretrained(folder)
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    command = [sys.executable, "-c", _REMOTE_SCRIPT, str(folder)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert completed.returncode == 0, completed.stderr[-2000:]
    remote = json.loads(completed.stdout.strip().splitlines()[-1])
    assert remote["class"] == "PerceptionGPTProcessor" and remote["module"].startswith("transformers_modules")
    image, text = _image(32, 64), ["USER: <image>\n<vis> ASSISTANT:"]
    inputs = PROCESSORS["pad"](images=[image], text=text, boxes=[[[8, 4, 40, 20]]], return_tensors="pt")
    assert remote["input_ids"] == inputs["input_ids"][0].tolist()
    assert remote["vis_boxes"] == [[0.125, 0.3125, 0.625, 0.5625]]
    generation = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    prompt_length = inputs["input_ids"].shape[1]
    local = PROCESSORS["pad"].post_process_generation(generation, [(32, 64)], prompt_length=prompt_length)
    assert remote["sequence"] == generation.sequences[0].tolist() and remote["text"] == local[0]["text"]
    assert len(remote["boxes"]) == len(local[0]["boxes"]) > 0
    torch.testing.assert_close(torch.tensor(remote["boxes"]), local[0]["boxes"], **CROSS_PROCESS_TOLERANCE)


_FUZZ_PIECES = st.lists(st.sampled_from([" ", "a", "9", ",", "é", "<", "vis>", "<image", "</s>", "\n"]), max_size=4)
_FUZZ_NUMBER = st.one_of(
    st.floats(-8, 24), st.integers(-8, 24), st.sampled_from([float("nan"), float("inf"), -float("inf"), "x", None])
)


@st.composite
def _fuzz_sample(draw):
    """One sample: mostly well-formed (one image, a region per `<vis>`), with every field sometimes corrupted."""
    height, width, n_vis = draw(st.integers(1, 16)), draw(st.integers(1, 16)), draw(st.integers(0, 3))
    n_images = draw(st.sampled_from([1] * 8 + [0, 2]))
    text = "<image>" * n_images + "".join(draw(_FUZZ_PIECES)) + " <vis>" * n_vis
    n_regions = n_vis + draw(st.sampled_from([0] * 8 + [1, -1]))

    def box():
        x1, y1 = draw(st.floats(-4, width + 2)), draw(st.floats(-4, height + 2))
        valid = [x1, y1, x1 + draw(st.floats(0.01, width)), y1 + draw(st.floats(0.01, height))]
        if draw(st.integers(0, 15)) == 0:  # garbage: wrong length, NaN, inf, strings, None
            return draw(st.lists(_FUZZ_NUMBER, min_size=3, max_size=5))
        return draw(st.sampled_from([valid, valid, valid, None]))

    def mask():
        shape = (height, width) if draw(st.integers(0, 7)) else (draw(st.integers(1, 16)), draw(st.integers(1, 16)))
        seed = draw(st.integers(0, 9))
        return None if draw(st.integers(0, 2)) == 0 else np.random.default_rng(seed).random(shape) > 0.5

    boxes = None if draw(st.integers(0, 4)) == 0 or n_regions < 0 else [box() for _ in range(n_regions)]
    masks = [mask() for _ in range(n_regions)] if draw(st.integers(0, 2)) == 0 and n_regions >= 0 else None
    return height, width, text, n_images, boxes, masks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mode=st.sampled_from(RESIZE_MODES), samples=st.lists(_fuzz_sample(), min_size=1, max_size=2))
def test_fuzz_processor_returns_valid_tensors_or_raises_value_or_type_error(mode, samples):
    texts = [text for _, _, text, _, _, _ in samples]
    images = [_image(height, width, 40) for height, width, _, n_images, _, _ in samples for _ in range(n_images)]
    boxes = [sample_boxes for *_, sample_boxes, _ in samples]
    masks = [sample_masks for *_, sample_masks in samples]
    any_masks = any(sample is not None for sample in masks)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = PROCESSORS[mode](
                images=images or None, text=texts, boxes=boxes, masks=masks if any_masks else None, return_tensors="pt"
            )
    except (ValueError, TypeError):
        return
    batch, slots = len(texts), max(text.count("<vis>") for text in texts)
    assert out["input_ids"].shape[0] == batch and out["input_ids"].dtype == torch.long
    assert out["vis_boxes"].shape == (batch, slots, 4) and out["vis_boxes"].dtype == torch.float32
    present = ~out["vis_boxes"].isnan().any(-1)
    assert torch.equal(present, ~out["vis_boxes"].isnan().all(-1))
    kept = out["vis_boxes"][present]
    assert ((kept >= 0) & (kept <= 1)).all() and (kept[:, 2] > kept[:, 0]).all() and (kept[:, 3] > kept[:, 1]).all()
    if images:
        assert out["pixel_values"].shape == (len(images), 3, 16, 16) and torch.isfinite(out["pixel_values"]).all()
    if any_masks:
        assert out["vis_masks"].shape == (batch, slots, 8, 8) and out["vis_masks"].dtype == torch.bool
        assert out["vis_mask_valid"].shape == (batch, slots)


def test_tiny_model_generation_post_processes_to_pixel_space():
    from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration

    config = PerceptionGPTConfig.from_preset("tiny")
    processor = build_processor(16, 4, config.mask_head_config.mask_size, TOKENIZER)
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(config).eval()
    with torch.no_grad():  # make `<vis>` likely so that boxes come out
        model.lm_head.weight[TOKENIZER.vis_token_id] = model.model.language_model.norm.weight * 3
    images, texts, boxes = [_image(20, 40)] * 2, [_prompt(1), _prompt(0)], [[[0, 0, 10, 10]], []]
    inputs = processor(images=images, text=texts, boxes=boxes, return_tensors="pt")
    generation = model.generate(
        **inputs, max_new_tokens=6, do_sample=True, top_k=5, num_return_sequences=2, return_dict_in_generate=True
    )
    prompt_length = inputs["input_ids"].shape[1]
    results = processor.post_process_generation(generation, image_sizes=[(20, 40)] * 2, prompt_length=prompt_length)
    assert len(results) == 4
    for row, result in enumerate(results):
        n_vis = generation.sequences[row, prompt_length:].tolist().count(TOKENIZER.vis_token_id)
        assert result["boxes"].shape == (n_vis, 4) and result["scores"].shape == (n_vis,)
        assert result["text"].count("<vis>") == n_vis
        assert ((result["boxes"] >= 0) & (result["boxes"] <= torch.tensor([40, 20, 40, 20]))).all()
        assert result["masks"].shape == (n_vis, 20, 40) and result["masks"].dtype == torch.bool
    assert sum(len(result["boxes"]) for result in results) > 0

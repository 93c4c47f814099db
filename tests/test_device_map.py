"""Loading as 7B users do: `device_map` placement keeps every head whole, and an offloaded model generates the same."""

import torch
from accelerate import infer_auto_device_map
from conftest import make_batch

from perceptiongpt import PerceptionGPTForConditionalGeneration


HEADS = ("box_encoder", "mask_encoder", "mask_feature_fusion", "box_decoder", "mask_decoder")


def test_a_memory_split_keeps_heads_whole_and_generates_the_same(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    # what `device_map="auto"` computes, with a budget that forces most of the model out of the first device
    device_map = infer_auto_device_map(
        tiny_model,
        max_memory={"cpu": 300_000, "disk": 10**9},  # without `_no_split_modules` this splits the mask decoder
        no_split_module_classes=sorted(tiny_model._no_split_modules),
    )
    assert set(device_map.values()) == {"cpu", "disk"}
    for name in device_map:  # a head is placed as one unit, never its sub-layers on different devices
        assert not any(name.startswith(head + ".") for head in HEADS), name
    split = PerceptionGPTForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert split.hf_device_map == dict(device_map)
    ids, pixels = make_batch(vis_at=((20,), (20, 25)))
    inputs = {"input_ids": ids[:, :22], "pixel_values": pixels, "vis_boxes": torch.full((2, 1, 4), float("nan"))}
    expected = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    found = split.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(found.sequences, expected.sequences) and sum(len(b) for b in found.pred_boxes) >= 2
    for a, b in zip(found.pred_boxes, expected.pred_boxes):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

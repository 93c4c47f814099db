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


def test_an_offloaded_model_pools_prompt_regions_as_the_whole_one(tmp_path):
    """accelerate's hooks rebuild the image outputs without `mask_features`: pooling must still read the image."""
    from perceptiongpt import PerceptionGPTConfig

    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny", pool_region_features=True))
    with torch.no_grad():
        model.region_feature_pooling.proj.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "model")
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": 300_000, "disk": 10**9}, no_split_module_classes=sorted(model._no_split_modules)
    )
    split = PerceptionGPTForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    ids, pixels = make_batch(vis_at=((20,), (20,)))
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.5, 1.0, 1.0]]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, pixel_values=pixels, vis_boxes=boxes).logits
        found = split(input_ids=ids, pixel_values=pixels, vis_boxes=boxes).logits
        model.region_feature_pooling.proj.weight.zero_()
        unpooled = model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes).logits
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert (expected[:, 20:] - unpooled[:, 20:]).abs().max() > 1e-3

"""`pool_region_features`: a prompt region's `<vis>` embedding also gets its image's patches under the region."""

import pytest
import torch
from conftest import IMAGE, VIS, make_batch

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.box_decoders_perceptiongpt import sample_box_layout
from perceptiongpt.heads_perceptiongpt import RegionFeaturePooling


NAN = float("nan")


@pytest.fixture(params=[0, 2], ids=["mean", "layout2"])
def pooled_model(request):
    torch.manual_seed(0)
    config = PerceptionGPTConfig.from_preset("tiny", pool_region_features=True, region_feature_layout=request.param)
    model = PerceptionGPTForConditionalGeneration(config)
    with torch.no_grad():  # `<vis>` likely enough to be generated, and a pooled feature that moves the logits
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
        model.region_feature_pooling.proj.weight.normal_(0, 1.0)
    return model.eval()


def _region_prompt(pixels_seed=0):
    """Two rows: a box prompt `<vis>` at 20 after a 16-patch image (2..17)."""
    ids, pixels = make_batch(2, 24, vis_at=((20,), (20,)), seed=pixels_seed)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.5, 1.0, 1.0]]])
    return ids, pixels, boxes


def test_region_weights_by_hand():
    pooling = RegionFeaturePooling(vision_hidden_size=8, text_hidden_size=4, grid=2)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 2:, 2:] = True  # the bottom-right patch
    mask[0, 0, 0] = True  # a quarter of the top-left patch's 2x2 pixels
    # row 1 is a mask prompt (its box slot is NaN): the mask, not the box, gives its weights
    weights = pooling.region_weights(
        torch.cat([boxes, torch.full((1, 4), NAN)]), mask, torch.tensor([False, False, True])
    )
    assert torch.equal(weights, torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25, 0, 0, 1.0]]))
    # the pooled feature is the coverage-weighted mean of the patches
    features = torch.arange(4.0)[None, :, None].expand(1, 4, 8)  # patch i has value i in every channel
    with torch.no_grad():
        pooling.norm.weight.fill_(1.0), pooling.norm.bias.fill_(0.0)
    mean = (0.25 * 0 + 1.0 * 3) / 1.25
    pooled = pooling.norm(torch.full((1, 8), mean))
    assert torch.allclose(pooling(features, torch.tensor([[0.25, 0, 0, 1.0]])), pooling.proj(pooled))


def test_region_layout_by_hand():
    """`region_feature_layout`: the patch map read bilinearly at the centres of the box's L x L cells (the border
    patches beyond the outer centres), and a mask's layout box is its bounding box."""
    pooling = RegionFeaturePooling(vision_hidden_size=8, text_hidden_size=4, grid=2, layout=2)
    features = torch.arange(4.0)[None, :, None].expand(2, 4, 8)  # patch (row y, column x) has value 2y + x
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    samples = sample_box_layout(features, boxes, layout=2)[..., 0]  # (2, 4): cells row-major
    # the whole image: the 4 patch centres; the top-left quarter: x, y at 0.125 (clamped to the first patch) and 0.375
    # (a quarter of the way to the next patch centre)
    torch.testing.assert_close(samples, torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.25, 0.5, 0.75]]))
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 2:4] = True  # rows 1-2, columns 2-3; mask 1 is empty
    layout_boxes = pooling.region_boxes(
        torch.tensor([[0.1, 0.2, 0.3, 0.4], [NAN] * 4, [NAN] * 4]), masks, torch.tensor([False, True, True])
    )
    torch.testing.assert_close(
        layout_boxes, torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 1.0, 0.75], [0, 0, 1, 1.0]])
    )
    with pytest.raises(ValueError, match=r"`region_feature_layout` must be >= 0, got -1"):
        PerceptionGPTConfig.from_preset("tiny", pool_region_features=True, region_feature_layout=-1)


def test_region_layout_keeps_what_the_mean_drops():
    """The same patches in another arrangement under the same box: the mean cannot tell them apart, the layout can."""
    torch.manual_seed(0)
    patches = torch.randn(1, 4, 8)
    swapped = patches[:, [3, 2, 1, 0]]  # e.g. a triangle upside down: the same content, elsewhere in the box
    box, weights = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.ones(1, 4)
    mean, layout = (RegionFeaturePooling(8, 4, grid=2, layout=n) for n in (0, 2))
    with torch.no_grad():
        assert torch.allclose(mean(patches, weights), mean(swapped, weights), atol=1e-6)
        assert (layout(patches, weights, box) - layout(swapped, weights, box)).abs().max() > 1e-2


def test_prompt_region_reads_the_image_under_it(pooled_model):
    """Same box, different image content -> different logits; off, the image never enters the `<vis>` embedding."""
    ids, pixels, boxes = _region_prompt()
    other = pixels.clone()
    other[:, :, :8, :8] += 3.0  # only the top-left quarter, which row 0's box covers
    with torch.no_grad():
        a = pooled_model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes).logits[:, 20]
        b = pooled_model(input_ids=ids, pixel_values=other, vis_boxes=boxes).logits[:, 20]
        embeds = pooled_model.get_input_embeddings()(ids)
        features = pooled_model.encode_images(pixels).mask_features
        pooled = pooled_model.embed_regions(ids, embeds, boxes, None, None, None, features)
        plain = pooled_model.embed_regions(ids, embeds, boxes, None, None, None, None)
    assert (a[0] - b[0]).abs().max() > 1e-3
    # by hand: the box encoder's embedding plus the pooled patches under the box
    pooling = pooled_model.region_feature_pooling
    layout_boxes = pooling.region_boxes(boxes[:, 0]) if pooling.layout else None
    expected = plain[:, 20] + pooling(features, pooling.region_weights(boxes[:, 0]), layout_boxes)
    assert torch.allclose(pooled[:, 20], expected, atol=1e-6)
    assert torch.equal(pooled[:, :20], plain[:, :20])


def test_answer_vis_are_never_pooled(pooled_model):
    """A supervised `<vis>` (labels) or one marked `vis_is_answer` takes its box only, as generate() feeds it back."""
    ids, pixels, boxes = _region_prompt()
    labels = torch.full_like(ids, -100)
    labels[:, 20] = VIS
    with torch.no_grad():
        embeds = pooled_model.get_input_embeddings()(ids)
        features = pooled_model.encode_images(pixels).mask_features
        plain = pooled_model.embed_regions(ids, embeds, boxes, None, None, None, None)
        answer = pooled_model.embed_regions(ids, embeds, boxes, None, None, labels == VIS, features)
        by_labels = pooled_model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes, labels=labels).logits
        by_flag = pooled_model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes, vis_is_answer=labels == VIS)
    assert torch.equal(answer, plain)
    assert torch.allclose(by_labels, by_flag.logits, atol=1e-6)
    with pytest.raises(ValueError, match=r"`vis_is_answer` must be \(B, T\) like `input_ids` \(2, 24\), got \(2, 3\)"):
        pooled_model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes, vis_is_answer=labels[:, :3] == VIS)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_cache_equals_no_cache_and_teacher_forcing(pooled_model, kwargs):
    """Generated `<vis>` are answers: the no-cache path (whole sequence, image present at every step) must not pool
    them, so it equals the cached path, and both equal a teacher-forced pass that marks them `vis_is_answer`."""
    ids, pixels, boxes = _region_prompt()
    inputs = dict(input_ids=ids, pixel_values=pixels, vis_boxes=boxes, max_new_tokens=6, do_sample=False)
    cached = pooled_model.generate(**inputs, **kwargs, return_dict_in_generate=True)
    no_cache = pooled_model.generate(**inputs, **kwargs, use_cache=False, return_dict_in_generate=True)
    assert sum(len(b) for b in cached.pred_boxes) >= 2
    assert torch.equal(cached.sequences, no_cache.sequences)
    for a, b in zip(cached.pred_boxes, no_cache.pred_boxes):
        assert torch.allclose(a, b, atol=1e-6)
    seqs = cached.sequences
    n = seqs.shape[0] // ids.shape[0]
    vis_boxes = torch.full((seqs.shape[0], 1 + max(len(b) for b in cached.pred_boxes), 4), NAN)
    for r, generated in enumerate(cached.pred_boxes):
        vis_boxes[r, 0], vis_boxes[r, 1 : 1 + len(generated)] = boxes[r // n, 0], generated
    answer = (seqs == VIS) & (torch.arange(seqs.shape[1]) >= ids.shape[1])
    with torch.no_grad():
        tf = pooled_model(
            input_ids=seqs,
            pixel_values=pixels.repeat_interleave(n, 0),
            vis_boxes=vis_boxes,
            vis_is_answer=answer,
        )
    for r in range(seqs.shape[0]):
        for j, p in enumerate(cached.vis_positions[r].tolist()):
            features = tf.image_outputs.mask_features[r : r + 1]
            hidden = tf.last_hidden_state[r, p - 1][None]
            box, _ = pooled_model.decode_regions(hidden, features, torch.ones(1, dtype=torch.bool), None, None)
            assert torch.allclose(box.boxes[0], cached.pred_boxes[r][j], atol=1e-5)
    assert (ids[:, 2:18] == IMAGE).all()


def test_from_llava_and_lora_train_the_pooling():
    """A converted model initializes the new projection (the loaded tensors stay), and the LoRA recipe trains it."""
    from peft import get_peft_model
    from test_from_llava import _tiny_llava

    from perceptiongpt import from_llava
    from perceptiongpt.trainer import lora_config

    llava = _tiny_llava()
    model = from_llava(llava, pool_region_features=True)
    weight = model.region_feature_pooling.proj.weight
    assert weight.abs().sum() > 0 and torch.equal(model.region_feature_pooling.norm.weight, torch.ones(32))
    assert "region_feature_pooling" in lora_config(model).modules_to_save
    assert "region_feature_pooling" not in lora_config(from_llava(_tiny_llava())).modules_to_save
    peft_model = get_peft_model(model, lora_config(model))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("region_feature_pooling" in n and "modules_to_save" in n for n in trainable)


def test_qwen2_5_vl_pools_the_region_of_its_own_image():
    """Qwen2.5-VL (images of different grids in one batch): each row's region pools its own image, and generation
    with beams equals the no-cache path."""
    from test_qwen2_5_vl import VIS as QWEN_VIS
    from test_qwen2_5_vl import qwen_rows

    from perceptiongpt import PerceptionGPTQwen2_5_VLConfig, PerceptionGPTQwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = PerceptionGPTQwen2_5_VLConfig.from_preset("tiny", pool_region_features=True)
    model = PerceptionGPTQwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[QWEN_VIS] = model.model.language_model.norm.weight * 3
        model.region_feature_pooling.proj.weight.normal_(0, 1.0)
    inputs, boxes = qwen_rows(vis_at=((20,), (18,)))
    boxes[1, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        base = model(**inputs, vis_boxes=boxes).logits
        changed = dict(inputs, pixel_values=inputs["pixel_values"].clone())
        changed["pixel_values"][24:] += 3.0  # row 1's image only (row 0's grid holds 24 patches)
        other = model(**changed, vis_boxes=boxes).logits
        proj = model.region_feature_pooling.proj
        proj.weight.zero_(), proj.bias.zero_()
        unpooled = model(**inputs, vis_boxes=boxes).logits
    assert torch.allclose(base[0], other[0], atol=1e-6)  # row 0's region never reads row 1's image
    vis_row1 = int((inputs["input_ids"][1] == QWEN_VIS).nonzero()[0, 0])
    assert torch.allclose(base[1, :vis_row1], unpooled[1, :vis_row1], atol=1e-6)  # before its `<vis>`: no pooling
    assert (base[1, vis_row1] - unpooled[1, vis_row1]).abs().max() > 1e-3
    with torch.no_grad():
        proj.weight.normal_(0, 1.0)
    kwargs = dict(vis_boxes=boxes, max_new_tokens=5, num_beams=2, do_sample=False, return_dict_in_generate=True)
    cached, no_cache = model.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(cached.sequences, no_cache.sequences)
    for a, b in zip(cached.pred_boxes, no_cache.pred_boxes):
        assert torch.allclose(a, b, atol=1e-5)


def test_mask_prompt_pools_by_its_own_mask(pooled_model):
    """A mask prompt (its box slot NaN) pools the patches under the mask (and, with a layout, its bounding box): the
    same mask over other pixels gives other logits; other pixels outside the mask change nothing."""
    ids, pixels, _ = _region_prompt()
    side = pooled_model.config.mask_head_config.mask_size
    masks = torch.zeros(2, 1, side, side, dtype=torch.bool)
    masks[:, 0, : side // 2, : side // 2] = True  # the top-left quarter
    kwargs = dict(input_ids=ids, vis_boxes=torch.full((2, 1, 4), NAN), vis_masks=masks)
    kwargs["vis_mask_valid"] = torch.ones(2, 1, dtype=torch.bool)
    inside, outside = pixels.clone(), pixels.clone()
    inside[:, :, :8, :8] += 3.0
    outside[:, :, 8:, 8:] += 3.0
    with torch.no_grad():
        base, under, elsewhere = (
            pooled_model(pixel_values=p, **kwargs).logits[:, 20] for p in (pixels, inside, outside)
        )
    assert (base - under).abs().max() > 1e-3
    # the ViT mixes patches, so pixels outside the mask move the pooled features a little; the region's own far more
    assert (base - elsewhere).abs().max() < (base - under).abs().max()

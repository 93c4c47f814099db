import copy

import pytest
import torch
from conftest import IMAGE, VIS, make_batch

from perceptiongpt import PerceptionGPTForConditionalGeneration
from perceptiongpt.loading_perceptiongpt import preferred_attn_implementation


NAN = float("nan")


def _targets(ids, answer_start=19):
    labels = ids.clone()
    labels[:, :answer_start] = -100
    return labels


def _boxes():
    boxes = torch.full((2, 2, 4), NAN)
    boxes[0, 0] = torch.tensor([0.1, 0.1, 0.5, 0.5])
    boxes[1, 0] = torch.tensor([0.0, 0.2, 1.0, 0.7])
    boxes[1, 1] = torch.tensor([0.3, 0.3, 0.4, 0.9])
    return boxes


def _masks():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 2, 16, 16, generator=g) > 0.5, torch.tensor([[True, False], [True, True]])


def test_fresh_box_decoder_predicts_centred_box(tiny_config):
    model = PerceptionGPTForConditionalGeneration(tiny_config)
    boxes = model.box_decoder(torch.randn(3, tiny_config.text_config.hidden_size)).boxes
    assert torch.equal(boxes, torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(3, 4))
    assert torch.equal(model.mask_feature_fusion.logits, torch.zeros(len(tiny_config.vision_fusion_layers)))


def test_box_decoder_orders_corners(tiny_model):
    boxes = tiny_model.box_decoder(torch.randn(500, 32) * 10).boxes
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_named_losses_and_finite_gradients(tiny_model):
    # slot 0 of each row is a prompt region (row 0: a mask, row 1: a box), slot 1 the answer target
    ids, pixels = make_batch(vis_at=((20, 24), (20, 25)))
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.2, 0.0, 0.6, 0.4]], [[0.0, 0.2, 1.0, 0.7], [0.3, 0.3, 0.4, 0.9]]])
    masks, _ = _masks()
    valid = torch.tensor([[True, True], [False, True]])
    tiny_model.train()
    out = tiny_model(
        input_ids=ids,
        pixel_values=pixels,
        labels=_targets(ids, answer_start=22),
        vis_boxes=boxes,
        vis_masks=masks,
        vis_mask_valid=valid,
    )
    parts = [out.lm_loss, out.box_l1_loss, out.box_giou_loss, out.mask_dice_loss, out.mask_bce_loss]
    assert all(p.dim() == 0 and torch.isfinite(p) and p > 0 for p in parts)
    assert torch.allclose(out.loss, sum(parts))
    assert out.pred_boxes.shape == (2, 4) and out.pred_masks.shape == (2, 16, 16)
    out.loss.backward()
    no_grad = {n for n, p in tiny_model.named_parameters() if p.grad is None}
    # LLaVA reads ViT hidden states, never the post-layernorm output
    assert no_grad == {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_loss_weights_are_applied(tiny_config):
    tiny_config.box_l1_weight, tiny_config.lm_loss_weight, tiny_config.mask_bce_weight = 5.0, 0.5, 0.0
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(tiny_config)
    ids, pixels = make_batch()
    masks, valid = _masks()
    out = model(
        input_ids=ids,
        pixel_values=pixels,
        labels=_targets(ids),
        vis_boxes=_boxes(),
        vis_masks=masks,
        vis_mask_valid=valid,
    )
    expected = 0.5 * out.lm_loss + 5 * out.box_l1_loss + out.box_giou_loss + out.mask_dice_loss
    assert torch.allclose(out.loss, expected)


def test_global_count_averaging_splits_exactly(tiny_model):
    """loss(batch) == loss(half 1) + loss(half 2) when every part is given the global counts."""
    ids, pixels = make_batch()
    masks, valid = _masks()
    labels = _targets(ids)
    tokens = int((labels[:, 1:] != -100).sum())
    kwargs = dict(num_items_in_batch=tokens, num_vis_in_batch=3, num_masks_in_batch=3)
    full = tiny_model(
        input_ids=ids,
        pixel_values=pixels,
        labels=labels,
        vis_boxes=_boxes(),
        vis_masks=masks,
        vis_mask_valid=valid,
        **kwargs,
    )
    halves = [
        tiny_model(
            input_ids=ids[i : i + 1],
            pixel_values=pixels[i : i + 1],
            labels=labels[i : i + 1],
            vis_boxes=_boxes()[i : i + 1],
            vis_masks=masks[i : i + 1],
            vis_mask_valid=valid[i : i + 1],
            **kwargs,
        )
        for i in range(2)
    ]
    for name in ("loss", "lm_loss", "box_l1_loss", "box_giou_loss", "mask_dice_loss", "mask_bce_loss"):
        assert torch.allclose(getattr(full, name), getattr(halves[0], name) + getattr(halves[1], name), atol=1e-6)
    # and the default local count is the plain mean over targets
    local = tiny_model(input_ids=ids, pixel_values=pixels, labels=labels, vis_boxes=_boxes())
    assert torch.allclose(local.box_l1_loss, full.box_l1_loss, atol=1e-6)


def test_region_embedding_changes_logits_and_modes(tiny_config):
    ids, pixels = make_batch(vis_at=((10 + 10,), (20,)))
    boxes = _boxes()[:, :1]
    for mode in ("replace", "add"):
        tiny_config.region_embedding_mode = mode
        torch.manual_seed(0)
        model = PerceptionGPTForConditionalGeneration(tiny_config).eval()
        plain = model(input_ids=ids, pixel_values=pixels).logits
        region = model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes).logits
        assert torch.equal(plain[:, :20], region[:, :20])  # causal: nothing before the `<vis>` moves
        assert (plain[:, 20:] - region[:, 20:]).abs().amax() > 1e-4
        embeds = model.get_input_embeddings()(ids)
        encoded = model.box_encoder(boxes[:, 0])
        expected = encoded if mode == "replace" else embeds[:, 20] + encoded
        injected = model.embed_regions(ids, embeds, boxes, None, None, None)
        assert torch.allclose(injected[:, 20], expected) and torch.equal(injected[:, :20], embeds[:, :20])


def test_prompt_mask_goes_through_mask_encoder(tiny_model):
    ids, pixels = make_batch(vis_at=((20,), (20,)))
    masks, valid = _masks()
    masks, valid = masks[:, :1], valid[:, :1]
    embeds = tiny_model.get_input_embeddings()(ids)
    injected = tiny_model.embed_regions(ids, embeds, _boxes()[:, :1], masks, valid, None)
    assert torch.allclose(injected[:, 20], tiny_model.mask_encoder(masks[:, 0]))
    # an answer `<vis>` never takes its mask: it gets its box
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 20] = True
    injected = tiny_model.embed_regions(ids, embeds, _boxes()[:, :1], masks, valid, target)
    assert torch.allclose(injected[:, 20], tiny_model.box_encoder(_boxes()[:, 0]))


@pytest.mark.parametrize(
    "boxes, match",
    [
        (torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.3, 0.3]]]), r"row 0 has 2 regions .* only 1 `<vis>`"),
        (torch.tensor([[[0.1, 0.1, 1.5, 0.5]]]), "0 <= x1 <= x2 <= 1"),
        (torch.tensor([[[0.6, 0.1, 0.5, 0.5]]]), "0 <= x1 <= x2 <= 1"),
        (torch.tensor([[[0.1, float("inf"), 0.5, 0.5]]]), "0 <= x1 <= x2 <= 1"),
        (torch.tensor([[[0.1, NAN, 0.5, 0.5]]]), "partly-NaN"),
        (torch.tensor([[0.1, 0.1, 0.5, 0.5]]), r"shape \(B, K, 4\)"),
    ],
)
def test_bad_boxes_raise(tiny_model, boxes, match):
    ids, pixels = make_batch(batch_size=1, vis_at=((20,),))
    with pytest.raises(ValueError, match=match):
        tiny_model(input_ids=ids, pixel_values=pixels, vis_boxes=boxes)


def test_bad_masks_raise(tiny_model):
    ids, pixels = make_batch(batch_size=1, vis_at=((20,),))
    with pytest.raises(ValueError, match=r"\(B, K, 16, 16\)"):
        tiny_model(
            input_ids=ids,
            pixel_values=pixels,
            vis_masks=torch.zeros(1, 1, 8, 8, dtype=torch.bool),
            vis_mask_valid=torch.ones(1, 1, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="vis_mask_valid"):
        tiny_model(input_ids=ids, pixel_values=pixels, vis_masks=torch.zeros(1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="vis_boxes"):
        tiny_model(input_ids=ids, pixel_values=pixels, vis_boxes=[[0.1, 0.1, 0.2, 0.2]])


def test_degenerate_predictions_are_fine(tiny_model):
    ids, pixels = make_batch(batch_size=1, vis_at=((20,),))
    labels = _targets(ids)
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])  # a point: valid input, finite loss
    out = tiny_model(input_ids=ids, pixel_values=pixels, labels=labels, vis_boxes=boxes)
    assert torch.isfinite(out.loss)


def test_save_load_identical_logits(tiny_model, tmp_path):
    ids, pixels = make_batch()
    tiny_model.save_pretrained(tmp_path)
    loaded = PerceptionGPTForConditionalGeneration.from_pretrained(tmp_path).eval()
    a = tiny_model(input_ids=ids, pixel_values=pixels, vis_boxes=_boxes()).logits
    b = loaded(input_ids=ids, pixel_values=pixels, vis_boxes=_boxes()).logits
    assert torch.equal(a, b)
    assert loaded.config._attn_implementation == "sdpa"


def test_fused_llm_features_change_only_with_flag(tiny_config):
    tiny_config.fuse_llm_features = True
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(tiny_config).eval()
    ids, pixels = make_batch()
    with torch.no_grad():
        model.model.llm_feature_fusion.logits.copy_(torch.tensor([5.0, -5.0]))
    features = model.model.get_image_features(pixels).pooler_output
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    w = torch.tensor([5.0, -5.0]).softmax(0)
    expected = model.model.multi_modal_projector(w[0] * hidden[0][:, 1:] + w[1] * hidden[1][:, 1:])
    assert torch.allclose(torch.stack(features), expected, atol=1e-6)


@pytest.mark.parametrize(
    "cuda, flash, dtype, expected",
    [
        (True, True, torch.bfloat16, "flash_attention_2"),
        (True, True, "float16", "flash_attention_2"),
        (True, True, torch.float32, "sdpa"),
        (True, False, torch.bfloat16, "sdpa"),
        (False, True, torch.bfloat16, "sdpa"),
    ],
)
def test_attention_choice(monkeypatch, cuda, flash, dtype, expected):
    import perceptiongpt.loading_perceptiongpt as modeling

    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: flash)
    monkeypatch.setattr(modeling, "is_flash_attn_4_available", lambda: False)
    assert preferred_attn_implementation(dtype) == expected


def test_test_constants_are_the_tiny_presets_token_ids(tiny_config):
    from perceptiongpt.processing.tokenization_factory import SPECIAL_TOKEN_IDS

    assert (VIS, IMAGE) == (tiny_config.vis_token_id, tiny_config.image_token_id)
    assert (VIS, IMAGE) == (SPECIAL_TOKEN_IDS["<vis>"], SPECIAL_TOKEN_IDS["<image>"])


def test_mask_decoder_with_image_index_adapts_each_image_once_and_gives_the_same_masks(tiny_model):
    """generate() decodes every returned `<vis>` in one pass: M images with an index (N,) instead of N copies."""
    torch.manual_seed(0)
    decoder = copy.deepcopy(tiny_model.mask_decoder)
    with torch.no_grad():  # off the init, whose masks barely depend on the image
        for parameter in decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    hidden = torch.randn(5, tiny_model.config.text_config.hidden_size)
    images = torch.randn(2, decoder.grid_size**2, tiny_model.config.vision_config.hidden_size)
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        indexed, copied = decoder(hidden, images, index), decoder(hidden, images[index])
        torch.testing.assert_close(indexed, copied)
        assert (indexed[1] - decoder(hidden[1:2], images[:1])[0]).abs().max() > 1e-4  # the index matters


def test_channels_last_upsampler_equals_the_convolutions_it_replaces():
    """`UpsampleConvTranspose` / `HypernetworkProjection` hold nn.ConvTranspose2d / nn.Conv2d parameters (checkpoints
    load unchanged) and, chained twice and put in raster order once at the end (`blocks_to_raster`), compute what
    those convolutions (and the hypernetwork's dot product) compute."""
    from perceptiongpt.mask_decoder_perceptiongpt import (
        HypernetworkProjection,
        UpsampleConvTranspose,
        blocks_to_raster,
    )

    torch.manual_seed(0)
    first, first_conv = UpsampleConvTranspose(6, 4), torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
    second, second_conv = UpsampleConvTranspose(4, 3), torch.nn.ConvTranspose2d(4, 3, kernel_size=2, stride=2)
    first_conv.load_state_dict(first.state_dict())
    second_conv.load_state_dict(second.state_dict())
    maps = torch.randn(2, 6, 5, 7)  # (N, C, H, W): non-square, so a swapped axis shows
    once = first(maps.permute(0, 2, 3, 1).contiguous())  # (N, H, W, 2, 2, 4): per-pixel blocks
    assert once.shape == (2, 5, 7, 2, 2, 4)
    expected = first_conv(maps)  # (N, C', 2H, 2W)
    torch.testing.assert_close(blocks_to_raster(once.movedim(-1, 1).flatten(0, 1)).unflatten(0, (2, 4)), expected)
    twice = second(torch.nn.functional.gelu(once))  # per pixel: no raster order needed in between
    expected = second_conv(torch.nn.functional.gelu(expected))  # (N, 3, 4H, 4W)
    projection, conv = HypernetworkProjection(3, 5), torch.nn.Conv2d(3, 5, kernel_size=1)
    conv.load_state_dict(projection.state_dict())
    weights = torch.randn(2, 5)
    expected = torch.einsum("nu,nuhw->nhw", weights, conv(expected))  # (N, 4H, 4W)
    torch.testing.assert_close(blocks_to_raster(projection(twice, weights)), expected)


def test_mask_decoder_in_chunks_equals_one_pass_and_returns_a_normal_tensor(tiny_model, monkeypatch):
    """generate()'s returned masks are decoded in chunks, each under inference mode; the result leaves generate(), so
    it must be an ordinary tensor (in-place edits work)."""
    import perceptiongpt.mask_decoder_perceptiongpt as mask_decoder

    torch.manual_seed(0)
    decoder = tiny_model.mask_decoder
    hidden = torch.randn(7, tiny_model.config.text_config.hidden_size)
    images = torch.randn(2, decoder.grid_size**2, tiny_model.config.vision_config.hidden_size)
    index = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    monkeypatch.setattr(mask_decoder, "INFERENCE_CHUNK_BYTES", 1)  # one slot per chunk
    with torch.no_grad():
        chunked, whole = decoder.decode_in_chunks(hidden, images, index), decoder(hidden, images, index)
    torch.testing.assert_close(chunked, whole)
    assert not chunked.is_inference()
    chunked.mul_(2.0)

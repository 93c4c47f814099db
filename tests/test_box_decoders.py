"""Box-decoding designs (`BoxHeadConfig.decoder_type`), the location-keeping mask encoder, and loading folders saved
before either existed."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CROSS_PROCESS_TOLERANCE, make_batch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors.torch import load_file

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.box_decoders_perceptiongpt import (
    BOX_DECODERS,
    ordered_box_xyxy,
    ordered_params_from_box_xyxy,
    patch_centres,
    soft_capped_spread,
)
from perceptiongpt.configuration_perceptiongpt import BoxHeadConfig, MaskHeadConfig
from perceptiongpt.heads_perceptiongpt import MaskEncoder
from perceptiongpt.losses_perceptiongpt import box_dfl_loss_sum, box_interior_loss_sum, box_l1_loss_sum


FIXTURES = Path(__file__).with_name("fixtures")
DESIGNS = ("mlp", "bins", "query", "mask")
HEADS = {
    **{name: {"decoder_type": name} for name in DESIGNS},
    "query": {"decoder_type": "query", "query_source": "vision"},
    "query-llm": {"decoder_type": "query", "query_source": "llm"},
    "query-refine": {"decoder_type": "query", "query_source": "llm", "query_refine_layout": 2},
}


def _model(head, preset="tiny", **overrides):
    box_head = HEADS.get(head, {"decoder_type": head})
    config = PerceptionGPTConfig.from_preset(preset, box_head_config=box_head, **overrides)
    model = PerceptionGPTForConditionalGeneration(config)
    with torch.no_grad():  # move every head off its zero init, so that each design's gradients are exercised
        for name, parameter in model.named_parameters():
            if name.startswith(("box_decoder", "mask_decoder")):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def _decode(model, hidden, features):
    has_image = torch.ones(len(hidden), dtype=torch.bool)
    box, _ = model.decode_regions(hidden, features, has_image, torch.zeros_like(has_image), image_states=features)
    return box


def _inputs(n=6, hidden=32, patches=16, width=32, scale=1.0):
    return torch.randn(n, hidden) * scale, torch.randn(n, patches, width) * scale


@pytest.mark.parametrize("decoder_type", sorted(HEADS))
def test_every_design_orders_corners_inside_the_image(decoder_type):
    model = _model(decoder_type)
    for scale in (0.1, 1.0, 30.0):
        boxes = _decode(model, *_inputs(500, scale=scale)).boxes
        assert boxes.shape == (500, 4) and torch.isfinite(boxes).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 1


@pytest.mark.parametrize("decoder_type", sorted(HEADS))
def test_border_target_gets_a_gradient_on_every_wrong_coordinate(decoder_type):
    """The legacy decoder clamped to [0, 1] before the loss: a coordinate past a border had zero gradient."""
    model = _model(decoder_type)
    hidden, features = _inputs(1)
    target = torch.tensor([0.0, 0.3, 0.5, 1.0])  # touches the left and bottom borders
    boxes = _decode(model, hidden, features).boxes[0]
    parameters = [p for p in model.parameters() if p.requires_grad]
    for i in range(4):
        if abs(boxes[i].item() - target[i].item()) < 1e-3:
            continue
        grads = torch.autograd.grad((boxes[i] - target[i]).abs(), parameters, retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, i


def test_legacy_decoder_zeroes_the_gradient_past_a_border():
    """The defect, kept for old folders only: pred cxcywh (0.2, 0.5, 0.6, 0.4) has x1 = -0.1, clamped to 0."""
    model = _model("legacy_cxcywh")
    decoder = model.box_decoder
    with torch.no_grad():
        decoder.mlp[-1].weight.zero_()
        decoder.mlp[-1].bias.copy_(torch.logit(torch.tensor([0.2, 0.5, 0.6, 0.4])))
    boxes = decoder(torch.randn(1, 32)).boxes[0]
    (grad,) = torch.autograd.grad((boxes[0] - 0.05).abs(), decoder.mlp[-1].bias)
    assert boxes[0] == 0 and torch.equal(grad, torch.zeros(4))


@pytest.mark.parametrize("decoder_type", sorted(HEADS))
def test_every_parameter_gets_a_finite_gradient_in_training(decoder_type):
    model = _model(decoder_type).train()
    ids, pixels = make_batch(vis_at=((20,), (20, 25)))
    labels = torch.full_like(ids, -100)
    labels[:, 19:] = ids[:, 19:]
    nan = float("nan")
    boxes = torch.tensor([[[0.0, 0.1, 0.5, 0.5], [nan] * 4], [[0.2, 0.0, 1.0, 0.4], [0.3, 0.3, 0.4, 0.9]]])
    out = model(input_ids=ids, pixel_values=pixels, labels=labels, vis_boxes=boxes)
    assert out.pred_boxes.shape == (3, 4) and out.box_l1_loss > 0 and out.box_giou_loss > 0
    assert (out.box_aux_loss > 0) == (decoder_type in ("bins", "query", "query-llm", "query-refine"))
    assert (out.image_token_states is not None) == (decoder_type in ("query-llm", "query-refine"))
    out.loss.backward()
    for name, parameter in model.box_decoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    if decoder_type == "mask":  # the box is read from the mask: the mask decoder learns from box supervision alone
        assert model.mask_decoder.hypernetwork[-1].weight.grad.abs().sum() > 0


def test_zero_initialized_designs_start_at_the_centred_half_box(tiny_config):
    model = PerceptionGPTForConditionalGeneration(tiny_config)  # default design, heads at their init
    boxes = _decode(model, *_inputs(3)).boxes
    torch.testing.assert_close(boxes, torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(3, 4))


def test_ordered_parametrization_round_trips():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.1, 0.9], [0.25, 0.5, 0.75, 0.5], [1.0, 1.0, 1.0, 1.0]])
    params = ordered_params_from_box_xyxy(boxes)
    torch.testing.assert_close(params[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(params[2], torch.tensor([0.25, 2 / 3, 0.5, 0.0]))
    torch.testing.assert_close(ordered_box_xyxy(params), boxes)


def test_distribution_focal_loss_by_hand():
    # 5 bins at 0, .25, .5, .75, 1; target u_x = 0.3 -> position 1.2: 0.8 on bin 1, 0.2 on bin 2
    logits = torch.zeros(1, 4, 5)
    logits[0, 0] = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0])
    target = torch.tensor([[0.3, 0.0, 1.0, 1.0]])  # u_x .3, f_x 1, u_y 0, f_y 1
    log_p = logits.log_softmax(-1)[0]
    expected = -(0.8 * log_p[0, 1] + 0.2 * log_p[0, 2]) - log_p[1, 4] - log_p[2, 0] - log_p[3, 4]
    torch.testing.assert_close(box_dfl_loss_sum(logits, target), expected / 4)
    assert box_l1_loss_sum(target, target) == 0


def test_box_interior_loss_by_hand():
    # 2 x 2 patches centred at (.25, .25), (.75, .25), (.25, .75), (.75, .75)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.6, 0.6, 0.7, 0.7]])  # left column; a box between centres
    log_p = logits.log_softmax(-1)
    expected = -(0.5 * log_p[0, 0] + 0.5 * log_p[0, 2]) - log_p[1, 3]  # the 2nd falls back to its centre's patch
    torch.testing.assert_close(box_interior_loss_sum(logits, boxes), expected)


def test_decoder_type_is_validated_and_always_saved(tmp_path):
    # transformers' strict config dataclasses name the field, the allowed values and the value given
    with pytest.raises(StrictDataclassFieldValidationError, match="decoder_type.*'mlp', 'bins'.*regression"):
        BoxHeadConfig(decoder_type="regression")
    with pytest.raises(ValueError, match="num_bins"):
        BoxHeadConfig(num_bins=1)
    with pytest.raises(StrictDataclassFieldValidationError, match="encoder_type"):
        MaskHeadConfig(encoder_type="max")
    for design in DESIGNS:
        config = PerceptionGPTConfig.from_preset("tiny", box_head_config={"decoder_type": design})
        config.save_pretrained(tmp_path / design)
        saved = json.loads((tmp_path / design / "config.json").read_text())
        assert saved["box_head_config"]["decoder_type"] == design
        assert saved["mask_head_config"]["encoder_type"] == "grid"
        loaded = PerceptionGPTConfig.from_pretrained(tmp_path / design)
        assert loaded.box_head_config.decoder_type == design and type(loaded.box_head_config) is BoxHeadConfig
    assert set(BOX_DECODERS) == {*DESIGNS, "legacy_cxcywh"}
    assert PerceptionGPTConfig.from_preset("paper").box_head_config.decoder_type == "mlp"


def test_folder_saved_before_the_design_fields_loads_with_its_outputs():
    """tests/fixtures/tiny_v0_1: a tiny model saved by the code before `decoder_type`/`encoder_type` existed."""
    saved = json.loads((FIXTURES / "tiny_v0_1" / "config.json").read_text())
    assert "decoder_type" not in saved["box_head_config"] and "encoder_type" not in saved["mask_head_config"]
    model = PerceptionGPTForConditionalGeneration.from_pretrained(FIXTURES / "tiny_v0_1").eval()
    assert model.config.box_head_config.decoder_type == "legacy_cxcywh"
    assert model.config.mask_head_config.encoder_type == "mean"
    expected = load_file(FIXTURES / "tiny_v0_1_outputs.safetensors")
    inputs = {k: expected[k] for k in ("input_ids", "pixel_values", "vis_boxes", "vis_masks", "vis_mask_valid")}
    with torch.no_grad():
        out = model(**inputs, labels=expected["labels"])
        prompt = {
            k: v[:, :22] if k == "input_ids" else v[:, :1] if k.startswith("vis_") else v for k, v in inputs.items()
        }
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    torch.testing.assert_close(out.logits, expected["logits"], **CROSS_PROCESS_TOLERANCE)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], **CROSS_PROCESS_TOLERANCE)
    torch.testing.assert_close(out.pred_boxes, expected["pred_boxes"], **CROSS_PROCESS_TOLERANCE)
    assert torch.equal(generated.sequences, expected["sequences"])
    boxes = torch.cat(list(generated.pred_boxes))
    torch.testing.assert_close(boxes, expected["generated_boxes"], **CROSS_PROCESS_TOLERANCE)


def _corner_squares(side, square):
    masks = torch.zeros(2, side, side)
    masks[0, :square, :square] = 1
    masks[1, -square:, -square:] = 1
    return masks


@pytest.mark.parametrize("preset, side, square", [("demo", 32, 8), ("paper", 256, 64)])
def test_mask_encoder_keeps_where_the_mask_is(preset, side, square):
    """At init, with the model's own `_init_weights`, opposite-corner squares must not look alike (cosine < 0.9)."""
    config = PerceptionGPTConfig.from_preset(preset)
    init_source = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny"))
    cosines = {}
    for encoder_type in ("grid", "mean"):
        mask_config = MaskHeadConfig(**{**config.mask_head_config.to_dict(), "encoder_type": encoder_type})
        encoder = MaskEncoder(mask_config, config.text_config.hidden_size)
        encoder.apply(init_source._init_weights)
        with torch.no_grad():
            a, b = encoder(_corner_squares(side, square))
        cosines[encoder_type] = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert cosines["grid"] < 0.9, cosines
    assert cosines["mean"] > cosines["grid"], cosines  # the legacy global pool loses most of the location


def test_box_coverage_and_the_raster_box_encoder():
    from perceptiongpt import BoxHeadConfig, PerceptionGPTConfig
    from perceptiongpt.heads_perceptiongpt import BoxEncoder, box_coverage

    coverage = box_coverage(torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.1, 0.1, 0.2, 0.2]]), 4).view(2, 4, 4)
    expected = torch.zeros(2, 4, 4)
    expected[0, 0, :2] = 1.0  # the top half-row: two whole cells
    expected[1, 0, 0] = 0.4 * 0.4  # 0.1 of the first 0.25-wide cell, on each axis
    torch.testing.assert_close(coverage, expected)
    # any ordered box, degenerate ones and edges on cell borders included: the overlap area over the cell area
    torch.manual_seed(0)
    corners = torch.cat([torch.rand(64, 2, 2).sort(1).values, torch.tensor([[[0.25, 0.5], [0.25, 0.75]]])])
    boxes = corners.transpose(1, 2).flatten(1)[:, [0, 2, 1, 3]].double()  # (65, 4) xyxy
    edges = torch.linspace(0, 1, 5, dtype=torch.float64)
    overlap = (torch.minimum(boxes[:, 2:, None], edges[1:]) - torch.maximum(boxes[:, :2, None], edges[:-1])).clamp(0)
    expected = (overlap[:, 1, :, None] * overlap[:, 0, None, :] * 16).flatten(1)  # (65, 4 * 4): y rows, x columns
    torch.testing.assert_close(box_coverage(boxes, 4), expected)
    raster = BoxEncoder(BoxHeadConfig(hidden_size=16, num_layers=2, encoder_type="raster", encoder_grid=4), 8)
    plain = BoxEncoder(BoxHeadConfig(hidden_size=16, num_layers=2, encoder_type="mlp"), 8)
    plain.load_state_dict({k: v for k, v in raster.state_dict().items() if k.startswith("mlp.")})
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(raster(boxes) - plain(boxes), raster.raster(box_coverage(boxes, 4)))
    assert raster(boxes[None]).shape == (1, 2, 8)  # any leading dims: the compiled decode step embeds (B, T, 4)
    # new models rasterize; the paper preset and folders saved before the field keep the paper's MLP
    assert PerceptionGPTConfig.from_preset("demo").box_head_config.encoder_type == "raster"
    assert PerceptionGPTConfig.from_preset("paper").box_head_config.encoder_type == "mlp"
    saved = PerceptionGPTConfig.from_preset("tiny").to_dict()
    del saved["box_head_config"]["encoder_type"]
    assert PerceptionGPTConfig.from_dict(saved).box_head_config.encoder_type == "mlp"
    with pytest.raises(ValueError, match="encoder_grid"):
        BoxHeadConfig(encoder_grid=0)


def test_query_centre_offset_moves_the_centre_up_to_one_patch():
    """The offset outputs move the attended centre by tanh(o) / grid; off (and in folders saved before the field),
    the decoder has 4 outputs and the box contains the attended centre."""
    torch.manual_seed(0)
    hidden, features = _inputs(4)
    configs = [
        PerceptionGPTConfig.from_preset("tiny", box_head_config=dict(HEADS["query"], query_centre_offset=f))
        for f in (True, False)
    ]
    on, off = (PerceptionGPTForConditionalGeneration(config).box_decoder for config in configs)
    assert on.extent[-1].out_features == 6 and off.extent[-1].out_features == 4
    has_image = torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        on.extent[-1].weight.zero_()  # spread sigmoid(0) = half the room on each side: x1 = centre_x / 2
        on.extent[-1].bias.zero_()
        unmoved = on(hidden, features, has_image).boxes
        on.extent[-1].bias[4:] = torch.tensor([0.5, -0.5])
        moved = on(hidden, features, has_image).boxes
        no_image = on(hidden, features, torch.zeros(4, dtype=torch.bool)).boxes
    shift = torch.tensor([0.5, -0.5]).tanh() / 4  # the tiny preset's 4x4 grid
    torch.testing.assert_close(2 * moved[:, :2], (2 * unmoved[:, :2] + shift).clamp(0, 1), atol=1e-6, rtol=0)
    assert (2 * unmoved[:, :2] - 0.5).abs().max() > 1e-3  # the attended centre, not the image centre
    # without an image nothing moves: the centred half box
    torch.testing.assert_close(no_image, torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(4, 4))
    saved = configs[0].to_dict()
    del saved["box_head_config"]["query_centre_offset"]  # a folder saved before the field
    assert PerceptionGPTConfig.from_dict(saved).box_head_config.query_centre_offset is False


def _query_decoder(query_extent):
    config = PerceptionGPTConfig.from_preset("tiny", box_head_config=dict(HEADS["query"], query_extent=query_extent))
    return PerceptionGPTForConditionalGeneration(config).box_decoder


def test_query_half_size_extent_does_not_depend_on_where_the_box_is():
    """The same extent outputs give the same distance to each side at every centre away from the borders
    ("half_size"); the fractions of the room to the border ("room_fraction", folders saved before the field) give
    distances that follow the position, so the same object needs different outputs at every place."""
    one_patch = torch.zeros(2, 16, 32)  # two rows, each attending one patch of the tiny 4x4 grid
    one_patch[0, 5, 0] = one_patch[1, 15, 0] = 1.0  # centres (0.375, 0.375) and (0.875, 0.875)
    centre = torch.tensor([[0.375], [0.875]])
    sides = {}
    for extent in ("half_size", "room_fraction"):
        decoder = _query_decoder(extent)
        with torch.no_grad():
            decoder.query.weight.zero_()
            decoder.query.bias.fill_(1.0)
            decoder.key.weight.zero_()
            decoder.key.weight[:, 0] = 1000.0  # every attention on the marked patch
            decoder.key.bias.zero_()
            decoder.extent[-1].weight.zero_()
            decoder.extent[-1].bias.copy_(torch.logit(torch.tensor(0.2)))  # sigmoid = 0.2 on every side
            boxes = decoder(torch.zeros(2, 32), one_patch, torch.ones(2, dtype=torch.bool)).boxes
        sides[extent] = torch.cat([centre - boxes[:, :2], boxes[:, 2:] - centre], dim=-1)  # left, top, right, bottom
    # a distance of 0.1 (sigmoid / 2), softly capped by the room r to the border: 0.1 / (1 + (0.1 / r)^4)^(1/4)
    room = torch.cat([centre, centre, 1 - centre, 1 - centre], dim=-1)
    torch.testing.assert_close(sides["half_size"], 0.1 * (1 + (0.1 / room) ** 4) ** -0.25)
    assert (sides["half_size"][0] - 0.1).abs().max() < 2e-4  # 0.375 or more from the border: within 0.2%
    assert 0.09 < sides["half_size"][1, 2] < 0.1  # 0.125 from it: 8% less, inside the image
    torch.testing.assert_close(sides["room_fraction"], 0.2 * room)  # 0.075 to 0.175 for the same outputs
    half, fraction = _query_decoder("half_size"), _query_decoder("room_fraction")
    assert half.extent[0].in_features == fraction.extent[0].in_features + 2  # the centre is an input


def test_query_half_size_extent_is_capped_softly_by_the_border():
    """Up to half the image on each side: a box never crosses the border and its gradient never vanishes there."""
    decoder = _query_decoder("half_size")
    centre = torch.tensor([[0.05, 0.5], [0.9, 0.98]])
    for half in (0.0, 0.03, 0.5):
        spread = soft_capped_spread(torch.full((2, 4), half, requires_grad=True), centre)
        assert ((spread >= 0) & (spread < 1)).all()
    half = torch.full((2, 4), 0.5, requires_grad=True)
    (grad,) = torch.autograd.grad(soft_capped_spread(half, centre).sum(), half)
    assert (grad > 0).all()
    # zero init: a quarter of the image on each side of the centre, less the soft cap (0.25 / 0.5: 1.5% less)
    boxes = decoder(torch.zeros(1, 32), torch.zeros(1, 16, 32), torch.zeros(1, dtype=torch.bool)).boxes
    side = 0.25 * (1 + 0.5**4) ** -0.25
    torch.testing.assert_close(boxes, torch.tensor([[0.5 - side, 0.5 - side, 0.5 + side, 0.5 + side]]))


def test_query_extent_is_validated_and_saved(tmp_path):
    with pytest.raises(StrictDataclassFieldValidationError, match="query_extent"):
        BoxHeadConfig(query_extent="absolute")
    assert BoxHeadConfig().query_extent == "room_fraction"  # also what folders saved before the field were built with
    config = PerceptionGPTConfig.from_preset("tiny", box_head_config=dict(HEADS["query"], query_extent="half_size"))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["box_head_config"]["query_extent"] == "half_size"
    assert PerceptionGPTConfig.from_pretrained(tmp_path).box_head_config.query_extent == "half_size"


def test_query_refinement_starts_as_the_first_box_and_reads_the_patches_under_it():
    """`query_refine_layout`: zero-initialized, the refined box is the first stage's; moved off zero, it depends on
    the ViT patches around the first box and not on the others; rows without an image keep the first box."""
    torch.manual_seed(0)
    hidden, states = _inputs(3)
    vision = torch.randn(3, 16, 32)
    configs = [
        PerceptionGPTConfig.from_preset("tiny", box_head_config=dict(HEADS["query-llm"], query_refine_layout=n))
        for n in (0, 2)
    ]
    plain, refined = (PerceptionGPTForConditionalGeneration(config).box_decoder for config in configs)
    has_image = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        plain.extent[-1].bias.fill_(-3.0)  # small first boxes: patches far from them exist on the 4 x 4 grid
        refined.load_state_dict(plain.state_dict(), strict=False)  # the same first stage
        first = plain(hidden, states, has_image).boxes
        torch.testing.assert_close(refined(hidden, states, has_image, vision_patches=vision).boxes, first)
        for parameter in refined.refine.parameters():
            parameter.normal_(0, 0.05)
        moved = refined(hidden, states, has_image, vision_patches=vision).boxes
        assert (moved - first).abs().max() > 1e-2
        # the patches read: around each first box (grown by a quarter per side), the tiny preset's 4 x 4 grid
        grown = first + (first[:, 2:] - first[:, :2]).repeat(1, 2) * torch.tensor([-0.25, -0.25, 0.25, 0.25])
        centres = ((torch.arange(4.0) + 0.5) / 4).expand(4, 4)
        xs, ys = centres.flatten(), centres.t().flatten()  # (16,) each, row-major
        far = torch.stack(
            [(xs < g[0] - 0.25) | (xs > g[2] + 0.25) | (ys < g[1] - 0.25) | (ys > g[3] + 0.25) for g in grown]
        )
        assert far.any()
        other = torch.randn_like(vision)  # other patches (a constant shift would vanish in the LayerNorm)
        elsewhere = torch.where(far[..., None], other, vision)
        torch.testing.assert_close(refined(hidden, states, has_image, vision_patches=elsewhere).boxes, moved)
        inside = torch.where(far[..., None], vision, other)
        assert (refined(hidden, states, has_image, vision_patches=inside).boxes - moved).abs().max() > 1e-3
        no_image = torch.zeros(3, dtype=torch.bool)
        torch.testing.assert_close(
            refined(hidden, states, no_image, vision_patches=vision).boxes, plain(hidden, states, no_image).boxes
        )
    with pytest.raises(ValueError, match=r"`query_refine_layout` must be >= 0, got -1"):
        BoxHeadConfig(query_refine_layout=-1)


def test_query_decoder_constants_are_filled_again_by_from_pretrained(tmp_path):
    """The patch centres, the refinement's sampling points and the image corners are non-persistent buffers, which
    from_pretrained materializes uninitialized: `_init_weights` fills them again, so the loaded model decodes the same
    boxes."""
    torch.manual_seed(0)
    model = _model("query-refine").eval()
    model.save_pretrained(tmp_path)
    loaded = PerceptionGPTForConditionalGeneration.from_pretrained(tmp_path).eval()
    decoder = loaded.box_decoder
    torch.testing.assert_close(decoder.patch_centres[:5], torch.tensor([[1, 1], [3, 1], [5, 1], [7, 1], [1, 3]]) / 8)
    torch.testing.assert_close(decoder.patch_centres, patch_centres(4))  # the tiny preset's 4 x 4 grid
    # 2 x 2 cells over the box grown by a quarter per side: -1/4 + 3/2 * (1/4, 3/4) = (1/8, 7/8) of the box's side,
    # (-3/4, 3/4) in grid_sample's frame for the whole image; cells row-major, (x, y) each
    points = (torch.tensor([[0.0, 0.0, 1.0, 1.0]]) @ decoder.refine_points - 1).view(4, 2)
    torch.testing.assert_close(points, torch.tensor([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * 0.75)
    assert decoder.corners.tolist() == [0.0, 0.0, 1.0, 1.0]  # the image's xyxy corners, where boxes grow toward
    hidden, states = _inputs(3)
    has_image = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        expected = model.box_decoder(hidden, states, has_image, vision_patches=states).boxes
        torch.testing.assert_close(decoder(hidden, states, has_image, vision_patches=states).boxes, expected)

"""PerceptionGPT on Qwen2.5-VL (tiny random configs, offline): conversion, loading, M-RoPE positions, generation."""

import json

import pytest
import torch
from safetensors import safe_open
from test_generation import MODES
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import perceptiongpt
from perceptiongpt import PerceptionGPTQwen2_5_VLConfig, PerceptionGPTQwen2_5_VLForConditionalGeneration


NAN = float("nan")
IMAGE, VIS, VIDEO, START, END = 4, 5, 262, 263, 264
PATCH_FEATURES = 3 * 2 * 4 * 4  # channels x temporal patch x patch x patch of the tiny preset


def native_config() -> Qwen2_5_VLConfig:
    """The tiny preset's native part: what a Hub Qwen2.5-VL checkpoint of that size would hold."""
    tiny = PerceptionGPTQwen2_5_VLConfig.from_preset("tiny").to_dict()
    keys = ("vision_config", "text_config", "image_token_id", "video_token_id", "vision_start_token_id")
    return Qwen2_5_VLConfig(**{key: tiny[key] for key in keys}, vision_end_token_id=END)


def qwen_rows(grids=((1, 4, 6), (1, 4, 4)), lengths=(24, 21), vis_at=((20,), ()), seed=0):
    """Left-padded rows `[text, <vision_start>, image pads, <vision_end>, text, <vis>...]`, one image each.

    grids: per row its (t, h, w) patch grid (h*w/4 LLM tokens); lengths: per row its tokens (the shorter rows are
    left-padded). Returns the model inputs and the boxes of the prompt `<vis>` (a box for row 0's, none elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    rows, pixels = [], []
    for (t, h, w), length, positions in zip(grids, lengths, vis_at):
        tokens = h * w // 4
        row = torch.randint(10, 200, (length,), generator=g)
        row[2], row[3 : 3 + tokens], row[3 + tokens] = START, IMAGE, END
        row[list(positions)] = VIS
        rows.append(row)
        pixels.append(torch.randn(t * h * w, PATCH_FEATURES, generator=g))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], attention[i, width - len(row) :] = row, 1
    boxes = torch.full((len(rows), 1, 4), NAN)
    boxes[0, 0] = torch.tensor([0.1, 0.2, 0.5, 0.7])
    inputs = {
        "input_ids": ids,
        "attention_mask": attention,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": (ids == IMAGE).long(),
    }
    return inputs, boxes


@pytest.fixture
def native():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(native_config()).eval()


@pytest.fixture
def qwen_model():
    torch.manual_seed(0)
    model = PerceptionGPTQwen2_5_VLForConditionalGeneration(PerceptionGPTQwen2_5_VLConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # a non-trivial box decoder, and `<vis>` likely enough to be generated
        model.box_decoder.mlp[-1].weight.normal_(0, 0.5)
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    return model


def test_from_base_keeps_every_tensor_and_the_native_logits(native):
    model, processor = perceptiongpt.from_base(native, mask_grid_size=4)
    assert processor is None and type(model) is PerceptionGPTQwen2_5_VLForConditionalGeneration
    vocab = native.config.text_config.vocab_size
    assert model.config.vis_token_id == vocab and model.config.model_type == "perceptiongpt_qwen2_5_vl"
    converted = model.state_dict()
    for name, tensor in native.state_dict().items():
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(converted[name][:vocab], tensor), name
            torch.testing.assert_close(converted[name][vocab], tensor.mean(0), rtol=0, atol=1e-6)
        else:
            assert torch.equal(converted[name], tensor), name
    inputs, _ = qwen_rows(vis_at=((), ()))
    with torch.no_grad():
        expected = native(**inputs).logits
        found = model(**inputs).logits
    torch.testing.assert_close(found[..., :vocab], expected, rtol=1e-5, atol=1e-5)


def test_hub_layout_checkpoint_loads_only_with_the_conversion_mapping(qwen_model, tmp_path, monkeypatch):
    """save_pretrained writes Qwen's Hub layout (`model.layers.*`, `visual.*`); the registered mapping reads it back.
    Negative control: without the registration the language model and ViT are silently re-initialized."""
    from transformers import conversion_mapping

    qwen_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.layers.0.") for k in keys) and any(k.startswith("visual.") for k in keys)
    load = PerceptionGPTQwen2_5_VLForConditionalGeneration.from_pretrained
    reloaded, info = load(tmp_path, output_loading_info=True)
    expected = qwen_model.state_dict()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in expected.items())

    name = PerceptionGPTQwen2_5_VLForConditionalGeneration.__name__
    monkeypatch.delitem(conversion_mapping._checkpoint_conversion_mapping_cache, name)
    monkeypatch.setattr(conversion_mapping, "USER_REGISTERED_MAPPINGS", set())
    unmapped, info = load(tmp_path, output_loading_info=True)
    differs = [n for n, t in expected.items() if not torch.equal(unmapped.state_dict()[n], t)]
    assert len(info["missing_keys"]) == len(info["unexpected_keys"]) > 0
    assert "model.language_model.embed_tokens.weight" in differs
    assert any(n.startswith("model.language_model.layers.") for n in differs)


def _decoder_positions(model, call):
    """The position ids the decoder receives in its first call during `call()`."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        call()
    finally:
        hook.remove()
    return seen[0]


def test_training_positions_equal_generate_positions(qwen_model):
    """M-RoPE positions come from `input_ids` in training as in generate(): the image gets 3-D positions (not 1-D),
    also right after a generate call with another batch size (no stale `rope_deltas`)."""
    inputs, boxes = qwen_rows()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    generate = lambda: qwen_model.generate(**inputs, vis_boxes=boxes, max_new_tokens=1, do_sample=False)  # noqa: E731
    generated = _decoder_positions(qwen_model, generate)  # (4, B, T): text row, then the 3-D rows
    one_row = {k: v[:1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    one_row.update(pixel_values=inputs["pixel_values"][:24], image_grid_thw=inputs["image_grid_thw"][:1])
    qwen_model.generate(**one_row, max_new_tokens=2, do_sample=False)  # leaves rope_deltas of batch 1
    train = lambda: qwen_model(**inputs, vis_boxes=boxes, labels=labels)  # noqa: E731
    trained = _decoder_positions(qwen_model, train)
    assert trained.shape[-2:] == inputs["input_ids"].shape
    valid = inputs["attention_mask"].bool()
    for axis in range(3):
        assert torch.equal(trained[-3 + axis][valid], generated[1 + axis][valid])
    image = inputs["input_ids"] == IMAGE
    assert not torch.equal(trained[-2][image], trained[-1][image])  # height and width differ over the image


def _teacher_forced_errors(model, out, inputs, boxes):
    """Max |difference| of each recorded box and of the mask logits (relative to their largest magnitude) against one
    teacher-forced pass over the returned sequences, each `<vis>` reading its row's image; and the boxes checked."""
    seqs, prompt = out.sequences, inputs["input_ids"].shape[1]
    rows, n = seqs.shape[0], seqs.shape[0] // inputs["input_ids"].shape[0]
    vis_boxes = torch.full((rows, int((seqs == VIS).sum(-1).max()) + 1, 4), NAN)
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    patches = inputs["pixel_values"].split(sizes)
    for r in range(rows):
        vis_boxes[r, : boxes.shape[1]] = boxes[r // n]
        first = int((seqs[r, :prompt] == VIS).sum())
        vis_boxes[r, first : first + len(out.pred_boxes[r])] = out.pred_boxes[r]
    mask = torch.cat(
        [inputs["attention_mask"].repeat_interleave(n, 0), torch.ones(rows, seqs.shape[1] - prompt).long()], 1
    )
    forced = {
        "input_ids": seqs,
        "attention_mask": mask,
        "pixel_values": torch.cat([patches[r // n] for r in range(rows)]),
        "image_grid_thw": inputs["image_grid_thw"].repeat_interleave(n, 0),
        "mm_token_type_ids": (seqs == IMAGE).long(),
    }
    with torch.no_grad():
        tf = model(**forced, vis_boxes=vis_boxes)
    err = mask_err = 0.0
    count = 0
    for r in range(rows):
        for j, p in enumerate(out.vis_positions[r].tolist()):
            hidden = tf.last_hidden_state[r, p - 1][None]
            features = tf.image_outputs.mask_features[r][None]
            states = None if tf.image_token_states is None else tf.image_token_states[r][None]
            has_image = torch.tensor([True])
            box, masks = model.decode_regions(hidden, features, has_image, has_image, states)
            err = max(err, (box.boxes[0] - out.pred_boxes[r][j]).abs().max().item())
            scale = masks[0].abs().max().clamp(min=1)
            mask_err = max(mask_err, ((masks[0] - out.pred_masks[r][j]).abs().max() / scale).item())
            count += 1
    return err, mask_err, count


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_default_head_matches_teacher_forcing(mode):
    """The default head reads the LLM's image states, each sample's images repeated per beam / returned sequence
    (the mlp head runs every mode in tests/test_families.py)."""
    torch.manual_seed(0)
    config = PerceptionGPTQwen2_5_VLConfig.from_preset(
        "tiny", box_head_config={"decoder_type": "query", "query_source": "llm"}
    )
    qwen_model = PerceptionGPTQwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        qwen_model.lm_head.weight[VIS] = qwen_model.model.language_model.norm.weight * 3
    inputs, boxes = qwen_rows()
    torch.manual_seed(0)
    kwargs = {"do_sample": False, **MODES[mode]}
    out = qwen_model.generate(**inputs, vis_boxes=boxes, max_new_tokens=6, return_dict_in_generate=True, **kwargs)
    err, mask_err, count = _teacher_forced_errors(qwen_model, out, inputs, boxes)
    assert count >= 2 and err < 1e-6 and mask_err < 1e-5
    assert all(masks.shape == (len(b), 16, 16) for masks, b in zip(out.pred_masks, out.pred_boxes))


def test_padded_row_equals_row_alone(qwen_model):
    inputs, boxes = qwen_rows()
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    batched = qwen_model.generate(**inputs, vis_boxes=boxes, **kwargs)
    pad = int((inputs["attention_mask"][1] == 0).sum())
    assert pad == 3
    alone = {k: v[1:, pad:] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    alone.update(pixel_values=inputs["pixel_values"][24:], image_grid_thw=inputs["image_grid_thw"][1:])
    single = qwen_model.generate(**alone, vis_boxes=boxes[1:], **kwargs)
    assert torch.equal(
        batched.sequences[1, inputs["input_ids"].shape[1] :], single.sequences[0, alone["input_ids"].shape[1] :]
    )
    torch.testing.assert_close(batched.pred_boxes[1], single.pred_boxes[0], rtol=0, atol=1e-6)


def test_modality_tokens_are_never_sampled(qwen_model):
    inputs, boxes = qwen_rows()
    with torch.no_grad():  # make every modality token the most likely next token
        for token in (IMAGE, VIDEO, START, END):
            qwen_model.lm_head.weight[token] = qwen_model.model.language_model.norm.weight * 50
    out = qwen_model.generate(**inputs, vis_boxes=boxes, max_new_tokens=6, do_sample=True)
    generated = out[:, inputs["input_ids"].shape[1] :]
    assert not torch.isin(generated, torch.tensor([IMAGE, VIDEO, START, END])).any()
    assert qwen_model.config.suppressed_token_ids == [IMAGE, VIDEO, START, END]


def test_save_reload_and_auto_classes(qwen_model, tmp_path):
    qwen_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "perceptiongpt_qwen2_5_vl"
    assert saved["auto_map"]["AutoModelForImageTextToText"].endswith("PerceptionGPTQwen2_5_VLForConditionalGeneration")
    assert (tmp_path / "modeling_perceptiongpt_qwen2_5_vl.py").exists() and (
        tmp_path / "mixin_perceptiongpt.py"
    ).exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is PerceptionGPTQwen2_5_VLForConditionalGeneration
    inputs, boxes = qwen_rows()
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    a, b = (
        qwen_model.generate(**inputs, vis_boxes=boxes, **kwargs),
        reloaded.generate(**inputs, vis_boxes=boxes, **kwargs),
    )
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.pred_boxes, b.pred_boxes):
        assert torch.equal(x, y)


def test_native_classes_are_untouched_and_unsupported_families_raise():
    from transformers import Gemma3Config

    assert type(AutoModelForImageTextToText.from_config(native_config())) is Qwen2_5_VLForConditionalGeneration
    gemma = AutoModelForImageTextToText.from_config(
        Gemma3Config(
            text_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "vocab_size": 300,
            },
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "image_size": 16,
                "patch_size": 4,
            },
            mm_tokens_per_image=4,
            image_token_id=299,
        )
    )
    with pytest.raises(
        ValueError,
        match=r"'gemma3' model; PerceptionGPT supports the families \['llava', 'qwen2_5_vl', 'idefics3', 'smolvlm'\]",
    ):
        perceptiongpt.from_base(gemma)


def test_lora_trains_only_decoder_targets_heads_and_vis_rows(qwen_model):
    from peft import get_peft_model

    from perceptiongpt.trainer import lora_config

    peft_model = get_peft_model(qwen_model, lora_config(qwen_model, preset="paper"))
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".language_model.layers." in n for n in lora)  # never the ViT's attention
    inputs, boxes = qwen_rows()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    peft_model.train()
    out = peft_model(**inputs, vis_boxes=boxes, labels=labels)
    out.loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in trained) and any("box_decoder" in n for n in trained)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if n in trained)
    assert not any("visual" in n for n in trained)


def test_text_only_prompts_and_vis_at_the_last_step(qwen_model):
    """No image: boxes still come (masks None); a `<vis>` produced by the final step still gets its box."""
    inputs, boxes = qwen_rows(vis_at=((20,), ()))
    text_only = {"input_ids": torch.randint(10, 200, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    kwargs = dict(do_sample=False, return_dict_in_generate=True)
    out = qwen_model.generate(**text_only, max_new_tokens=6, **kwargs)
    assert out.pred_masks == [None, None] and sum(len(b) for b in out.pred_boxes) > 0
    with torch.no_grad():
        forced = qwen_model(input_ids=out.sequences, vis_boxes=_generated_slots(out, 12))
    for r, positions in enumerate(out.vis_positions):
        hidden = forced.last_hidden_state[r, positions - 1]  # (n, D)
        torch.testing.assert_close(qwen_model.decode_regions(hidden)[0].boxes, out.pred_boxes[r], rtol=0, atol=1e-6)
    others = [i for i in range(qwen_model.config.text_config.vocab_size) if i != VIS]  # only `<vis>` can come
    last = qwen_model.generate(**inputs, vis_boxes=boxes, max_new_tokens=3, suppress_tokens=others, **kwargs)
    assert (last.sequences[:, -1] == VIS).all() and last.vis_positions[0][-1] == last.sequences.shape[1] - 1
    err, mask_err, count = _teacher_forced_errors(qwen_model, last, inputs, boxes)
    assert count == 6 and err < 1e-6 and mask_err < 1e-5


def _generated_slots(out, prompt):
    """(rows, K, 4) boxes of every row's `<vis>` slots: the generated ones from `out` (text-only prompts hold none)."""
    slots = torch.full((out.sequences.shape[0], max(len(b) for b in out.pred_boxes), 4), NAN)
    for r, b in enumerate(out.pred_boxes):
        slots[r, : len(b)] = b
    return slots

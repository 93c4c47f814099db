"""generate(): every recorded box/score must equal a teacher-forced pass over the final sequences."""

import pytest
import torch
from conftest import IMAGE, VIS, make_batch
from transformers import LogitsProcessor, LogitsProcessorList

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.region_inputs import image_index_per_token


NAN = float("nan")
PROMPT = 24


def _prompt(batch_size=2, image=True, pad_row1=3):
    ids, pixels = make_batch(batch_size, PROMPT, vis_at=((21,), ()), image=image)
    attention = torch.ones_like(ids)
    if batch_size > 1 and pad_row1:  # left padding
        ids[1, :pad_row1], attention[1, :pad_row1] = 0, 0
        if image:
            ids[1, 2:18] = 10
            ids[1, 4:20] = IMAGE
    boxes = torch.full((batch_size, 1, 4), NAN)
    boxes[0, 0] = torch.tensor([0.1, 0.1, 0.5, 0.5])
    return ids, attention, pixels, boxes


def _generate(model, ids, attention, pixels, boxes, seed=0, **kwargs):
    torch.manual_seed(seed)
    inputs = dict(input_ids=ids, attention_mask=attention, vis_boxes=boxes, max_new_tokens=8, do_sample=False)
    if pixels is not None:
        inputs["pixel_values"] = pixels
    return model.generate(**{**inputs, **kwargs}, return_dict_in_generate=True)


def _teacher_forced(model, out, ids, attention, pixels, boxes):
    """Max |difference| of the recorded boxes, and of the scores (probabilities near 1 carry float32 rounding of the
    cached vs full pass), against one teacher-forced forward, the number of boxes checked, and the max |difference|
    of the mask logits relative to their largest magnitude (at least 1). Each `<vis>` reads the latest image at or before it, training's rule."""
    seqs, prompt = out.sequences, ids.shape[1]
    rows, n = seqs.shape[0], seqs.shape[0] // ids.shape[0]
    vis_boxes = torch.full((rows, int((seqs == VIS).sum(-1).max()) + 1, 4), NAN)
    for r in range(rows):
        vis_boxes[r, : boxes.shape[1]] = boxes[r // n]
        first = int((seqs[r, :prompt] == VIS).sum())
        vis_boxes[r, first : first + len(out.pred_boxes[r])] = out.pred_boxes[r]
    mask = torch.cat(
        [attention.repeat_interleave(n, 0), torch.ones(rows, seqs.shape[1] - prompt, dtype=torch.long)], 1
    )
    kwargs = {} if pixels is None else {"pixel_values": _pixels_per_row(pixels, ids, n)}
    with torch.no_grad():
        tf = model(input_ids=seqs, attention_mask=mask, vis_boxes=vis_boxes, **kwargs)
    image_index = image_index_per_token(model.image_starts(seqs))  # (rows, T)
    err, count, mask_err = 0.0, 0, 0.0
    for r in range(rows):
        for j, p in enumerate(out.vis_positions[r].tolist()):
            index, has_image = image_index[r, p].clamp(min=0), image_index[r, p : p + 1] >= 0
            features = None if tf.image_outputs is None else tf.image_outputs.mask_features[index][None]
            states = None if tf.image_token_states is None else tf.image_token_states[index][None]
            hidden = tf.last_hidden_state[r, p - 1][None]
            box, masks = model.decode_regions(hidden, features, has_image, has_image, states)
            prob = tf.logits[r, p - 1].softmax(-1)[VIS]
            err = max(err, (box.boxes[0] - out.pred_boxes[r][j]).abs().max().item())
            err = max(err, abs(prob - out.vis_scores[r][j]).item() / 10)
            if masks is not None:
                scale = masks[0].abs().max().clamp(min=1)  # relative for the large logits of perturbed decoders
                mask_err = max(mask_err, ((masks[0] - out.pred_masks[r][j]).abs().max() / scale).item())
            count += 1
    return err, count, mask_err


def _pixels_per_row(pixels, ids, n):
    """The images of every generated row, in row order: each sample's images repeated for its n rows."""
    per_sample = (ids == IMAGE).sum(-1) // 16
    starts = [0, *per_sample.cumsum(0).tolist()]
    return torch.cat([pixels[starts[b] : starts[b + 1]] for b in range(ids.shape[0]) for _ in range(n)])


MODES = {
    "greedy": {},
    "greedy_no_cache": {"use_cache": False},
    "sample": {"do_sample": True},
    "sample_n2": {"do_sample": True, "num_return_sequences": 2},
    "beam": {"num_beams": 3},
    "beam_n2": {"num_beams": 3, "num_return_sequences": 2},
    "beam_no_cache": {"num_beams": 2, "use_cache": False},
    "static_cache": {"cache_implementation": "static"},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_recorded_boxes_match_teacher_forcing(tiny_model, mode):
    ids, attention, pixels, boxes = _prompt()
    out = _generate(tiny_model, ids, attention, pixels, boxes, **MODES[mode])
    err, count, mask_err = _teacher_forced(tiny_model, out, ids, attention, pixels, boxes)
    assert count >= 2 and err < 1e-6 and mask_err < 1e-5
    assert len(out.pred_boxes) == len(out.pred_masks) == out.sequences.shape[0]
    for r, positions in enumerate(out.vis_positions):
        generated = (out.sequences[r] == VIS).nonzero()[:, 0]
        assert torch.equal(positions, generated[generated >= PROMPT])
        assert out.pred_masks[r].shape == (len(positions), 16, 16)
        assert (positions >= PROMPT).all()


def test_vis_at_the_last_step_is_decoded(tiny_model):
    """With `<vis>` the most likely token, the final step emits one; it must still get a box."""
    ids, attention, pixels, boxes = _prompt()
    for kwargs in ({}, {"num_beams": 2}, {"do_sample": True}):
        out = _generate(tiny_model, ids, attention, pixels, boxes, max_new_tokens=5, **kwargs)
        last = [r for r in range(out.sequences.shape[0]) if out.sequences[r, -1] == VIS]
        assert last, kwargs
        for r in last:
            assert out.vis_positions[r][-1] == out.sequences.shape[1] - 1
        err, _, mask_err = _teacher_forced(tiny_model, out, ids, attention, pixels, boxes)
        assert err < 1e-6 and mask_err < 1e-5


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3}])
def test_padded_row_equals_row_alone_and_cache_equals_no_cache(tiny_model, kwargs):
    ids, attention, pixels, boxes = _prompt()
    batched = _generate(tiny_model, ids, attention, pixels, boxes, **kwargs)
    alone = _generate(tiny_model, ids[1:, 3:], attention[1:, 3:], pixels[1:], boxes[1:], **kwargs)
    assert torch.equal(batched.sequences[1, PROMPT:], alone.sequences[0, PROMPT - 3 :])
    assert torch.allclose(batched.pred_boxes[1], alone.pred_boxes[0], atol=1e-6)
    no_cache = _generate(tiny_model, ids, attention, pixels, boxes, use_cache=False, **kwargs)
    assert torch.equal(batched.sequences, no_cache.sequences)
    for a, b in zip(batched.pred_boxes, no_cache.pred_boxes):
        assert torch.allclose(a, b, atol=1e-6)


def test_feedback_changes_logits(tiny_model):
    """Negative control: dropping the decoded box from the `<vis>` embedding changes what follows."""
    ids, attention, pixels, boxes = _prompt()
    out = _generate(tiny_model, ids, attention, pixels, boxes)
    r, p = 0, int(out.vis_positions[0][0])
    seq = out.sequences[r : r + 1]
    with_box = torch.full((1, 4, 4), NAN)
    with_box[0, 0], with_box[0, 1] = boxes[0, 0], out.pred_boxes[0][0]
    without = with_box.clone()
    without[0, 1] = NAN
    a = tiny_model(input_ids=seq, pixel_values=pixels[:1], vis_boxes=with_box).logits
    b = tiny_model(input_ids=seq, pixel_values=pixels[:1], vis_boxes=without).logits
    # before p only float noise (the box encoder runs on 2 rows vs 1); from p on the box matters
    assert (a[0, :p] - b[0, :p]).abs().max() < 1e-4 and (a[0, p:] - b[0, p:]).abs().amax(-1).min() > 1e-3


def test_plain_call_returns_tensor(tiny_model):
    ids, attention, pixels, boxes = _prompt()
    out = tiny_model.generate(input_ids=ids, attention_mask=attention, pixel_values=pixels, max_new_tokens=4)
    assert isinstance(out, torch.Tensor) and out.shape == (2, PROMPT + 4)


def test_no_vis_and_text_only(tiny_model):
    ids, attention, pixels, boxes = _prompt()
    out = _generate(tiny_model, ids, attention, pixels, boxes, bad_words_ids=[[VIS]])
    assert [b.shape for b in out.pred_boxes] == [(0, 4), (0, 4)]
    assert [m.shape for m in out.pred_masks] == [(0, 16, 16), (0, 16, 16)]
    text_ids, text_attention, _, text_boxes = _prompt(image=False)
    out = _generate(tiny_model, text_ids, text_attention, None, text_boxes)
    assert out.pred_masks == [None, None] and sum(len(b) for b in out.pred_boxes) > 0
    assert _teacher_forced(tiny_model, out, text_ids, text_attention, None, text_boxes)[0] < 1e-6


def test_a_step_without_a_new_vis_runs_no_box_encoder(tiny_model):
    """Decode steps feed a box only when some row's newest token is `<vis>`; otherwise the family forward runs plain
    (the box encoder ran on every step's all-NaN slot before)."""
    ids, attention, pixels, boxes = _prompt()
    calls = []
    handle = tiny_model.box_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        _generate(tiny_model, ids, attention, pixels, boxes, bad_words_ids=[[VIS]])
    finally:
        handle.remove()
    assert calls == [(1, 4)]  # the prompt's one box, at prefill


def test_image_token_is_never_sampled(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight[IMAGE] = tiny_model.model.language_model.norm.weight * 50
    ids, attention, pixels, boxes = _prompt()
    for kwargs in ({}, {"do_sample": True}, {"num_beams": 2}):
        out = _generate(tiny_model, ids, attention, pixels, boxes, **kwargs)
        assert not (out.sequences[:, PROMPT:] == IMAGE).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt_lookup_num_tokens": 2}, "prompt-lookup"),
        ({"cache_implementation": "paged"}, "paged"),
        ({"prefill_chunk_size": 4}, "chunked prefill"),
    ],
)
def test_unsupported_modes_raise(tiny_model, kwargs, match):
    ids, attention, pixels, boxes = _prompt()
    with pytest.raises(ValueError, match=match):
        _generate(tiny_model, ids, attention, pixels, boxes, **kwargs)


def test_decode_steps_do_not_revalidate_the_boxes_generate_decoded(tiny_model, monkeypatch):
    """The boxes a decode step feeds back come from the model's own decoder: only the prompt's are validated (a
    host sync and ~20 small ops per step before); the same tensors from a caller are still checked."""
    import perceptiongpt.region_inputs as region_inputs

    checked = []
    full_check = region_inputs._extra_slots
    monkeypatch.setattr(region_inputs, "_extra_slots", lambda *a: checked.append(1) or full_check(*a))

    def force_vis(input_ids, scores):
        return torch.where(torch.arange(scores.shape[-1]) == VIS, 0.0, -float("inf")).expand_as(scores).clone()

    ids, attention, pixels, boxes = _prompt()
    out = _generate(tiny_model, ids, attention, pixels, boxes, logits_processor=[force_vis])
    assert sum(len(b) for b in out.pred_boxes) == 2 * 8 and checked == [1]  # the prefill's prompt boxes only
    with pytest.raises(ValueError, match="normalized xyxy"):
        tiny_model(input_ids=ids[:, -1:], vis_boxes=torch.full((2, 1, 4), 2.0))


def test_sequences_edited_inside_generate_raise_a_clear_error(tiny_model):
    """A processor that rewrites the newest token in place breaks the hooks' invariant (every generated token was
    predicted by the previous step's forward): a RuntimeError that says so, not an internal KeyError."""

    def rewrite_then_force_vis(input_ids, scores):
        if input_ids.shape[1] > PROMPT:
            input_ids[:, -1] = 5 if int(input_ids[0, -1]) != 5 else 6
            scores = torch.full_like(scores, -float("inf"))
            scores[:, VIS] = 0.0
        return scores

    ids, attention, pixels, boxes = _prompt()
    with pytest.raises(RuntimeError, match=r"sample 0, generated tokens \[\d+\]\).*changed outside generate"):
        _generate(tiny_model, ids, attention, pixels, boxes, logits_processor=[rewrite_then_force_vis])


def test_assisted_decoding_raises(tiny_model):
    ids, attention, pixels, boxes = _prompt()
    with pytest.raises(ValueError, match="assisted decoding"):
        _generate(tiny_model, ids, attention, pixels, boxes, assistant_model=tiny_model)


def test_peft_generate_returns_boxes(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids, attention, pixels, boxes = _prompt()
    out = _generate(peft_model, ids, attention, pixels, boxes)
    assert sum(len(b) for b in out.pred_boxes) >= 2
    assert _teacher_forced(peft_model, out, ids, attention, pixels, boxes)[0] < 1e-6


BOX_HEADS = {
    "bins": {"decoder_type": "bins"},
    "query-vision": {"decoder_type": "query", "query_source": "vision"},
    "query-llm": {"decoder_type": "query", "query_source": "llm"},
    "query-refine": {"decoder_type": "query", "query_source": "llm", "query_refine_layout": 2},
    "mask": {"decoder_type": "mask"},
}


@pytest.mark.parametrize("mode", ["greedy", "greedy_no_cache", "beam_n2", "sample_n2"])
@pytest.mark.parametrize("head", sorted(BOX_HEADS))
def test_every_box_design_generates_its_teacher_forced_boxes(head, mode):
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(
        PerceptionGPTConfig.from_preset("tiny", box_head_config=BOX_HEADS[head])
    ).eval()
    with torch.no_grad():  # non-trivial heads, and `<vis>` likely enough to be generated
        for name, parameter in model.named_parameters():
            if name.startswith(("box_decoder", "mask_decoder")):
                parameter.add_(torch.randn_like(parameter) * 0.3)
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    ids, attention, pixels, boxes = _prompt()
    out = _generate(model, ids, attention, pixels, boxes, **MODES[mode])
    err, count, mask_err = _teacher_forced(model, out, ids, attention, pixels, boxes)
    # the perturbed mask decoder amplifies the cached-vs-full float32 rounding of the hidden state (~1e-7)
    assert count >= 2 and err < 1e-5 and mask_err < 5e-5, (count, err, mask_err)


def _two_image_prompt():
    """Row 0: two images (different pixels), then a question; row 1: one image. No prompt `<vis>`."""
    ids, _ = make_batch(2, 40, vis_at=((), ()), seed=1)
    ids[0, 20:36] = IMAGE
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # row 0: 0, 1; row 1: 2
    return ids, torch.ones_like(ids), pixels, torch.full((2, 1, 4), NAN)


@pytest.mark.parametrize("mode", ["greedy", "beam_n2"])
def test_a_generated_vis_reads_the_latest_image_before_it(mode):
    torch.manual_seed(0)
    config = PerceptionGPTConfig.from_preset("tiny", box_head_config={"decoder_type": "query", "query_source": "llm"})
    model = PerceptionGPTForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    ids, attention, pixels, boxes = _two_image_prompt()
    out = _generate(model, ids, attention, pixels, boxes, **MODES[mode])
    err, count, mask_err = _teacher_forced(model, out, ids, attention, pixels, boxes)
    assert count >= 2 and err < 1e-6 and mask_err < 1e-5, (count, err, mask_err)


def test_identical_prompts_with_different_images_get_their_own_masks(tiny_model):
    ids, attention, pixels, boxes = _prompt(pad_row1=0)
    ids[1] = ids[0]
    out = _generate(tiny_model, ids, attention, pixels, boxes)
    n = min(len(out.pred_masks[0]), len(out.pred_masks[1]))
    assert n >= 1 and not torch.allclose(out.pred_masks[0][:n], out.pred_masks[1][:n])
    err, _, mask_err = _teacher_forced(tiny_model, out, ids, attention, pixels, boxes)
    assert err < 1e-6 and mask_err < 1e-5


def test_generate_from_inputs_embeds_alone_equals_input_ids(tiny_model):
    ids, _ = make_batch(2, 12, vis_at=((), ()), image=False)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    reference = tiny_model.generate(input_ids=ids, **kwargs)
    out = tiny_model.generate(inputs_embeds=tiny_model.get_input_embeddings()(ids), **kwargs)
    assert out.prompt_length == 0 and torch.equal(out.sequences, reference.sequences[:, ids.shape[1] :])
    assert sum(len(boxes) for boxes in out.pred_boxes) >= 1
    for found, expected in zip(out.pred_boxes, reference.pred_boxes):
        torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="`vis_boxes`/`vis_masks` need the prompt's `input_ids`"):
        tiny_model.generate(inputs_embeds=tiny_model.get_input_embeddings()(ids), vis_boxes=torch.zeros(2, 1, 4))


def test_generate_without_inputs_starts_from_bos(tiny_model):
    bos = torch.tensor([[tiny_model.generation_config.bos_token_id]])
    with torch.no_grad():  # `<vis>` generated right after BOS
        tiny_model.lm_head.weight[VIS] = tiny_model(input_ids=bos).last_hidden_state[0, -1] * 10
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    out = tiny_model.generate(**kwargs)
    reference = tiny_model.generate(input_ids=bos, **kwargs)
    assert out.prompt_length == 1 and torch.equal(out.sequences, reference.sequences)
    assert len(out.pred_boxes[0]) >= 1 and torch.equal(out.pred_boxes[0], reference.pred_boxes[0])


@pytest.mark.parametrize("prompt_length", [24, 40])
def test_records_are_keyed_by_the_generated_suffix_and_masks_decoded_once(tiny_model, prompt_length, monkeypatch):
    ids, pixels = make_batch(2, prompt_length, vis_at=((), ()))
    seen, calls = [], []
    original = tiny_model.mask_decoder.forward
    monkeypatch.setattr(tiny_model.mask_decoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    collect = tiny_model._collect_generated_regions
    monkeypatch.setattr(
        tiny_model, "_collect_generated_regions", lambda seqs, st: seen.append(st) or collect(seqs, st)
    )
    out = _generate(tiny_model, ids, torch.ones_like(ids), pixels, torch.full((2, 1, 4), NAN), num_beams=3)
    assert len(calls) == 1  # one mask-decoder pass, for the returned rows only
    records = seen[0].records
    assert len(records) >= 2 and all(len(key) <= 8 * 8 for _, key in records)  # int64 generated tokens only
    assert all(record[1].shape == (tiny_model.config.text_config.hidden_size,) for record in records.values())
    # no record keeps a whole step's logits or hidden states alive: the storages they hold are exactly their bytes
    tensors = [tensor for record in records.values() for tensor in record]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    assert sum(storages.values()) == sum(tensor.nbytes for tensor in tensors)
    no_boxes = torch.full((2, 1, 4), NAN)
    err, count, mask_err = _teacher_forced(tiny_model, out, ids, torch.ones_like(ids), pixels, no_boxes)
    assert count >= 2 and err < 1e-6 and mask_err < 1e-5


class _ForceVis(LogitsProcessor):
    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, VIS] = 0.0
        return forced


def test_every_row_decoding_at_every_step_keeps_no_step_outputs_alive(tiny_model, monkeypatch):
    """A search without beams where every row decodes a `<vis>` at every step takes the step's states whole (no
    gather): the records must still own only their bytes, and match teacher forcing."""
    ids, attention, pixels, boxes = _prompt(pad_row1=0)
    seen, collect = [], tiny_model._collect_generated_regions
    monkeypatch.setattr(
        tiny_model, "_collect_generated_regions", lambda seqs, st: seen.append(st) or collect(seqs, st)
    )
    out = _generate(tiny_model, ids, attention, pixels, boxes, logits_processor=LogitsProcessorList([_ForceVis()]))
    assert [len(row) for row in out.pred_boxes] == [8, 8]
    tensors = [tensor for record in seen[0].records.values() for tensor in record]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    assert sum(storages.values()) == sum(tensor.nbytes for tensor in tensors)
    err, count, mask_err = _teacher_forced(tiny_model, out, ids, attention, pixels, boxes)
    assert count == 16 and err < 1e-6 and mask_err < 1e-5


@pytest.mark.parametrize("image", [False, True])
def test_continuing_from_a_returned_cache_equals_one_generate(tiny_model, image):
    """Multi-turn: the first call ends on a generated `<vis>` (never fed back yet); the second gets the cache and the
    boxes of every `<vis>` so far, and must give what one uninterrupted generate gives, masks included."""
    ids, pixels = make_batch(1, 22, vis_at=((20,),), image=image)
    prompt_box = torch.tensor([[[0.1, 0.1, 0.5, 0.5]]])
    kwargs = dict(do_sample=False, return_dict_in_generate=True, **({"pixel_values": pixels} if image else {}))
    full = tiny_model.generate(input_ids=ids, vis_boxes=prompt_box, max_new_tokens=8, **kwargs)
    stop = int((full.sequences[0, 22:] == VIS).nonzero()[0]) + 1  # the first call ends on the first generated `<vis>`
    first = tiny_model.generate(input_ids=ids, vis_boxes=prompt_box, max_new_tokens=stop, **kwargs)
    assert first.sequences[0, -1] == VIS and torch.equal(first.sequences[0], full.sequences[0, : 22 + stop])
    boxes = torch.cat([prompt_box[0], first.pred_boxes[0]])[None]  # (1, 1 + n, 4): prompt, then generated
    second = tiny_model.generate(
        input_ids=first.sequences, cache=first.cache, vis_boxes=boxes, max_new_tokens=8 - stop, **kwargs
    )
    assert torch.equal(second.sequences, full.sequences)
    done = len(first.pred_boxes[0])
    assert len(second.pred_boxes[0]) >= 1 and len(second.pred_boxes[0]) + done == len(full.pred_boxes[0])
    torch.testing.assert_close(second.pred_boxes[0], full.pred_boxes[0][done:], rtol=1e-6, atol=1e-6)
    if image:
        torch.testing.assert_close(second.pred_masks[0], full.pred_masks[0][done:], rtol=1e-5, atol=1e-5)
    else:
        assert second.pred_masks[0] is None


def test_continuing_a_head_that_reads_llm_image_states_raises():
    torch.manual_seed(0)
    config = PerceptionGPTConfig.from_preset("tiny", box_head_config={"decoder_type": "query", "query_source": "llm"})
    model = PerceptionGPTForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    ids, pixels = make_batch(1, 22, vis_at=((),))
    kwargs = dict(do_sample=False, return_dict_in_generate=True, pixel_values=pixels)
    first = model.generate(input_ids=ids, max_new_tokens=2, **kwargs)
    boxes = first.pred_boxes[0][None]
    with pytest.raises(ValueError, match="reads the LLM's states at the image tokens"):
        model.generate(input_ids=first.sequences, cache=first.cache, vis_boxes=boxes, max_new_tokens=3, **kwargs)
    with pytest.raises(ValueError, match=r"`image_states` must be \(B, g\*g, D\) with one row per input sample"):
        model.generate(input_ids=first.sequences, image_states=first.image_states[0], max_new_tokens=1, **kwargs)


def test_a_head_that_reads_llm_image_states_continues_with_them():
    """Passing back `image_states` continues a cache: the same tokens and boxes as one uninterrupted generate."""
    torch.manual_seed(0)
    config = PerceptionGPTConfig.from_preset("tiny", box_head_config={"decoder_type": "query", "query_source": "llm"})
    model = PerceptionGPTForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    ids, pixels = make_batch(1, 22, vis_at=((),))
    kwargs = dict(do_sample=False, return_dict_in_generate=True, pixel_values=pixels)
    full = model.generate(input_ids=ids, max_new_tokens=8, **kwargs)
    stop = int((full.sequences[0, 22:] == VIS).nonzero()[0]) + 1
    first = model.generate(input_ids=ids, max_new_tokens=stop, **kwargs)
    assert first.image_states.shape == (1, 16, config.text_config.hidden_size)
    second = model.generate(
        input_ids=first.sequences,
        cache=first.cache,
        vis_boxes=first.pred_boxes[0][None],
        image_states=first.image_states,
        max_new_tokens=8 - stop,
        **kwargs,
    )
    assert torch.equal(second.sequences, full.sequences) and len(second.pred_boxes[0]) >= 1
    torch.testing.assert_close(second.pred_boxes[0], full.pred_boxes[0][len(first.pred_boxes[0]) :], rtol=0, atol=1e-6)


def test_generation_state_keys_each_step_once_and_prefixes_as_rows():
    """The sequences a step feeds are keyed before its forward and after it: one host copy for both. A prefix of a
    returned row has the key of that row at the step that ended on it."""
    from perceptiongpt.generation_state_perceptiongpt import PerceptionGenerationState

    state = PerceptionGenerationState(batch_size=2, prompt_length=2)
    sequences = torch.tensor([[1, 2, VIS, 7, VIS], [1, 2, 8, VIS, 9]])

    def key(sample, prefix):  # the key format: the sample and the tokens after the 2-token prompt
        return sample, prefix[2:].numpy().tobytes()

    keys, before = state.row_keys(sequences)
    assert state.row_keys(sequences)[0] is keys  # not recomputed
    assert state.newest_tokens(sequences).tolist() == [VIS, 9] and state.row_keys(sequences)[0] is keys
    again = state.row_keys(sequences.clone())  # another step's tensor: keyed afresh, to the same keys
    assert again[0] is not keys and again == (keys, before)
    assert keys == [key(0, sequences[0]), key(1, sequences[1])]
    assert before == [key(0, sequences[0, :-1]), key(1, sequences[1, :-1])]
    assert state.prefix_keys(0, sequences[0], [2, 4]) == [key(0, sequences[0, :3]), keys[0]]


def test_modality_suppression_masks_the_scores_only(tiny_model):
    """generate() never samples an image placeholder: the processed scores hold -inf there, as transformers' own
    `SuppressTokensLogitsProcessor` gives, while the raw logits (`output_logits`) keep their values (the processor
    works on a copy, with its mask built once per generate())."""
    from transformers import SuppressTokensLogitsProcessor

    from perceptiongpt.generation_perceptiongpt import SuppressModalityTokens

    suppressed = tiny_model.config.suppressed_token_ids
    vocab_size = tiny_model.get_output_embeddings().weight.shape[0]
    scores = torch.randn(3, vocab_size)
    kept = scores.clone()
    processed = SuppressModalityTokens(suppressed, vocab_size)(None, scores)
    assert torch.equal(processed, SuppressTokensLogitsProcessor(suppressed)(None, kept))
    assert torch.equal(scores, kept) and processed[:, suppressed].eq(-float("inf")).all()
    ids, attention, pixels, boxes = _prompt()
    out = _generate(tiny_model, ids, attention, pixels, boxes, output_scores=True, output_logits=True)
    for raw, final in zip(out.logits, out.scores):
        assert torch.isfinite(raw).all() and final[:, suppressed].eq(-float("inf")).all()

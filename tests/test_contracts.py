"""Contracts that transformers' own suites check for native models (written here, not copied), and silent failure
paths turned into clear errors."""

import pytest
import torch
from conftest import VIS, make_batch

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.configuration_perceptiongpt import MaskHeadConfig


def _labels(ids, start=19):
    labels = torch.full_like(ids, -100)
    labels[:, start:] = ids[:, start:]
    return labels


def test_config_builds_with_its_own_defaults_and_round_trips():
    config = PerceptionGPTConfig()
    assert config.text_config.vocab_size == 32064  # llava-1.5-7b-hf's padded vocabulary
    assert config.image_token_id < config.text_config.vocab_size and config.vis_token_id < 32064
    again = PerceptionGPTConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_return_dict_false_gives_tuples(tiny_model):
    ids, pixels = make_batch(vis_at=((20,), (20, 25)))
    nan = float("nan")
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [nan] * 4], [[0.2, 0.0, 0.6, 0.4]] * 2])
    with torch.no_grad():
        as_dict = tiny_model(input_ids=ids, pixel_values=pixels, labels=_labels(ids), vis_boxes=boxes)
        as_tuple = tiny_model(
            input_ids=ids, pixel_values=pixels, labels=_labels(ids), vis_boxes=boxes, return_dict=False
        )
        features = tiny_model.model.get_image_features(pixel_values=pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.loss)
    assert torch.equal(as_tuple[1], as_dict.logits)
    assert isinstance(features, tuple)


def test_past_key_values_alias_continues_like_cache(tiny_model):
    ids, pixels = make_batch(batch_size=1, vis_at=((),))
    with torch.no_grad():
        prefix = tiny_model(input_ids=ids[:, :23], pixel_values=pixels, use_cache=True)
        full = tiny_model(input_ids=ids[:, :24], pixel_values=pixels).logits[:, -1]
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = tiny_model(input_ids=ids[:, 23:24], past_key_values=prefix.cache, use_cache=True)
    assert step.cache.get_seq_length() == 24
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)


def test_labels_with_vis_but_no_boxes_raise(tiny_model):
    ids, pixels = make_batch(vis_at=((20,), (20, 25)))
    with pytest.raises(ValueError, match="`labels` supervise 3 `<vis>` tokens but `vis_boxes` is None"):
        tiny_model(input_ids=ids, pixel_values=pixels, labels=_labels(ids))
    text_only = ids.masked_fill(ids == VIS, 50)  # no `<vis>` target: an lm-only batch is fine
    assert tiny_model(input_ids=text_only, pixel_values=pixels, labels=_labels(text_only)).loss > 0


def test_training_forward_never_returns_a_cache(tiny_model):
    ids, pixels = make_batch(vis_at=((20,), (20, 25)))
    nan = float("nan")
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [nan] * 4], [[0.2, 0.0, 0.6, 0.4]] * 2])
    out = tiny_model(input_ids=ids, pixel_values=pixels, labels=_labels(ids), vis_boxes=boxes, use_cache=True)
    assert out.cache is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "swishy", "`hidden_act` must be one of .*'gelu'.*got 'swishy'"),
        ("hidden_size", 30, "`hidden_size` must be divisible by 4 .*got 30"),
    ],
)
def test_mask_head_config_validates(field, value, message):
    kwargs = {"hidden_size": 32, "num_attention_heads": 2, field: value}
    with pytest.raises(ValueError, match=message):
        MaskHeadConfig(**kwargs)


def test_default_model_class_builds_from_default_sized_config_on_meta():
    with torch.device("meta"):
        model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig())
    assert model.get_input_embeddings().weight.shape[0] == 32064


def test_auto_model_gives_the_base_model(tiny_config):
    from transformers import AutoModel

    from perceptiongpt import PerceptionGPTModel

    assert type(AutoModel.from_config(tiny_config)) is PerceptionGPTModel


def test_custom_generate_is_refused(tiny_model):
    ids, pixels = make_batch(batch_size=1, vis_at=((),))
    with pytest.raises(ValueError, match="custom generation loop .*`custom_generate`"):
        tiny_model.generate(input_ids=ids, pixel_values=pixels, custom_generate="org/loop", max_new_tokens=2)


def test_post_process_cuts_the_prompt_without_scores(tiny_model):
    """Without output_scores the prompt length comes from the generate output, so prompt `<vis>` are never
    numbered as answers."""
    from perceptiongpt.processing.processing_perceptiongpt import build_processor
    from perceptiongpt.processing.tokenization_factory import build_tokenizer

    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    ids, pixels = make_batch(batch_size=1, vis_at=((20,),))
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5]]])
    out = tiny_model.generate(
        input_ids=ids, pixel_values=pixels, vis_boxes=boxes, max_new_tokens=4, return_dict_in_generate=True
    )
    assert out.scores is None and out.prompt_length == ids.shape[1]
    default = processor.post_process_generation(out, [(16, 16)], vis_marker="[obj{index}]")[0]
    explicit = processor.post_process_generation(out, [(16, 16)], prompt_length=30, vis_marker="[obj{index}]")[0]
    assert default["text"] == explicit["text"] and len(default["boxes"]) == len(out.pred_boxes[0])


@pytest.mark.parametrize("box_head", [{"decoder_type": "mlp"}, {"decoder_type": "query", "query_source": "llm"}])
def test_fullgraph_claim_holds_for_generate_steps(box_head):
    """`_can_compile_fullgraph` (inherited from LLaVA) is true: generate's decode steps, `<vis>` feedback included,
    trace as one graph and give the eager boxes (the prefill, which reads masks and image states, runs eagerly)."""
    from transformers import CompileConfig

    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny", box_head_config=box_head))
    model.eval()
    with torch.no_grad():  # `<vis>` likely enough to be generated and fed back
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    assert model._can_compile_fullgraph
    ids, pixels = make_batch(vis_at=((20,), ()))
    kwargs = dict(input_ids=ids[:, :22], pixel_values=pixels, max_new_tokens=5, do_sample=False)
    kwargs.update(return_dict_in_generate=True, cache_implementation="static")
    eager = model.generate(**kwargs)
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators by default
    compiled = model.generate(**kwargs, compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # the steps really ran compiled (fullgraph: a graph break raises)
    assert torch.equal(compiled.sequences, eager.sequences) and sum(len(b) for b in compiled.pred_boxes) >= 2
    for found, expected in zip(compiled.pred_boxes, eager.pred_boxes):
        torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)


def _attention_choices(model):
    """{attention-module class: the implementations its config holds}, over every module with an attention config."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if type(module).__name__.endswith("Attention") and config is not None:
            found.setdefault(type(module).__name__, set()).add(config._attn_implementation)
    return found


def test_the_attention_implementation_reaches_the_mask_decoder():
    """An eager model is eager everywhere (the mask decoder's SAM layers were hard-coded to sdpa), an sdpa one sdpa,
    and `set_attn_implementation` switches them too; both give the same masks."""
    config = PerceptionGPTConfig.from_preset("tiny")
    config._attn_implementation = {"": "eager", **{key: "eager" for key in config.sub_configs}}
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(config).eval()
    assert set().union(*_attention_choices(model).values()) == {"eager"} and "SamAttention" in _attention_choices(
        model
    )
    hidden, features = torch.randn(3, 32), torch.randn(3, 16, 32)
    with torch.no_grad():
        eager = model.mask_decoder(hidden, features)
        model.set_attn_implementation("sdpa")
        assert _attention_choices(model)["SamAttention"] == {"sdpa"}
        torch.testing.assert_close(model.mask_decoder(hidden, features), eager, rtol=1e-4, atol=1e-5)
    model.set_attn_implementation("eager")
    assert _attention_choices(model)["SamAttention"] == {"eager"}


def test_the_box_decoder_is_built_in_fp32_under_a_half_default_dtype(tiny_config):
    """`_keep_in_fp32_modules_strict` lists the box decoder: `from_config(dtype=bf16)` must not build it in bf16."""
    for head in ("mlp", "query"):
        config = PerceptionGPTConfig.from_preset("tiny", box_head_config={"decoder_type": head})
        model = PerceptionGPTForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        assert {d for n, d in dtypes.items() if n.startswith("box_decoder.")} == {torch.float32}, head
        assert dtypes["box_encoder.mlp.0.weight"] == torch.bfloat16
        ids, pixels = make_batch(vis_at=((20,), ()))
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, pixel_values=pixels.bfloat16(), max_new_tokens=2, return_dict_in_generate=True
            )
        assert all(boxes.dtype == torch.float32 for boxes in out.pred_boxes)


def test_image_hidden_states_are_returned_only_when_asked(tiny_model):
    _, pixels = make_batch()
    with torch.no_grad():
        plain = tiny_model.model.get_image_features(pixels, return_dict=True)
        full = tiny_model.model.get_image_features(pixels, output_hidden_states=True, return_dict=True)
    assert (
        plain.hidden_states is None
        and len(full.hidden_states) == tiny_model.config.vision_config.num_hidden_layers + 1
    )
    for a, b in zip(plain.pooler_output, full.pooler_output):
        assert torch.equal(a, b)


def test_every_family_lists_generation_mixin_among_its_bases():
    from transformers import GenerationMixin

    import perceptiongpt

    for name in perceptiongpt.__all__:
        if name.endswith("ForConditionalGeneration"):
            assert GenerationMixin in getattr(perceptiongpt, name).__bases__, name


def test_the_forward_advertises_the_native_kwargs_and_returns_attentions():
    """transformers reads `**kwargs: Unpack[TransformersKwargs]` to know a model returns attentions: the advertised
    signature keeps the native annotation, and an eager model returns one attention map per text layer."""
    import inspect

    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    import perceptiongpt

    pairs = [
        (perceptiongpt.PerceptionGPTForConditionalGeneration, LlavaForConditionalGeneration),
        (perceptiongpt.PerceptionGPTQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration),
    ]
    for ours, native in pairs:
        annotation = inspect.signature(ours.forward).parameters["kwargs"].annotation
        assert (
            annotation == inspect.signature(native.forward).parameters["kwargs"].annotation != inspect.Parameter.empty
        )
    config = PerceptionGPTConfig.from_preset("tiny")
    config._attn_implementation = "eager"
    model = PerceptionGPTForConditionalGeneration(config).eval()
    ids, pixels = make_batch()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    assert len(out.attentions) == config.text_config.num_hidden_layers
    assert out.attentions[0].shape == (2, config.text_config.num_attention_heads, ids.shape[1], ids.shape[1])

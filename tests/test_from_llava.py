import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration, from_llava


def _tiny_llava():
    tiny = PerceptionGPTConfig.from_preset("tiny")
    config = LlavaConfig(
        vision_config=tiny.vision_config.to_dict(),
        text_config=tiny.text_config.to_dict(),
        image_token_id=4,
        image_seq_length=16,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_from_llava_keeps_tensors_and_logits(tmp_path):
    llava = _tiny_llava()
    model = from_llava(llava).eval()
    assert isinstance(model, PerceptionGPTForConditionalGeneration)
    assert model.config.vis_token_id == 262 and model.config.text_config.vocab_size == 263
    source = llava.state_dict()
    target = model.state_dict()
    for key, tensor in source.items():
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(target[key][:262], tensor), key
            assert torch.allclose(target[key][262], tensor.mean(0))
        else:
            assert torch.equal(target[key], tensor), key
    ids = torch.randint(10, 200, (2, 24))
    ids[:, 2:18] = 4
    pixels = torch.randn(2, 3, 16, 16)
    expected = llava(input_ids=ids, pixel_values=pixels).logits
    got = model(input_ids=ids, pixel_values=pixels).logits[..., :262]
    assert (got - expected).abs().max() < 1e-5
    # and from a saved folder
    llava.save_pretrained(tmp_path)
    again = from_llava(str(tmp_path)).eval()
    assert (again(input_ids=ids, pixel_values=pixels).logits[..., :262] - expected).abs().max() < 1e-5


def test_from_llava_adds_vis_to_tokenizer():
    from perceptiongpt.processing.tokenization_factory import build_tokenizer

    tokenizer = build_tokenizer("char")
    model = from_llava(_tiny_llava(), tokenizer=tokenizer, vis_token="<region>")
    vis_id = tokenizer.convert_tokens_to_ids("<region>")
    assert model.config.vis_token_id == vis_id == 262
    assert tokenizer.decode([vis_id]) == "<region>"


def test_from_llava_rejects_other_layouts():
    with pytest.raises(ValueError, match="vision_fusion_layers"):
        from_llava(_tiny_llava(), vision_fusion_layers=[9])


def test_from_llava_assigns_the_pretrained_tensors_and_initializes_only_the_new_ones():
    llava = _tiny_llava()
    model = from_llava(llava)
    source = llava.state_dict()
    target = model.state_dict()
    # built on the meta device and loaded with assign=True: the pretrained tensors are shared, never copied
    shared = [key for key in source if "embed_tokens" not in key and key != "lm_head.weight"]
    assert all(target[key].data_ptr() == source[key].data_ptr() for key in shared)
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    fresh = PerceptionGPTForConditionalGeneration(model.config)
    for name, buffer in fresh.named_buffers():  # non-persistent buffers are recomputed, not left empty
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in model.named_parameters():  # the heads get the init scheme of a fresh model
        if name.startswith(("box_decoder.", "mask_decoder.", "model.box_encoder", "model.mask_encoder")):
            expected = fresh_parameters[name]
            assert torch.isfinite(parameter).all() and bool(parameter.any()) == bool(expected.any()), name
            if parameter.numel() > 64 and expected.std() > 0:
                assert 0.5 < (parameter.std() / expected.std()).item() < 2, name


def test_from_llava_gives_vis_the_mean_row_inside_a_padded_vocabulary():
    """llava-1.5-hf has 32,002 tokens and 32,064 embedding rows: `<vis>` takes a padding row, which must become the
    mean of the real tokens' rows, not stay whatever the padding held."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {word: i for i, word in enumerate(["<unk>", "a", "b", "c", "d", "e", "f", "g", "h", "i"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<unk>")))
    llava = _tiny_llava()  # 262 rows: 252 of them padding past this 10-token tokenizer
    with torch.no_grad():
        llava.get_input_embeddings().weight[10:] = 7.0
    model = from_llava(llava, tokenizer=tokenizer)
    vis = model.config.vis_token_id
    assert vis == 10 and model.config.text_config.vocab_size == 262  # no new row: `<vis>` takes a padding row
    rows = llava.get_input_embeddings().weight[:10]
    torch.testing.assert_close(model.get_input_embeddings().weight[vis], rows.mean(0))


def test_from_base_wraps_the_llava_processor():
    from PIL import Image
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from perceptiongpt import PerceptionGPTProcessor, from_base
    from perceptiongpt.processing.tokenization_factory import build_tokenizer

    image_processor = LlavaImageProcessorPil(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    image_processor.do_center_crop = False
    llava_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer("char"),
        patch_size=4,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    model, processor = from_base(_tiny_llava(), processor=llava_processor)
    assert type(processor) is PerceptionGPTProcessor and processor.vis_token_id == model.config.vis_token_id == 5
    assert processor.patch_size == 4 and "{% generation %}" in processor.chat_template  # the collator's labels
    inputs = processor(
        images=[Image.new("RGB", (32, 16))],
        text=["USER: <image>\n<vis> ASSISTANT:"],
        boxes=[[[0, 0, 16, 8]]],
        return_tensors="pt",
    )
    assert (inputs["input_ids"] == 4).sum() == 16
    torch.testing.assert_close(inputs["vis_boxes"][0, 0], torch.tensor([0.0, 0.0, 0.5, 0.5]))  # squashed to 16x16
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_from_base_on_a_llava_folder_keeps_the_processor_settings(tmp_path):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from perceptiongpt import from_base
    from perceptiongpt.processing.tokenization_factory import build_tokenizer

    image_processor = LlavaImageProcessorPil(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer("char"),
        patch_size=4,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    ).save_pretrained(tmp_path)
    _tiny_llava().save_pretrained(tmp_path)
    model, processor = from_base(str(tmp_path))
    assert (processor.patch_size, processor.num_additional_image_tokens) == (4, 1)
    inputs = processor(
        images=[torch.zeros(16, 16, 3, dtype=torch.uint8).numpy()],
        text=["USER: <image>\n<vis>"],
        boxes=[[[0, 0, 8, 8]]],
        return_tensors="pt",
    )
    assert (inputs["input_ids"] == 4).sum() == 16 == model.config.image_seq_length

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

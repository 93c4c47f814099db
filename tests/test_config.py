import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from perceptiongpt import BoxHeadConfig, MaskHeadConfig, PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.configuration_perceptiongpt import SPECIAL_TOKEN_IDS


def test_presets_and_round_trip(tmp_path):
    for name in ("tiny", "demo", "paper"):
        config = PerceptionGPTConfig.from_preset(name)
        assert isinstance(config.box_head_config, BoxHeadConfig)
        assert isinstance(config.mask_head_config, MaskHeadConfig)
        config.save_pretrained(tmp_path / name)
        loaded = PerceptionGPTConfig.from_pretrained(tmp_path / name)
        assert loaded.to_dict() == config.to_dict()
        assert type(loaded.mask_head_config) is MaskHeadConfig


def test_paper_preset_matches_paper():
    config = PerceptionGPTConfig.from_preset("paper")
    assert config.fuse_llm_features and config.region_embedding_mode == "replace"
    assert config.vision_fusion_layers == list(range(24))  # embeddings + layers 1..23, the last excluded
    assert (config.box_head_config.hidden_size, config.box_head_config.num_layers) == (512, 3)
    mask = config.mask_head_config
    assert (mask.hidden_size, mask.num_hidden_layers, mask.num_attention_heads, mask.mlp_dim) == (1024, 2, 8, 2048)
    assert mask.mask_size == 256
    weights = [
        config.lm_loss_weight,
        config.box_l1_weight,
        config.box_giou_weight,
        config.mask_dice_weight,
        config.mask_bce_weight,
    ]
    assert weights == [1.0] * 5
    assert config.text_config.hidden_size == 4096 and config.vision_config.image_size == 336


def test_paper_preset_counts_on_meta_device():
    config = PerceptionGPTConfig.from_preset("paper")
    with torch.device("meta"):
        model = PerceptionGPTForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    heads = sum(
        p.numel()
        for n, p in model.named_parameters()
        if any(k in n for k in ("box_encoder", "box_decoder", "mask_encoder", "mask_decoder", "feature_fusion"))
    )
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 7.0e9 < total < 7.2e9  # LLaVA-1.5-7B (7.06B) plus heads
    assert 30e6 < heads < 60e6  # the paper's heads are ~49M


def test_tiny_ids_match_tokenizer_contract():
    config = PerceptionGPTConfig.from_preset("tiny")
    assert config.image_token_id == SPECIAL_TOKEN_IDS["<image>"] and config.vis_token_id == SPECIAL_TOKEN_IDS["<vis>"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"vision_fusion_layers": [7]}, "vision_fusion_layers"),
        ({"vision_fusion_layers": []}, "vision_fusion_layers"),
        ({"box_l1_weight": -1.0}, "box_l1_weight"),
        ({"box_giou_weight": float("nan")}, "box_giou_weight"),
        ({"vis_token_id": 100000}, "vis_token_id"),
        ({"vis_token_id": 4}, "must differ"),
        ({"mask_head_config": {"mask_size": 0}}, "mask_size"),
        ({"mask_head_config": {"hidden_size": 36, "num_attention_heads": 4}}, "num_attention_heads"),
        ({"mask_head_config": {"hidden_size": 30}}, "divisible by 4"),
        ({"box_head_config": {"num_layers": 0}}, "num_layers"),
    ],
)
def test_invalid_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        PerceptionGPTConfig.from_preset("tiny", **overrides)


def test_invalid_types_and_names_raise():
    with pytest.raises(StrictDataclassFieldValidationError, match="region_embedding_mode.*'replace', 'add'.*concat"):
        PerceptionGPTConfig.from_preset("tiny", region_embedding_mode="concat")
    with pytest.raises(ValueError, match="name"):
        PerceptionGPTConfig.from_preset("huge")

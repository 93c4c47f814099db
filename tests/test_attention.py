"""Attention selection: FlashAttention-2, then FlashAttention-4, then sdpa; both towers get the choice."""

import pytest
import torch
from conftest import make_batch

import perceptiongpt.loading_perceptiongpt as modeling
from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.loading_perceptiongpt import preferred_attn_implementation


@pytest.mark.parametrize(
    "flash2, flash4, capability, dtype, expected",
    [
        (False, True, (9, 0), torch.bfloat16, "flash_attention_4"),  # H100
        (False, True, (10, 0), "float16", "flash_attention_4"),  # B200
        (False, True, (9, 0), torch.float32, "sdpa"),  # FlashAttention needs half precision
        (False, True, (9, 0), None, "sdpa"),
        (False, True, (8, 0), torch.bfloat16, "sdpa"),  # A100: FA4's kernels target sm90/sm100
        (False, True, (12, 0), torch.bfloat16, "sdpa"),  # consumer Blackwell: no TMEM
        (True, True, (9, 0), torch.bfloat16, "flash_attention_2"),  # FA2 first, as DESIGN.md says
        (False, False, (9, 0), torch.bfloat16, "sdpa"),
    ],
)
def test_flash_attention_4_is_chosen_when_it_imports(monkeypatch, flash2, flash4, capability, dtype, expected):
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(modeling.torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: flash2)
    monkeypatch.setattr(modeling, "is_flash_attn_4_available", lambda: flash4)
    assert preferred_attn_implementation(dtype) == expected


def test_no_cuda_means_sdpa_even_with_flash_packages(monkeypatch):
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(modeling, "is_flash_attn_4_available", lambda: True)
    assert preferred_attn_implementation(torch.bfloat16) == "sdpa"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    PerceptionGPTForConditionalGeneration(PerceptionGPTConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


def _implementations(model):
    """The implementation each tower's modules actually read (their config objects, not only the top level)."""
    return (
        model.config._attn_implementation,
        model.model.language_model.config._attn_implementation,
        model.model.vision_tower.config._attn_implementation,
    )


@pytest.mark.parametrize("chosen", ["eager", "sdpa"])
def test_from_pretrained_gives_both_towers_the_preferred_implementation(monkeypatch, saved_tiny, chosen):
    """`from_pretrained` asks `preferred_attn_implementation` (with the dtype) and both towers get its answer."""
    asked = []
    monkeypatch.setattr(modeling, "preferred_attn_implementation", lambda dtype=None: asked.append(dtype) or chosen)
    model = PerceptionGPTForConditionalGeneration.from_pretrained(saved_tiny, dtype=torch.bfloat16)
    assert asked == [torch.bfloat16]
    assert _implementations(model) == (chosen, chosen, chosen)
    explicit = PerceptionGPTForConditionalGeneration.from_pretrained(saved_tiny, attn_implementation="eager")
    assert _implementations(explicit) == ("eager", "eager", "eager") and len(asked) == 1  # an explicit choice wins


def test_eager_and_sdpa_agree_on_padded_batch(saved_tiny):
    """Same logits from both CPU implementations, with a padded row (the mask path)."""
    ids, pixels = make_batch()
    attention = torch.ones_like(ids)
    attention[1, -4:] = 0
    logits = []
    for implementation in ("eager", "sdpa"):
        model = PerceptionGPTForConditionalGeneration.from_pretrained(saved_tiny, attn_implementation=implementation)
        with torch.no_grad():
            logits.append(model.eval()(input_ids=ids, pixel_values=pixels, attention_mask=attention).logits)
    assert (logits[0] - logits[1])[attention.bool()].abs().max() < 1e-5

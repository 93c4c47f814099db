"""Shared fixtures: tiny random models and hand-built inputs. No network."""

import os
import textwrap

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
torch.set_num_threads(1)

IMAGE, VIS = 4, 5  # SPECIAL_TOKEN_IDS of the tiny preset

# Prepended to subprocess scripts: `import perceptiongpt` fails, so only shipped remote code can load the model.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "perceptiongpt" or name.startswith("perceptiongpt."):
                raise ImportError("perceptiongpt is blocked in this test")
    sys.meta_path.insert(0, _Block())
    """
)


@pytest.fixture
def tiny_config():
    from perceptiongpt import PerceptionGPTConfig

    return PerceptionGPTConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from perceptiongpt import PerceptionGPTForConditionalGeneration

    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(tiny_config).eval()
    with torch.no_grad():  # a non-trivial box decoder, and `<vis>` likely enough to be generated
        model.box_decoder.mlp[-1].weight.normal_(0, 0.5)
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 3
    return model


def make_batch(batch_size=2, length=30, vis_at=((20,), (20, 25)), image=True, seed=0):
    """Rows of random text with one 16-token `<image>` block at 2..17 and `<vis>` at the given positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (batch_size, length), generator=g)
    if image:
        ids[:, 2:18] = IMAGE
    for row, positions in enumerate(vis_at[:batch_size]):
        for p in positions:
            ids[row, p] = VIS
    pixel_values = torch.randn(batch_size, 3, 16, 16, generator=g) if image else None
    return ids, pixel_values

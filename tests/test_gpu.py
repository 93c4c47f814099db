"""GPU checks (skipped without CUDA): bf16 FlashAttention paths agree with eager; packed rows on the flash paths.

Plus the CPU side of `benchmarks/gpu_train_generate.py`: its dry run and the paper layout it builds.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import VIS, make_batch
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.processing.collator import DataCollatorForPerceptionGPT
from perceptiongpt.processing.packing import DataCollatorForPackedPerceptionGPT
from perceptiongpt.processing.processing_perceptiongpt import build_processor
from perceptiongpt.processing.synthetic import SyntheticConfig, build_synthetic_dataset
from perceptiongpt.processing.tokenization_factory import build_tokenizer


BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train_generate.py"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _flash_implementations():
    """sdpa (its flash backend forced in the tests) plus the FlashAttention packages that import here."""
    found = ["sdpa"]
    if torch.cuda.is_available():
        found += [
            name
            for name, ok in (
                ("flash_attention_2", is_flash_attn_2_available()),
                ("flash_attention_4", is_flash_attn_4_available()),
            )
            if ok
        ]
    return found


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_train_generate", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config():
    """The tiny image geometry (16 px, 4x4 patches, 16 px masks) with 64-wide heads in both towers, which every
    FlashAttention kernel supports."""
    return PerceptionGPTConfig.from_preset(
        "tiny",
        vision_config={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "projection_dim": 128},
        text_config={"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4},
    )


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(_config()).eval()
    with torch.no_grad():  # non-trivial boxes
        model.box_decoder.mlp[-1].weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def vis_model(fp32_model):
    """Emits `<vis>` by a wide margin, so bf16 rounding cannot flip a greedy choice between implementations."""
    model = copy.deepcopy(fp32_model)
    with torch.no_grad():
        model.lm_head.weight[VIS] = model.model.language_model.norm.weight * 10
    return model


def _on_gpu(model, implementation):
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    gpu.set_attn_implementation(implementation)
    config = gpu.config
    assert config.text_config._attn_implementation == config.vision_config._attn_implementation == implementation
    return gpu


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@requires_cuda
@pytest.mark.parametrize("implementation", _flash_implementations())
def test_bf16_flash_logits_match_eager(fp32_model, implementation):
    """Within a relative 1e-2, and no farther from the fp32 logits than eager bf16 is. (bf16 itself is ~0.8% off
    fp32 on this random model: eager rounds the scores and probabilities to bf16, flash keeps them in fp32.)"""
    bench = _load_benchmark()
    ids, pixels = make_batch(batch_size=2, vis_at=((20,), (20, 25)))  # equal lengths: no mask stops flash
    inputs = {"input_ids": ids.cuda(), "pixel_values": pixels.cuda()}
    with torch.no_grad():
        reference = copy.deepcopy(fp32_model).cuda()(**inputs).logits  # fp32 reference (sdpa)
    logits = {}
    for name in ("eager", implementation):
        model = _on_gpu(fp32_model, name)
        with torch.no_grad(), bench.attention_context(name, "cuda"):  # sdpa: the flash backend or an error
            logits[name] = model(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}).logits
    assert _relative(logits[implementation], logits["eager"]) < 1e-2
    assert _relative(logits[implementation], reference) < 1.25 * _relative(logits["eager"], reference) + 1e-3


@requires_cuda
@pytest.mark.parametrize("implementation", _flash_implementations())
def test_bf16_flash_generate_boxes_match_eager(vis_model, implementation):
    bench = _load_benchmark()
    ids, pixels = make_batch(batch_size=2, vis_at=((20,), (20,)))
    inputs = {"input_ids": ids[:, :22].cuda(), "pixel_values": pixels.cuda().bfloat16()}
    outputs = {}
    for name in ("eager", implementation):
        model = _on_gpu(vis_model, name)
        with bench.attention_context(name, "cuda"):
            outputs[name] = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    expected, found = outputs["eager"], outputs[implementation]
    assert torch.equal(expected.sequences, found.sequences)
    assert sum(len(boxes) for boxes in found.pred_boxes) >= 2
    for a, b in zip(expected.pred_boxes, found.pred_boxes):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-2


@requires_cuda
def test_sdpa_flash_backend_trains(fp32_model):
    """A full training step (boxes, masks, backward) runs with sdpa restricted to its FlashAttention backend."""
    bench = _load_benchmark()
    model = _on_gpu(fp32_model, "sdpa").train()
    batch = bench.training_batch(model.config, 2, 12, 2, torch.Generator().manual_seed(0))
    batch = bench._to(batch, "cuda", torch.bfloat16)
    with bench.attention_context("sdpa", "cuda"):
        out = model(**batch, use_cache=False)
        out.loss.backward()
    assert torch.isfinite(out.loss) and out.mask_dice_loss > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@requires_cuda
@pytest.mark.parametrize("implementation", ["eager", *_flash_implementations()])
def test_packed_rows_match_padded_on_gpu(fp32_model, implementation):
    """FlashAttention finds the samples from the restarting `position_ids`; sdpa/eager from the block mask."""
    processor = build_processor(16, 4, 16, build_tokenizer("char"))
    data = SyntheticConfig(**{**SyntheticConfig.demo().__dict__, "tasks": ("rec", "res")})
    rows = list(build_synthetic_dataset(data, "train", 4, seed=0))
    padded = DataCollatorForPerceptionGPT(processor)(rows)
    packed = DataCollatorForPackedPerceptionGPT(processor)(rows)
    model = _on_gpu(fp32_model, implementation)
    with torch.no_grad():
        a = model(**{k: v.cuda() for k, v in padded.items()}, use_cache=False)
        b = model(**{k: v.cuda() for k, v in packed.items()}, use_cache=False)
    lengths = padded["attention_mask"].sum(-1).tolist()
    for row, piece in enumerate(torch.split(b.logits[0], lengths)):
        assert _relative(piece, a.logits[row, : lengths[row]]) < 1e-2, row
    assert abs(a.lm_loss.item() - b.lm_loss.item()) < 1e-2 * a.lm_loss.item()
    assert (a.pred_boxes - b.pred_boxes).abs().max().item() < 1e-2


def test_benchmark_dry_run_on_cpu(tmp_path):
    bench = _load_benchmark()
    output = tmp_path / "dry.json"
    bench.main(["--dry-run", "--device", "cpu", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["command"] == f"python benchmarks/gpu_train_generate.py --dry-run --device cpu --output {output}"
    assert report["preset"] == "tiny" and report["machine"]["device"] == "cpu"
    assert set(report["implementations"]) == {"eager", "sdpa"}
    for name, result in report["implementations"].items():
        assert "error" not in result, result
        assert result["text_config"] == result["vision_config"] == name
        assert result["train"]["tokens_per_s"] > 0 and 0 <= result["train"]["heads_share_of_step"] < 1
        assert [g["batch_size"] for g in result["generate"]] == [1, 2]
        assert all(g["new_tokens_per_row"] == 4 and g["tokens_per_s"] > 0 for g in result["generate"])
    assert any("scaled_dot_product" in kernel for kernel in report["implementations"]["sdpa"]["attention_kernels"])


def test_benchmark_builds_the_paper_7b_layout_on_meta():
    """What the GPU run builds, without memory: LLaVA-1.5-7B layout, the paper's heads, the LoRA recipe."""
    bench = _load_benchmark()
    config = PerceptionGPTConfig.from_preset("paper")
    model = bench.build_model(config, "sdpa", "meta", torch.bfloat16)
    counts = bench.count_parameters(model)
    assert 7.0e9 < counts["total"] < 7.3e9 and 0 < counts["percent"] < 1
    batch = bench.training_batch(config, 2, 16, 2, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (2, 1 + 576 + 16) and batch["vis_masks"].shape == (2, 2, 256, 256)
    assert ((batch["labels"] == config.vis_token_id).sum(-1) == 2).all()
    assert config.text_config._attn_implementation is None  # build_model copied the config it changed


def test_benchmark_arguments():
    bench = _load_benchmark()
    args = bench.parse_args([])
    assert (args.preset, args.batch_sizes, args.dtype) == ("paper", [1, 16], "bfloat16")
    with pytest.raises(SystemExit):
        bench.parse_args(["--generate-batch-sizes", "0"])
    with pytest.raises(ValueError, match="unknown"):
        bench.main(["--dry-run", "--device", "cpu", "--implementations", "flash_attention_9"])

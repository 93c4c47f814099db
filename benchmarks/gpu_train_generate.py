"""GPU training and generation speed of the paper's 7B layout, per attention implementation.

Builds the `paper` preset (the llava-hf/llava-1.5-7b-hf layout: CLIP-L/14-336, Vicuna-7B, the paper's heads) from
its config with random weights (no download), wraps it in the paper's LoRA recipe, in bf16, and for each attention
implementation (eager, sdpa with its FlashAttention backend forced, and flash_attention_2 / flash_attention_4 when
their packages import) measures:
- training: tokens/s (every token, the 576 image tokens included), peak memory, and the heads' share of the step
  time, 1 - step(LM loss only) / step(with the box and mask encoders, decoders and losses);
- generate(): new tokens/s at batch 1 and 16 (greedy, a fixed number of new tokens, the adapter unmerged);
- the names of the attention kernels a profiled training step ran, and what each tower's config says.
Random weights do not change the speed; prompts have equal lengths, so no padding mask stops sdpa's flash backend.

    python benchmarks/gpu_train_generate.py                      # writes benchmarks/results/gpu_<device>.json
    python benchmarks/gpu_train_generate.py --dry-run            # tiny preset, any device, a few steps: a smoke test
"""

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import shlex
import sys
import time

import peft
import torch
import transformers
from peft import get_peft_model
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration
from perceptiongpt.trainer.peft_recipe import count_parameters, lora_config


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ATTENTION_KERNEL = re.compile(r"flash|fmha|attn|attention|softmax", re.IGNORECASE)
IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_4")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=("paper", "tiny"), help="model layout (default: paper)")
    parser.add_argument(
        "--implementations",
        default="auto",
        help="comma-separated attention implementations, or 'auto': eager, sdpa, and "
        "flash_attention_2/4 when their packages import",
    )
    parser.add_argument("--train-batch-size", type=int, default=4, help="rows per training step")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per row after the image block")
    parser.add_argument("--num-vis", type=int, default=2, help="supervised <vis> answers per row (box + mask each)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel selection, allocator)")
    parser.add_argument("--generate-batch-sizes", default="1,16", help="comma-separated generate() batch sizes")
    parser.add_argument("--prompt-text-tokens", type=int, default=32, help="prompt text tokens after the image")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generate() must produce per row")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --dry-run: 1)")
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default: benchmarks/results/gpu_<device>.json; --dry-run writes only when this is given)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny preset, 1 warmup + 1 step, batch sizes 1,2, 4 new tokens: checks the script runs",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.preset, args.steps, args.warmup, args.new_tokens = "tiny", 1, 1, 4
        args.text_tokens, args.prompt_text_tokens, args.generate_batch_sizes = 12, 6, "1,2"
        args.threads = args.threads or 1  # tiny ops: thread start-up costs more than the work on a shared CPU
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch_sizes = [int(size) for size in args.generate_batch_sizes.split(",")]
    for name in ("train_batch_size", "text_tokens", "steps", "new_tokens", "prompt_text_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.text_tokens < args.num_vis + 2:
        parser.error(f"--text-tokens ({args.text_tokens}) must leave room for --num-vis ({args.num_vis}) + 2 tokens")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error(f"--generate-batch-sizes must be positive ints, got {args.generate_batch_sizes!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    return args


def available_implementations(device: str) -> list[str]:
    """eager and sdpa everywhere; the FlashAttention packages only on CUDA, where they run."""
    found = ["eager", "sdpa"]
    if device.startswith("cuda"):
        found += [
            name
            for name, ok in (
                ("flash_attention_2", is_flash_attn_2_available()),
                ("flash_attention_4", is_flash_attn_4_available()),
            )
            if ok
        ]
    return found


def attention_context(implementation: str, device: str, force_flash: bool = True):
    """For sdpa on CUDA, allow ONLY the FlashAttention backend, so a fallback to another kernel raises instead."""
    if implementation == "sdpa" and device.startswith("cuda") and force_flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def build_model(config, implementation: str, device: str, dtype: torch.dtype):
    """Random-weight model built directly on `device` (7B: no CPU copy), wrapped in the paper's LoRA recipe."""
    with torch.device(device):  # `_from_config` mutates the config it is given: pass a copy
        model = PerceptionGPTForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=implementation, dtype=dtype
        )
    return get_peft_model(model, lora_config(model, preset="paper"))


def _text_ids(config, shape, generator):
    """Random ordinary token ids (never `<image>`, `<vis>` or a special id below 10)."""
    ids = torch.randint(10, config.text_config.vocab_size, shape, generator=generator)  # (B, n)
    special = (ids == config.image_token_id) | (ids == config.vis_token_id) | (ids == config.text_config.pad_token_id)
    return ids.masked_fill(special, 10)


def training_batch(config, batch_size, text_tokens, num_vis, generator, with_masks=True):
    """Equal-length rows: bos, the image block, prompt text, then an answer with `num_vis` supervised `<vis>`."""
    image = torch.full((batch_size, config.num_image_tokens), config.image_token_id)  # (B, P)
    text = _text_ids(config, (batch_size, text_tokens), generator)  # (B, n)
    answer_start = text_tokens // 2
    vis_columns = torch.linspace(answer_start + 1, text_tokens - 1, num_vis).long()  # (K,)
    text[:, vis_columns] = config.vis_token_id
    bos = torch.full((batch_size, 1), config.text_config.bos_token_id or 1)
    input_ids = torch.cat([bos, image, text], dim=1)  # (B, T)
    labels = torch.full_like(input_ids, -100)
    answer = 1 + config.num_image_tokens + answer_start
    labels[:, answer:] = input_ids[:, answer:]
    corner = torch.rand(batch_size, num_vis, 2, generator=generator) * 0.5  # (B, K, 2)
    size = 0.1 + torch.rand(batch_size, num_vis, 2, generator=generator) * 0.4
    side = config.vision_config.image_size
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, side, side, generator=generator),  # (B, 3, S, S)
        "vis_boxes": torch.cat([corner, corner + size], dim=-1),  # (B, K, 4) normalized xyxy
    }
    if with_masks:
        mask_side = config.mask_head_config.mask_size
        batch["vis_masks"] = torch.rand(batch_size, num_vis, mask_side, mask_side, generator=generator) > 0.5
        batch["vis_mask_valid"] = torch.ones(batch_size, num_vis, dtype=torch.bool)  # (B, K)
    return batch


def _to(batch, device, dtype):
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_training(model, batch, steps, warmup, device):
    """Seconds per optimizer step (forward, backward, AdamW) after `warmup` untimed steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss  # use_cache=False: the composite config keeps it on otherwise
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    del optimizer
    return seconds, float(loss)


def attention_kernels(model, batch, device):
    """Names of the attention-like kernels (CUDA) or ops (CPU) that one forward + backward ran, by total time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as profiler:
        model(**batch, use_cache=False).loss.backward()
        _sync(device)
    model.zero_grad(set_to_none=True)
    events = [event for event in profiler.key_averages() if ATTENTION_KERNEL.search(event.key)]
    timing = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
    events.sort(key=lambda event: -getattr(event, timing, 0.0))
    return [event.key[:160] for event in events[:12]]


def time_generate(model, config, batch_size, prompt_text_tokens, new_tokens, device, dtype, generator):
    """New tokens per second of greedy generate() producing exactly `new_tokens` per row (eos suppressed)."""
    prompt = training_batch(config, batch_size, prompt_text_tokens, 0, generator, with_masks=False)
    prompt = _to({k: prompt[k] for k in ("input_ids", "attention_mask", "pixel_values")}, device, dtype)
    model.eval()
    settings = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=config.text_config.pad_token_id)
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        _sync(device)
    seconds = time.perf_counter() - start
    produced = (out.sequences.shape[1] - prompt["input_ids"].shape[1]) * batch_size
    return {
        "batch_size": batch_size,
        "prompt_tokens": prompt["input_ids"].shape[1],
        "new_tokens_per_row": out.sequences.shape[1] - prompt["input_ids"].shape[1],
        "seconds": round(seconds, 4),
        "tokens_per_s": round(produced / seconds, 1),
        "generated_vis": sum(len(boxes) for boxes in out.pred_boxes),  # each decoded a box (and a mask)
    }


def _peak_memory_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def run_implementation(args, config, implementation, dtype, force_flash=True):
    """Every measurement for one attention implementation; the model is freed afterwards."""
    device = args.device
    generator = torch.Generator().manual_seed(args.seed)
    _reset_peak(device)
    torch.manual_seed(args.seed)
    model = build_model(config, implementation, device, dtype)
    base = model.get_base_model()
    weights_gib = _peak_memory_gib(device)
    result = {
        "requested": implementation,
        "text_config": base.config.text_config._attn_implementation,
        "vision_config": base.config.vision_config._attn_implementation,
        "mask_decoder": base.mask_decoder.transformer.config._attn_implementation,  # fixed to sdpa
        "sdpa_flash_backend_forced": implementation == "sdpa" and device.startswith("cuda") and force_flash,
        "parameters": count_parameters(model),
    }
    batch = _to(
        training_batch(config, args.train_batch_size, args.text_tokens, args.num_vis, generator), device, dtype
    )
    lm_only = {k: v for k, v in batch.items() if k not in ("vis_boxes", "vis_masks", "vis_mask_valid")}
    # no `<vis>` target without its box (the model refuses that); the heads then never run
    lm_only["labels"] = batch["labels"].masked_fill(batch["labels"] == config.vis_token_id, -100)
    tokens = batch["input_ids"].numel()
    with attention_context(implementation, device, force_flash):
        _reset_peak(device)
        step_s, loss = time_training(model, batch, args.steps, args.warmup, device)
        peak = _peak_memory_gib(device)
        lm_step_s, _ = time_training(model, lm_only, args.steps, args.warmup, device)
        result["attention_kernels"] = attention_kernels(model, batch, device)
        result["train"] = {
            "batch_size": args.train_batch_size,
            "tokens_per_row": batch["input_ids"].shape[1],
            "step_seconds": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s, 1),
            "lm_only_step_seconds": round(lm_step_s, 4),
            "heads_share_of_step": round(max(0.0, 1.0 - lm_step_s / step_s), 4),
            "peak_memory_gib": peak,
            "weights_memory_gib": weights_gib,
            "final_loss": round(loss, 4),
        }
        generator = torch.Generator().manual_seed(args.seed)
        result["generate"] = [
            time_generate(model, config, size, args.prompt_text_tokens, args.new_tokens, device, dtype, generator)
            for size in args.batch_sizes
        ]
    del model, base, batch, lm_only
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def _attempt(args, config, implementation, dtype, force_flash=True):
    try:
        return run_implementation(args, config, implementation, dtype, force_flash)
    except Exception as error:  # one failing backend (missing kernel, OOM) must not lose the others' numbers
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"requested": implementation, "error": repr(error)[:2000]}


def device_info(device):
    info = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "flash_attention_2_available": bool(is_flash_attn_2_available()),
        "flash_attention_4_available": bool(is_flash_attn_4_available()),
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        info.update(
            name=properties.name,
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info.update(name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    return info


def default_output(info):
    slug = re.sub(r"[^a-z0-9]+", "_", info["name"].lower()).strip("_")
    return os.path.join(RESULTS, f"gpu_{slug}.json")


def main(argv=None):
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = PerceptionGPTConfig.from_preset(args.preset)
    if args.implementations == "auto":
        implementations = available_implementations(args.device)
    else:
        implementations = [name.strip() for name in args.implementations.split(",") if name.strip()]
        unknown = sorted(set(implementations) - set(IMPLEMENTATIONS))
        if unknown:
            raise ValueError(f"`--implementations` must name some of {IMPLEMENTATIONS}, got unknown {unknown}.")
    info = device_info(args.device)
    report = {
        "benchmark": "gpu_train_generate",
        "command": shlex.join(["python", "benchmarks/gpu_train_generate.py", *argv]),
        "dry_run": args.dry_run,
        "preset": args.preset,
        "dtype": args.dtype,
        "lora": "paper recipe: q,v r=16 alpha=64 dropout 0.1; heads and fusion fully trained; <vis> rows",
        "machine": info,
        "settings": {
            key: getattr(args, key)
            for key in (
                "train_batch_size",
                "text_tokens",
                "num_vis",
                "steps",
                "warmup",
                "batch_sizes",
                "prompt_text_tokens",
                "new_tokens",
                "seed",
            )
        },
        "implementations": {},
    }
    for implementation in implementations:
        print(f"[gpu_train_generate] {implementation} on {info['name']} ...", flush=True)
        result = _attempt(args, config, implementation, dtype)
        if implementation == "sdpa" and "error" in result and args.device.startswith("cuda"):
            # some call refused the flash backend: measure sdpa with its own backend choice, and say why
            retry = _attempt(args, config, implementation, dtype, force_flash=False)
            result = {**retry, "sdpa_flash_backend_error": result["error"]}
        report["implementations"][implementation] = result
        print(json.dumps(report["implementations"][implementation]), flush=True)
    output = args.output or (None if args.dry_run else default_output(info))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"[gpu_train_generate] wrote {output}")
    return report


if __name__ == "__main__":
    main()

"""generate() overhead of PerceptionGPT (heads + box feedback) against the native family model on the same weights.

Interleaved runs, medians, 64 new tokens, batch 1 and 8, on a model big enough to matter on CPU (text hidden 512,
8 layers, vocabulary 1024, 36 image tokens; LLaVA: the demo's CLIP; Qwen2.5-VL: a 4-block ViT of width 96 on a 12x12
patch grid; SmolVLM: a 4-layer SigLIP of width 96 on one 96 px image, 12x12 patches pixel-shuffled 2x). Two PerceptionGPT workloads: "no_vis" (the hooks only) and "vis_every_step" (`<vis>`
forced at every step, so every step decodes a box and feeds it back, and every returned one gets a mask: the worst
case).

    python benchmarks/generate_overhead.py [--family llava|qwen2_5_vl|smolvlm] [--repeats 5] [--threads 2]

Also the footprint of generate()'s per-`<vis>` records for 64 new tokens x 4 beams with a `<vis>` every step, at two
prompt lengths: as stored (key = generated suffix, value = box + hidden state) and, for the same records, what the
earlier layout held (key = the whole prefix, value = box + an S x S mask).

Writes benchmarks/results/generate_overhead.json (LLaVA) or generate_overhead_<family>.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from perceptiongpt import (
    PerceptionGPTConfig,
    PerceptionGPTForConditionalGeneration,
    PerceptionGPTQwen2_5_VLConfig,
    PerceptionGPTQwen2_5_VLForConditionalGeneration,
    PerceptionGPTSmolVLMConfig,
    PerceptionGPTSmolVLMForConditionalGeneration,
)


RESULTS = Path(__file__).parent / "results"


class ForceToken(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores[:] = -float("inf")
        scores[:, self.token_id] = 0.0
        return scores


TEXT = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8}
MASK_GRID = 6  # the LLaVA arm's patch grid (48 px, 8 px patches)
QWEN_IMAGE_GRID = (1, 12, 12)  # 8 px patches, 2x2 merge: 36 LLM image tokens, as the LLaVA demo's 6x6 grid


def build_llava():
    text = {**TEXT, "num_key_value_heads": 8, "vocab_size": 1024}
    # the demo's CLIP at 48 px: 36 image tokens, as the other families here
    config = PerceptionGPTConfig.from_preset(
        "demo", text_config=text, vision_config={"image_size": 48}, image_seq_length=36
    )
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(config).eval()
    fields = {k: v for k, v in config.to_dict().items() if k in LlavaConfig.__dataclass_fields__ and k != "model_type"}
    return model, LlavaForConditionalGeneration(LlavaConfig(**fields)).eval(), config


def build_qwen2_5_vl():
    demo = PerceptionGPTConfig.from_preset("demo")
    vision = {"depth": 4, "hidden_size": 96, "intermediate_size": 192, "num_heads": 4, "patch_size": 8}
    vision.update(spatial_merge_size=2, window_size=32, fullatt_block_indexes=[3], out_hidden_size=TEXT["hidden_size"])
    text = {**TEXT, "num_key_value_heads": 8, "vocab_size": 1024, "rope_parameters": {"mrope_section": [8, 12, 12]}}
    ids = {"image_token_id": 1000, "video_token_id": 1001, "vision_start_token_id": 1002, "vision_end_token_id": 1003}
    native_config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    config = PerceptionGPTQwen2_5_VLConfig(
        **{key: value for key, value in native_config.to_dict().items() if key != "model_type"},
        vis_token_id=1004,
        mask_grid_size=MASK_GRID,
        box_head_config=demo.box_head_config.to_dict(),
        mask_head_config=demo.mask_head_config.to_dict(),
    )
    torch.manual_seed(0)
    model = PerceptionGPTQwen2_5_VLForConditionalGeneration(config).eval()
    return model, Qwen2_5_VLForConditionalGeneration(native_config).eval(), config


def build_smolvlm():
    demo = PerceptionGPTConfig.from_preset("demo")
    vision = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4}
    vision.update(image_size=96, patch_size=8)  # 12x12 patches, 36 LLM tokens after the 2x2 pixel shuffle
    text = {**TEXT, "model_type": "llama", "num_key_value_heads": 8, "vocab_size": 1024}
    native_config = SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=1000)
    config = PerceptionGPTSmolVLMConfig(
        **{key: value for key, value in native_config.to_dict().items() if key != "model_type"},
        vis_token_id=1004,
        mask_grid_size=MASK_GRID,
        box_head_config=demo.box_head_config.to_dict(),
        mask_head_config=demo.mask_head_config.to_dict(),
    )
    torch.manual_seed(0)
    model = PerceptionGPTSmolVLMForConditionalGeneration(config).eval()
    return model, SmolVLMForConditionalGeneration(native_config).eval(), config


FAMILIES = {"llava": build_llava, "qwen2_5_vl": build_qwen2_5_vl, "smolvlm": build_smolvlm}


def build_models(family):
    """The PerceptionGPT model, the native model holding the same weights, and the PerceptionGPT config."""
    model, native, config = FAMILIES[family]()
    missing, _ = native.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"The native model is missing weights: {missing[:5]}")
    return model, native, config


def inputs_for(config, batch):
    """`batch` rows of 20 text tokens around one image each, with the family's image inputs."""
    g = torch.Generator().manual_seed(batch)
    if config.model_type == "perceptiongpt":
        tokens, side = config.num_image_tokens, config.vision_config.image_size
        ids = torch.randint(10, 1000, (batch, 20 + tokens), generator=g)
        ids[:, 5 : 5 + tokens] = config.image_token_id
        pixels = torch.randn(batch, 3, side, side, generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    if config.model_type == "perceptiongpt_smolvlm":  # one global image, no splitting
        side = config.vision_config.image_size
        tokens = (config.vision_grid_size // config.scale_factor) ** 2
        ids = torch.randint(10, 1000, (batch, 22 + tokens), generator=g)
        ids[:, 5], ids[:, 6 : 6 + tokens], ids[:, 6 + tokens] = 1001, config.image_token_id, 1001
        pixels = torch.randn(batch, 1, 3, side, side, generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    t, h, w = QWEN_IMAGE_GRID
    tokens = t * h * w // 4
    ids = torch.randint(10, 1000, (batch, 22 + tokens), generator=g)
    ids[:, 5], ids[:, 6 : 6 + tokens], ids[:, 6 + tokens] = (
        config.vision_start_token_id,
        config.image_token_id,
        config.vision_end_token_id,
    )
    patch = config.vision_config.patch_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * t * h * w, 3 * 2 * patch * patch, generator=g),
        "image_grid_thw": torch.tensor([QWEN_IMAGE_GRID] * batch),
        "mm_token_type_ids": (ids == config.image_token_id).long(),
    }


def timed(model, inputs, new_tokens, processors):
    """(wall seconds, CPU seconds of this process, output): CPU time leaves out what other processes take; where it
    equals the wall clock, the noise is the host's speed itself."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=processors,
            return_dict_in_generate=True,
        )
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if out.sequences.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError("generation stopped early")
    return elapsed, cpu, out


def parse_arguments(doc, repeats, threads):
    """The command line this benchmark and generate_overhead_breakdown.py share, with their own defaults."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--family", default="llava", choices=sorted(FAMILIES), help="the VLM family")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved runs per workload and batch size")
    parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    return parser.parse_args()


def paired_median(runs, native_runs):
    """The median over repeats of each run's time over that of the native run of the same repeat."""
    return statistics.median(run / native for run, native in zip(runs, native_runs))


def records_footprint(model, config, prompt_extra, new_tokens, beams=4):
    """MB of generate()'s records (now, and in the earlier layout) after one beam search with `<vis>` forced."""
    inputs = inputs_for(config, 1)
    extra = torch.randint(10, 1000, (1, prompt_extra), generator=torch.Generator().manual_seed(1))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:  # Qwen: the extra tokens are text
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == config.image_token_id).long()
    states, collect = [], model._collect_generated_regions
    model._collect_generated_regions = lambda sequences, state: states.append(state) or collect(sequences, state)
    try:
        with torch.no_grad():
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_beams=beams,
                return_dict_in_generate=True,
                logits_processor=LogitsProcessorList([ForceToken(config.vis_token_id)]),
            )
    finally:
        del model._collect_generated_regions
    state, prompt = states[0], inputs["input_ids"].shape[1]
    side = config.mask_head_config.mask_size
    storages = {}  # what the records really keep alive: each tensor's whole storage, once
    for box, hidden, score in state.records.values():
        for tensor in (box, hidden, score):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    now = sum(len(key) for _, key in state.records) + sum(storages.values())
    before = sum(8 * prompt + len(key) + 4 * (4 + side * side + 1) for _, key in state.records)
    return {
        "prompt_tokens": prompt,
        "records": len(state.records),
        "mb_now": now / 2**20,
        "mb_before_layout": before / 2**20,
    }


def main():
    args = parse_arguments(__doc__, repeats=5, threads=2)
    torch.set_num_threads(args.threads)
    model, native, config = build_models(args.family)
    force_vis = LogitsProcessorList([ForceToken(config.vis_token_id)])
    block_vis = LogitsProcessorList([ForceToken(7)])  # a fixed ordinary token: same work, no `<vis>`
    results = {
        "family": args.family,
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "text_hidden": 512,
        "text_layers": 8,
        "batches": {},
    }
    for batch in (1, 8):
        inputs = inputs_for(config, batch)
        runs = {
            "native": (native, block_vis),
            "pgpt_no_vis": (model, block_vis),
            "pgpt_vis_every_step": (model, force_vis),
        }
        times = {name: [] for name in runs}
        cpu_times = {name: [] for name in runs}
        for model_ref, procs in runs.values():  # warm-up
            timed(model_ref, inputs, 4, procs)
        for _ in range(args.repeats):
            for name, (model_ref, procs) in runs.items():
                elapsed, cpu, out = timed(model_ref, inputs, args.new_tokens, procs)
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
        boxes = sum(len(b) for b in out.pred_boxes)  # the last run: `<vis>` every step
        medians = {name: statistics.median(values) for name, values in times.items()}
        cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
        results["batches"][str(batch)] = {
            "median_seconds": medians,
            "ratio_no_vis": medians["pgpt_no_vis"] / medians["native"],
            "ratio_vis_every_step": medians["pgpt_vis_every_step"] / medians["native"],
            "median_cpu_seconds": cpu_medians,
            "cpu_ratio_no_vis": cpu_medians["pgpt_no_vis"] / cpu_medians["native"],
            "cpu_ratio_vis_every_step": cpu_medians["pgpt_vis_every_step"] / cpu_medians["native"],
            # the least-disturbed run of each: on a noisy shared machine the minima are the steadier ratio
            "min_ratio_no_vis": min(times["pgpt_no_vis"]) / min(times["native"]),
            "min_ratio_vis_every_step": min(times["pgpt_vis_every_step"]) / min(times["native"]),
            # each repeat's run over the native run just before it: what drifts slowly over the session cancels
            "paired_ratio_no_vis": paired_median(times["pgpt_no_vis"], times["native"]),
            "paired_ratio_vis_every_step": paired_median(times["pgpt_vis_every_step"], times["native"]),
            "boxes_decoded_per_run": boxes,
            "raw_seconds": times,
            "raw_cpu_seconds": cpu_times,
        }
        row = results["batches"][str(batch)]
        print(
            f"batch {batch}: wall x{row['ratio_no_vis']:.3f} no <vis>, x{row['ratio_vis_every_step']:.3f} <vis> every"
            f" step; CPU x{row['cpu_ratio_no_vis']:.3f}, x{row['cpu_ratio_vis_every_step']:.3f}; minima"
            f" x{row['min_ratio_no_vis']:.3f}, x{row['min_ratio_vis_every_step']:.3f}; paired"
            f" x{row['paired_ratio_no_vis']:.3f}, x{row['paired_ratio_vis_every_step']:.3f}"
        )
    results["records"] = [records_footprint(model, config, extra, args.new_tokens) for extra in (0, 512)]
    print(json.dumps(results["records"]))
    name = "generate_overhead.json" if args.family == "llava" else f"generate_overhead_{args.family}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

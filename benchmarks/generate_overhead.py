"""generate() overhead of PerceptionGPT (heads + box feedback) against plain LLaVA on the same weights.

Interleaved runs, medians, 64 new tokens, batch 1 and 8, on a model big enough to matter on CPU
(text hidden 512, 8 layers). Two PerceptionGPT workloads: "no_vis" (the hooks only) and "vis_every_step"
(`<vis>` forced at every step, so every step decodes a box and a mask and feeds the box back: the worst case).

    python benchmarks/generate_overhead.py [--repeats 5] [--threads 2]

Also the footprint of generate()'s per-`<vis>` records for 64 new tokens x 4 beams with a `<vis>` every step, at two
prompt lengths: as stored (key = generated suffix, value = box + hidden state) and, for the same records, what the
earlier layout held (key = the whole prefix, value = box + an S x S mask).

Writes benchmarks/results/generate_overhead.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList

from perceptiongpt import PerceptionGPTConfig, PerceptionGPTForConditionalGeneration


RESULTS = Path(__file__).parent / "results" / "generate_overhead.json"


class ForceToken(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores[:] = -float("inf")
        scores[:, self.token_id] = 0.0
        return scores


def build_models():
    config = PerceptionGPTConfig.from_preset(
        "demo",
        text_config={
            "hidden_size": 512,
            "intermediate_size": 1024,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "vocab_size": 1024,
        },
    )
    torch.manual_seed(0)
    model = PerceptionGPTForConditionalGeneration(config).eval()
    llava_config = LlavaConfig(
        **{
            k: v
            for k, v in config.to_dict().items()
            if k in LlavaConfig.__dataclass_fields__ and k not in ("model_type",)
        }
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    missing, unexpected = llava.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"LLaVA is missing weights: {missing[:5]}")
    return model, llava, config


def inputs_for(config, batch):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, 1000, (batch, 20 + config.num_image_tokens), generator=g)
    ids[:, 5 : 5 + config.num_image_tokens] = config.image_token_id
    pixels = torch.randn(batch, 3, config.vision_config.image_size, config.vision_config.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def timed(model, inputs, new_tokens, processors):
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=processors,
            return_dict_in_generate=True,
        )
    elapsed = time.perf_counter() - start
    if out.sequences.shape[1] != inputs["input_ids"].shape[1] + new_tokens:
        raise RuntimeError("generation stopped early")
    return elapsed, out


def records_footprint(model, config, prompt_extra, new_tokens, beams=4):
    """MB of generate()'s records (now, and in the earlier layout) after one beam search with `<vis>` forced."""
    inputs = inputs_for(config, 1)
    extra = torch.randint(10, 1000, (1, prompt_extra), generator=torch.Generator().manual_seed(1))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per workload and batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, llava, config = build_models()
    force_vis = LogitsProcessorList([ForceToken(config.vis_token_id)])
    block_vis = LogitsProcessorList([ForceToken(7)])  # a fixed ordinary token: same work, no `<vis>`
    results = {
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "text_hidden": 512,
        "text_layers": 8,
        "batches": {},
    }
    for batch in (1, 8):
        inputs = inputs_for(config, batch)
        times = {"llava": [], "pgpt_no_vis": [], "pgpt_vis_every_step": []}
        for model_ref, procs in ((llava, block_vis), (model, block_vis), (model, force_vis)):  # warm-up
            timed(model_ref, inputs, 4, procs)
        for _ in range(args.repeats):
            times["llava"].append(timed(llava, inputs, args.new_tokens, block_vis)[0])
            times["pgpt_no_vis"].append(timed(model, inputs, args.new_tokens, block_vis)[0])
            elapsed, out = timed(model, inputs, args.new_tokens, force_vis)
            times["pgpt_vis_every_step"].append(elapsed)
        boxes = sum(len(b) for b in out.pred_boxes)
        medians = {name: statistics.median(values) for name, values in times.items()}
        results["batches"][str(batch)] = {
            "median_seconds": medians,
            "ratio_no_vis": medians["pgpt_no_vis"] / medians["llava"],
            "ratio_vis_every_step": medians["pgpt_vis_every_step"] / medians["llava"],
            "boxes_decoded_per_run": boxes,
            "raw_seconds": times,
        }
        print(
            batch,
            json.dumps(results["batches"][str(batch)]["median_seconds"]),
            round(results["batches"][str(batch)]["ratio_no_vis"], 3),
            round(results["batches"][str(batch)]["ratio_vis_every_step"], 3),
        )
    results["records"] = [records_footprint(model, config, extra, args.new_tokens) for extra in (0, 512)]
    print(json.dumps(results["records"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

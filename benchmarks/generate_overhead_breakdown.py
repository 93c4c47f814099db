"""Where generate()'s overhead goes: wall time per run inside each PerceptionGPT hook, against the native model's.

The workloads of `generate_overhead.py` (`<vis>` forced at every step, 64 new tokens, batch 1 and 8), with the hooks
and heads wrapped in timers: the box decode of each step's `<vis>` (`decode_boxes`, inside `_decode_new_vis`), the
fed-back box embedding (`embed_regions`, inside the forward), the records' bookkeeping, the returned masks
(`_decode_returned_masks`), and the native model's own prepare/update/forward for reference. Medians over interleaved
repeats, in ms per run and as a share of the native run; measured in place (after the LLM's layers, as a generate
step runs them), which costs more than the same call repeated in isolation.

    taskset -c 0 python benchmarks/generate_overhead_breakdown.py [--family llava] [--repeats 9] [--threads 1]

Writes benchmarks/results/generate_overhead_breakdown.json (LLaVA) or generate_overhead_breakdown_<family>.json.
"""

import functools
import json
import statistics
import time
from collections import defaultdict

import torch
from generate_overhead import RESULTS, ForceToken, build_models, inputs_for, parse_arguments, timed
from transformers import LogitsProcessorList


# (label, attribute of the PerceptionGPT model) in nesting order; each label's time includes the ones below it
OURS = [
    ("forward", "forward"),
    ("language model (in forward)", "model.language_model.forward"),
    ("embed fed-back boxes (in forward)", "embed_regions"),
    ("prepare_inputs_for_generation", "prepare_inputs_for_generation"),
    ("decode new <vis> (in prepare)", "_decode_new_vis"),
    ("decode boxes (in decode new <vis>)", "decode_boxes"),
    ("fed-back boxes (in prepare)", "_boxes_for_newest_token"),
    ("update_model_kwargs", "_update_model_kwargs_for_generation"),
    ("collect regions (after the loop)", "_collect_generated_regions"),
    ("returned masks (in collect)", "_decode_returned_masks"),
]
NATIVE = [
    ("forward", "forward"),
    ("language model (in forward)", "model.language_model.forward"),
    ("prepare_inputs_for_generation", "prepare_inputs_for_generation"),
    ("update_model_kwargs", "_update_model_kwargs_for_generation"),
]


def instrument(model, parts):
    """Wraps each of `parts` (dotted paths from the model) on its instance with a timer; returns the dict the
    timers add to (seconds per label)."""
    totals = defaultdict(float)
    for label, path in parts:
        *owners, name = path.split(".")
        owner = functools.reduce(getattr, owners, model)
        method = getattr(owner, name)

        @functools.wraps(method)  # generate() reads the forward's signature
        def timed_method(*args, _method=method, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, name, timed_method)
    return totals


def main():
    args = parse_arguments(__doc__, repeats=9, threads=1)
    torch.set_num_threads(args.threads)
    model, native, config = build_models(args.family)
    force_vis = LogitsProcessorList([ForceToken(config.vis_token_id)])
    block_vis = LogitsProcessorList([ForceToken(7)])
    ours_totals, native_totals = instrument(model, OURS), instrument(native, NATIVE)
    results = {"family": args.family, "threads": args.threads, "new_tokens": args.new_tokens, "batches": {}}
    for batch in (1, 8):
        inputs = inputs_for(config, batch)
        timed(model, inputs, 4, force_vis), timed(native, inputs, 4, block_vis)  # warm-up
        runs = {"native": [], "pgpt_vis_every_step": []}
        parts = {"native": defaultdict(list), "pgpt_vis_every_step": defaultdict(list)}
        for _ in range(args.repeats):
            for name, (model_ref, procs, totals) in {
                "native": (native, block_vis, native_totals),
                "pgpt_vis_every_step": (model, force_vis, ours_totals),
            }.items():
                totals.clear()
                runs[name].append(timed(model_ref, inputs, args.new_tokens, procs)[0])
                for label, seconds in totals.items():
                    parts[name][label].append(seconds)
        native_ms = statistics.median(runs["native"]) * 1e3
        row = {"median_run_ms": {name: statistics.median(values) * 1e3 for name, values in runs.items()}}
        for name, labels in parts.items():
            row[name] = {
                label: {"ms_per_run": (ms := statistics.median(values) * 1e3), "share_of_native_run": ms / native_ms}
                for label, values in labels.items()
            }
        results["batches"][str(batch)] = row
        vis_ms = row["median_run_ms"]["pgpt_vis_every_step"]
        print(f"batch {batch}: native {native_ms:.0f} ms, <vis> every step {vis_ms:.0f} ms")
        for name in parts:
            for label, value in row[name].items():
                share = 100 * value["share_of_native_run"]
                print(f"  {name:20s} {label:38s} {value['ms_per_run']:7.1f} ms  {share:5.1f}%")
    name = "generate_overhead_breakdown.json"
    name = name if args.family == "llava" else name.replace(".json", f"_{args.family}.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

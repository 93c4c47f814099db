"""The demo recipe's design arms: `perceptiongpt demo` (3000 steps, every task, seed 0) with overrides of the `demo`
preset, one arm per run, each written as a shard; `--aggregate` gathers the shards into one table.

    python benchmarks/demo_ablation.py --arm 64px_pool [--seed 0] [--recipe learning_rate=4e-4 ...] [--threads 1]
    python benchmarks/demo_ablation.py --aggregate

Shards: benchmarks/results/demo_ablation/<arm>-lr<lr>[-<key><value>...]-s<seed>.json (the demo's metrics.json, with
its recipe, plus the arm's overrides);
table: benchmarks/results/demo_ablation.json. Budgets are optimizer steps; one CPU-heavy job at a time, or each
pinned to its own core with one thread.
"""

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from perceptiongpt import PerceptionGPTConfig
from perceptiongpt.trainer import demo


RESULTS = Path(__file__).parent / "results"


# overrides of the `demo` preset (64 px, region features with a 3 x 3 layout, the two-stage query box head, 32 px
# masks); the arms measured before them pin them off (`_before`, `MASK24`)
MASK24 = {"mask_head_config": {"mask_size": 24}}


def _before(box=None, **overrides):
    box = {"query_refine_layout": 0, **(box or {})}
    return {"region_feature_layout": 0, "box_head_config": box, **MASK24, **overrides}


ARMS = {
    "48px": _before(vision_config={"image_size": 48}, image_seq_length=36, pool_region_features=False),
    "64px": _before(pool_region_features=False),
    "48px_pool": _before(vision_config={"image_size": 48}, image_seq_length=36),
    "48px_pool_offset": _before({"query_centre_offset": True}, vision_config={"image_size": 48}, image_seq_length=36),
    "64px_pool": _before(),
    "64px_pool_offset": _before({"query_centre_offset": True}),
    # twice the LLM width (128 -> 256): the LLM binds the words to the patches and its image states are the box
    # head's keys (`query_source="llm"`)
    "64px_pool_text256": _before(text_config={"hidden_size": 256, "intermediate_size": 512}),
    # the box extent as distances to each side in image units, not as fractions of the room to the border
    "64px_pool_half_size": _before({"query_extent": "half_size"}),
    # the region's patches also sampled at the centres of a 3 x 3 layout of its box (RoIAlign-style): REG misses
    # were mostly the shape, which a mean over the region drops
    "64px_pool_layout3": _before(region_feature_layout=3),
    # a second box stage: the fused ViT patches at 4 x 4 points over the first box move it (REC misses were mostly
    # the right object with a box too large)
    "64px_pool_refine4": _before({"query_refine_layout": 4}),
    "64px_pool_layout3_refine4": MASK24,
    # every arm underfits at 3000 steps: more width where the words meet the patches (the LLM), or where the shape
    # is read (the ViT, 96 wide from scratch)
    "64px_pool_layout3_refine4_text256": {"text_config": {"hidden_size": 256, "intermediate_size": 512}},
    "64px_pool_layout3_refine4_vit192": {"vision_config": {"hidden_size": 192, "intermediate_size": 384}},
    # masks at the upsampler's own 32 x 32 (8 x 8 patches, two 2x upsamplings) instead of resized down to 24 x 24
    "64px_pool_layout3_refine4_mask32": {},  # the preset
}
KEYS = (
    "rec_acc@0.5",
    "rec_acc@0.5_blind",
    "res_giou",
    "reg_acc",
    "reg_acc_blind",
    "reg_mask_acc",
    "reg_mask_acc_blind",
    "multi_f1",
    "steps_per_second",
)


def parse_recipe(pairs):
    """`key=value` overrides of `DemoRecipe` (values typed like the field's default)."""
    defaults = asdict(demo.DemoRecipe())
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in defaults or key == "threads":
            raise ValueError(
                f"`--recipe` takes key=value with key one of {sorted(set(defaults) - {'threads'})}, got {pair!r}"
            )
        overrides[key] = type(defaults[key])(value)
    return overrides


def shard_name(arm, recipe_overrides, seed):
    learning_rate = recipe_overrides.get("learning_rate", demo.DemoRecipe().learning_rate)
    others = "".join(
        f"-{key}{value:g}" if isinstance(value, float) else f"-{key}{value}"
        for key, value in sorted(recipe_overrides.items())
        if key != "learning_rate"
    )
    return f"{arm}-lr{learning_rate:g}{others}-s{seed}"


def run_arm(arm, seed, threads, output, recipe_overrides):
    overrides = ARMS[arm]
    preset = PerceptionGPTConfig.from_preset.__func__

    def from_preset(cls, name, **kwargs):  # the demo builds its config from the preset: merge the arm into it
        for key, value in overrides.items():
            both = isinstance(value, dict) and isinstance(kwargs.get(key), dict)
            kwargs[key] = {**kwargs[key], **value} if both else value
        return preset(cls, name, **kwargs)

    PerceptionGPTConfig.from_preset = classmethod(from_preset)
    try:
        recipe = demo.DemoRecipe(**{**asdict(demo.DemoRecipe()), **recipe_overrides, "threads": threads})
        metrics = demo.run_demo(output or tempfile.mkdtemp(prefix=f"demo_{arm}_"), recipe=recipe, seed=seed)
    finally:
        PerceptionGPTConfig.from_preset = classmethod(preset)
    shard = RESULTS / "demo_ablation" / f"{shard_name(arm, recipe_overrides, seed)}.json"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text(json.dumps({"arm": arm, "overrides": overrides, **metrics}, indent=2))
    print(json.dumps({key: metrics.get(key) for key in KEYS}))


def aggregate():
    table = {}
    for shard in sorted((RESULTS / "demo_ablation").glob("*.json")):
        found = json.loads(shard.read_text())
        table[shard.stem] = {"overrides": found["overrides"], **{key: found.get(key) for key in KEYS}}
    (RESULTS / "demo_ablation.json").write_text(json.dumps(table, indent=2))
    print(json.dumps(table, indent=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=sorted(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", nargs="*", action="extend", default=[], help="DemoRecipe overrides, key=value")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's own default is 2)")
    parser.add_argument("--output", default=None, help="the demo's output folder (default: a temporary one)")
    parser.add_argument("--aggregate", action="store_true", help="gather the shards into one table")
    args = parser.parse_args(argv)
    if args.aggregate:
        aggregate()
    elif args.arm is None:
        parser.error("pass --arm or --aggregate")
    else:
        run_arm(args.arm, args.seed, args.threads, args.output, parse_recipe(args.recipe))


if __name__ == "__main__":
    main()

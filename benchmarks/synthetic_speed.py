"""Speed of the embedded synthetic dataset, in samples per second on one thread.

Measures the raw generator (`generate_synthetic_samples`, PIL images in python dicts) and the in-memory
`datasets.Dataset` builder (which also PNG-encodes every image), at the demo and hard presets. Issue 5's target is
>= 500 samples/s for the raw generator at demo difficulty, so that data never bottlenecks CPU training.

    python benchmarks/synthetic_speed.py [--samples 2000] [--repeats 3] [--output benchmarks/results/synthetic_speed.json]
"""

import os


for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # one thread, before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from perceptiongpt.processing.synthetic import (  # noqa: E402
    SyntheticConfig,
    build_synthetic_dataset,
    generate_synthetic_samples,
)


def _rates(build, num_samples, repeats):
    """Samples per second of `build(num_samples, seed)` over `repeats` runs with different seeds."""
    rates = []
    for seed in range(repeats):
        start = time.perf_counter()
        build(num_samples, seed)
        rates.append(num_samples / (time.perf_counter() - start))
    return {"median": round(statistics.median(rates), 1), "runs": [round(rate, 1) for rate in rates]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="samples per run at the demo preset")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "synthetic_speed.json"))
    args = parser.parse_args()

    presets = {"demo": (SyntheticConfig.demo(), args.samples), "hard": (SyntheticConfig.hard(), args.samples // 10)}
    results = {}
    for name, (config, num_samples) in presets.items():
        results[name] = {
            "image_size": config.image_size,
            "num_samples": num_samples,
            "generator_samples_per_s": _rates(
                lambda n, seed, c=config: sum(1 for _ in generate_synthetic_samples(c, "train", n, seed)),
                num_samples,
                args.repeats,
            ),
            "dataset_samples_per_s": _rates(
                lambda n, seed, c=config: build_synthetic_dataset(c, "train", n, seed), num_samples, args.repeats
            ),
        }
    report = {
        "benchmark": "synthetic_speed",
        "threads": 1,
        "target_generator_samples_per_s_demo": 500,
        "meets_target": results["demo"]["generator_samples_per_s"]["median"] >= 500,
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "presets": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The sample stage on Ray against the local executor: Ray's overhead (1 worker) and its scaling (2 workers).

    python bench/ray_executor.py --model models/iter_0 --problems data/problems.parquet --out bench/results/ray_executor.json

Runs `factory.generators.sampling.sample_to_file` with params.yaml's `sample` section (the default sampling
stage: 500 problems x 4 samples, shards of 64 problems) three ways in one process, in turn, `--repeats`
times: `local` (this process, torch on `--threads` threads), `ray-1` and `ray-2` (a local Ray with 2 CPUs;
each actor runs torch on one thread, as Ray sets OMP_NUM_THREADS to its CPUs). Every output must be
byte-identical to the local one. Reports wall seconds (medians), samples/s, the overhead ray-1 / local and
the speed-up ray-2 / ray-1; Ray's start-up is timed apart (a stage pays it once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(name: str, executor, args, out_dir: Path) -> tuple[float, bytes, int]:
    import pyarrow.parquet as pq

    from factory.generators.sampling import SamplingConfig, sample_to_file
    from factory.params import load_params, section

    config = section(load_params(ROOT / "params.yaml"), "sample", SamplingConfig)
    if args.limit:
        config = SamplingConfig(**{**config.__dict__, "limit": args.limit})
    out = out_dir / f"{name}.parquet"
    start = time.perf_counter()
    sample_to_file(model_dir=args.model, problems_path=args.problems, out=str(out), config=config, iteration=1,
                   executor=executor)
    seconds = time.perf_counter() - start
    data, rows = out.read_bytes(), pq.read_metadata(out).num_rows
    out.unlink()
    return seconds, data, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--problems", required=True)
    parser.add_argument("--limit", type=int, default=0, help="problems to sample (0: params.yaml's sample.limit)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local run (ray actors: 1)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch

    from factory.executor import ExecutorConfig, connect

    torch.set_num_threads(args.threads)
    executors = {"local": ExecutorConfig(), "ray-1": ExecutorConfig(kind="ray", workers=1),
                 "ray-2": ExecutorConfig(kind="ray", workers=2)}
    start = time.perf_counter()
    connect(executors["ray-2"])
    ray_start = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in executors}
    reference, rows = None, 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, executor in executors.items():
                seconds, data, rows = run_once(name, executor, args, Path(tmp))
                reference = reference or data
                if data != reference:
                    sys.exit(f"{name}: output differs from the local run's bytes")
                times[name].append(seconds)
                print(f"{name}: {seconds:.1f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "hardware": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), no GPU",
        "ray_start_seconds": round(ray_start, 2),
        "seconds": {name: [round(t, 2) for t in values] for name, values in times.items()},
        "samples": rows,
        "median_seconds": {name: round(t, 2) for name, t in median.items()},
        "samples_per_second": {name: round(rows / t, 1) for name, t in median.items()},
        "overhead_ray1_over_local": round(median["ray-1"] / median["local"], 3),
        "speedup_ray2_over_ray1": round(median["ray-1"] / median["ray-2"], 3),
        "identical_bytes": True,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

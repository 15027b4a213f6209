"""Wall time of the default `dvc repro`, per stage.

    python bench/end_to_end.py --force       # rerun every stage (what a fresh machine does)
    python bench/end_to_end.py               # only what is out of date

Runs `dvc repro` in the project, timestamps each "Running stage" line as DVC
prints it, and charges each stage with the time until the next one starts
(its command plus DVC's hashing and caching of its outputs). Prints the stages
slowest first with their share of the total, and writes
`bench/results/end_to_end.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_START = re.compile(r"^Running stage '([^']+)'")


def timed_repro(args: list[str], cwd: Path) -> tuple[list[dict], float]:
    """Run `dvc repro ARGS`, echoing its output; return [{stage, seconds}] in run order and the total."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    stages: list[dict] = []
    with subprocess.Popen(["dvc", "repro", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            if match := STAGE_START.match(line):
                now = time.perf_counter() - start
                if stages:
                    stages[-1]["seconds"] = now - stages[-1]["started"]
                stages.append({"stage": match.group(1), "started": now})
    total = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"dvc repro failed with exit code {process.returncode}")
    if stages:
        stages[-1]["seconds"] = total - stages[-1]["started"]
    return [{"stage": s["stage"], "seconds": round(s["seconds"], 1)} for s in stages], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "end_to_end.json")
    args = parser.parse_args()
    stages, total = timed_repro(["--force"] if args.force else [], ROOT)
    print(f"\n{'stage':<16}{'seconds':>9}{'share':>8}")
    for stage in sorted(stages, key=lambda s: -s["seconds"]):
        print(f"{stage['stage']:<16}{stage['seconds']:>9.1f}{stage['seconds'] / total:>8.1%}")
    print(f"{'total':<16}{total:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", *sys.argv]), "total_seconds": round(total, 1), "stages": stages}
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Latency benchmark: `factory audit "SELECT 1"` from a cold start, and a no-op `dvc repro` of the default pipeline.

Run from the repository root:

    python bench/latency.py                          # a temporary clone of HEAD, outputs checked out from .dvc/cache
    python bench/latency.py --rev HEAD~1             # a clone of the last commit whose dvc.lock matches its code
    python bench/latency.py --in-place --repeats 7   # this checkout as it is (it must be up to date)
    python bench/latency.py --json bench/results/latency.json

Each figure is the median wall time of `--repeats` fresh subprocesses (after one
untimed run that warms the page cache and writes bytecode), timed against a
baseline in the same run, interleaved, so machine noise hits both alike:

- audit: `factory audit "SELECT 1"` (the console script: argument parsing, the
  catalog of every table under data/ as DuckDB views, the query) against
  `python -c "import duckdb; duckdb.sql('SELECT 1')"`. The ratio is the CLI's
  overhead over DuckDB's own start. Target: under 1 s.
- repro: `dvc repro` with every stage up to date against `dvc status` on the
  same checkout (the same pipeline, lock and params parsing and the same
  hashing of deps and outs; repro parses dvc.yaml and dvc.lock a second time
  and takes each stage's lock). Target: under 3 s. `dvc --version` is printed
  too, as the floor of starting DVC.

`dvc repro` is only ever run as a no-op: the script refuses to run it (after
timing the audit) unless `dvc status` reports nothing to do, checked before
every run. By default it
works in a throwaway `git clone` of HEAD (or `--rev`) whose outputs are
checked out from a DVC cache (`--cache`, default this checkout's
`.dvc/cache`), so nothing another process does to this tree can turn the
no-op into a real run, and this tree is never written. A commit whose code
changed after its dvc.lock was written is refused too: pick the last
reproduced one with `--rev`. A fresh clone has no cache: reproduce once
(`dvc repro`, about 15 minutes on 2 cores) or pass another checkout's cache.
In the clone the audit reads the clone's data/ with the clone's code
(PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AUDIT_TARGET_S = 1.0
REPRO_TARGET_S = 3.0


def _tool(name: str) -> str:
    """The console script installed next to this Python (not a version manager's shim, which adds its own start-up)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"bench/latency.py: `{name}` is not installed in this environment")
    return found


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True)


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    _run(cmd, cwd, env)
    return time.perf_counter() - started


def _require_up_to_date(dvc: str, checkout: Path, env: dict[str, str]) -> None:
    """Stop unless `dvc status` has nothing to do: a `dvc repro` here must be a no-op."""
    if stale := sorted(json.loads(_run([dvc, "status", "--json"], checkout, env).stdout or "{}")):
        raise SystemExit(f"bench/latency.py: {checkout} is not up to date ({', '.join(stale)}); not running `dvc repro`"
                         " (reproduce it first, or clone a reproduced commit with --rev)")


def _clone_with_outputs(rev: str, cache: Path, into: Path, env: dict[str, str]) -> Path:
    """A `git clone` at `rev` whose DVC outputs are checked out (copied) from `cache`."""
    if not (cache / "files").is_dir():
        raise SystemExit(f"bench/latency.py: no DVC cache at {cache}; reproduce the pipeline once or pass --cache")
    checkout = into / "clone"
    commit = _run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], REPO, env).stdout.strip()
    _run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(checkout)], into, env)
    _run(["git", "checkout", "--quiet", commit], checkout, env)
    dvc = _tool("dvc")
    _run([dvc, "config", "--local", "cache.dir", str(cache)], checkout, env)
    _run([dvc, "config", "--local", "cache.type", "copy"], checkout, env)  # never link the clone's files into the cache
    _run([dvc, "checkout", "--quiet"], checkout, env)
    return checkout


def _compare(target: list[str], baseline: list[str], cwd: Path, env: dict[str, str], repeats: int,
             before_target=None) -> tuple[list[float], list[float]]:
    """Interleaved wall times of `target` and `baseline` after one untimed run of each."""
    if before_target:
        before_target()
    _run(target, cwd, env)
    _run(baseline, cwd, env)
    target_s, baseline_s = [], []
    for _ in range(repeats):
        baseline_s.append(_timed(baseline, cwd, env))
        if before_target:
            before_target()
        target_s.append(_timed(target, cwd, env))
    return target_s, baseline_s


def _figure(name: str, target_s: list[float], baseline_s: list[float], target_limit: float) -> dict:
    target, baseline = statistics.median(target_s), statistics.median(baseline_s)
    return {
        "name": name,
        "median_s": round(target, 3),
        "baseline_median_s": round(baseline, 3),
        "ratio": round(target / baseline, 2),
        "target_s": target_limit,
        "met": target < target_limit,
        "runs_s": [round(t, 3) for t in target_s],
        "baseline_runs_s": [round(t, 3) for t in baseline_s],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command (median reported)")
    parser.add_argument("--in-place", action="store_true", help="time this checkout, not a clone")
    parser.add_argument("--rev", default="HEAD", help="the commit to clone (its dvc.lock must match its code)")
    parser.add_argument("--cache", type=Path, default=REPO / ".dvc" / "cache",
                        help="DVC cache the clone's outputs are checked out from")
    parser.add_argument("--json", type=Path, help="also write the figures here (e.g. bench/results/latency.json)")
    args = parser.parse_args()

    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    dvc, factory = _tool("dvc"), _tool("factory")
    with tempfile.TemporaryDirectory(prefix="factory-latency-") as scratch:
        if args.in_place:
            checkout = REPO
        else:
            checkout = _clone_with_outputs(args.rev, args.cache.resolve(), Path(scratch), env)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
        audit = _figure("factory audit \"SELECT 1\"", *_compare(
            [factory, "audit", "SELECT 1"],
            [sys.executable, "-c", "import duckdb; duckdb.sql('SELECT 1')"],
            checkout, env, args.repeats), AUDIT_TARGET_S)
        audit["baseline"] = "python -c \"import duckdb; duckdb.sql('SELECT 1')\""
        print(f"{audit['name']}: {audit['median_s']:.3f} s (target < {audit['target_s']:g} s: "
              f"{'met' if audit['met'] else 'NOT met'}); baseline {audit['baseline']}: "
              f"{audit['baseline_median_s']:.3f} s; ratio {audit['ratio']:.2f}x", flush=True)
        _require_up_to_date(dvc, checkout, env)
        repro = _figure("dvc repro (no-op)", *_compare(
            [dvc, "repro"], [dvc, "status"], checkout, env, args.repeats,
            before_target=lambda: _require_up_to_date(dvc, checkout, env)), REPRO_TARGET_S)
        repro["baseline"] = "dvc status"
        repro["dvc_version_median_s"] = round(statistics.median(
            _timed([dvc, "--version"], checkout, env) for _ in range(args.repeats)), 3)

    result = {"checkout": "in place" if args.in_place else f"clone of {args.rev}", "repeats": args.repeats,
              "audit": audit, "repro": repro}
    print(f"{repro['name']}: {repro['median_s']:.3f} s (target < {repro['target_s']:g} s: "
          f"{'met' if repro['met'] else 'NOT met'}); baseline {repro['baseline']}: "
          f"{repro['baseline_median_s']:.3f} s; ratio {repro['ratio']:.2f}x")
    print(f"dvc --version: {repro['dvc_version_median_s']:.3f} s")
    print(f"summary: audit {audit['median_s']:.2f} s = {audit['ratio']:.2f}x duckdb; "
          f"no-op repro {repro['median_s']:.2f} s = {repro['ratio']:.2f}x dvc status "
          f"({result['checkout']}, median of {args.repeats})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Killed anywhere, resumed identical (issue 21): each long stage is SIGKILLed at several points and run again.

One small project (a tiny model, a few problems, small params) is run once, stage by stage, as the pipeline
runs it (`python -m factory.cli ...` in the project folder, relative paths): its outputs are the reference.
Then, for each command and kill point, a fresh project folder gets only that command's inputs (byte copies),
the command is started and SIGKILLed at the kill point, started again and run to the end, and the folder must
hold exactly the inputs and the reference outputs: the same files with the same bytes (Parquet tables and JSON
summaries as bytes, model folders file by file) and nothing else: no `.NAME.tmp-PID` file or folder, no
`.NAME.shards` checkpoint folder, no half-written output.

Kill points:
- by time: a fraction of the reference run's wall time (inside the work; the case passes without a kill if
  a run is faster than that);
- by observable progress, polling the folder: the second finished shard of `factory sample`;
- inside the final writes, deterministically: the command runs in a child (`CHILD`) that SIGKILLs itself at
  the rename of a chosen output's temp file (`before:NAME`, the temp file cut to half its bytes first: a write
  killed half-way) or right after that rename (`after:NAME`: some outputs new, the others missing). Polling
  for those temp files could miss them, since a small table is written in a millisecond.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false"}
REPO = Path(__file__).resolve().parents[1]
MODEL = "models/iter_0"
PROBLEMS = "data/problems.parquet"
IT = "data/iter_1"
METRICS = "metrics/iterations"

PARAMS = {
    "recipe": "dpo_st",
    "iterations": {"1": {"prev": 0}},
    "eval": {"splits": ["test", "test_ood"], "max_new_tokens": 32, "batch_size": 4, "calculator": True},
    "sample": {"split": "train", "limit": 0, "n": 2, "temperature": 1.0, "max_new_tokens": 24, "batch_size": 4,
               "shard_size": 1, "seed": 3},
    "filter": {"min_steps": 1, "max_tokens": 256},
    "steps": {"max_new_tokens": 24, "attempts": 1, "parents_per_problem": 1, "negatives_per_problem": 1,
              "rollouts": 2, "rollout_samples": 2, "batch_size": 8},
    "mcts": {"problems": 2, "width": 2, "simulations": 1, "max_depth": 2, "max_step_tokens": 16, "batch_size": 8},
    "prm": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "max_length": 256},
    "pairs": {"pairs_per_problem": 1, "include_gold": True},
}
SIZES = {"train": 4, "dev": 2, "answers": 2, "unlabeled": 2, "test": 4, "test_ood": 2}

# Runs `factory.cli.main(argv)` and SIGKILLs itself at the rename of output NAME's temp file (argv[1] is
# `before:NAME`, `after:NAME`, or `before:NAME:K` for its K-th rename).
CHILD = """
import os, signal, sys
when, name, *k = sys.argv[1].split(":")
left = [int(k[0]) if k else 1]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == name:
        left[0] -= 1
        if left[0] == 0 and when == "before":
            if os.path.isfile(src):  # a write killed half-way: half of the temp file's bytes
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *args, **kwargs)
        if left[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    real_replace(src, dst, *args, **kwargs)
os.replace = replace
from factory.cli import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Command:
    argv: list[str]
    inputs: list[str]  # what a fresh folder gets copied from the reference project
    outputs: list[str]  # files or folders it writes
    seconds: float = 0.0  # the reference run's wall time


def factory_argv(argv) -> list[str]:
    return [sys.executable, "-m", "factory.cli", *argv]


def run_ok(argv, cwd: Path) -> float:
    start = time.monotonic()
    result = subprocess.run(factory_argv(argv), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"factory {' '.join(argv)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return time.monotonic() - start


STEP_RECIPES = ("scdpo", "sipf_orpo", "mcts_dpo")


def commands() -> dict[str, Command]:
    base = [MODEL, PROBLEMS, "params.yaml"]
    steps = {f"steps:{recipe}": Command(
        ["steps", "--recipe", recipe, "--model", MODEL, "--problems", PROBLEMS, "--samples", f"{IT}/kept.parquet",
         "--labels", f"{IT}/labels.parquet", "--iteration", "1", "--out", f"{IT}/steps_{recipe}",
         "--summary", f"{METRICS}/iter_1/steps_{recipe}.json", "--params", "params.yaml"],
        base + [f"{IT}/kept.parquet", f"{IT}/labels.parquet"],
        [f"{IT}/steps_{recipe}", f"{METRICS}/iter_1/steps_{recipe}.json"]) for recipe in STEP_RECIPES}
    return {
        "sample": Command(["sample", "--model", MODEL, "--problems", PROBLEMS, "--iteration", "1",
                           "--out", f"{IT}/samples.parquet", "--params", "params.yaml"],
                          base, [f"{IT}/samples.parquet"]),
        "label": Command(["label", f"{IT}/mixed.parquet", "--problems", PROBLEMS, "--out", f"{IT}/labels.parquet",
                          "--votes", f"{IT}/votes.parquet", "--summary", f"{METRICS}/iter_1/label.json"],
                         [PROBLEMS, f"{IT}/mixed.parquet"],
                         [f"{IT}/labels.parquet", f"{IT}/votes.parquet", f"{METRICS}/iter_1/label.json"]),
        "filter": Command(["filter", f"{IT}/mixed.parquet", "--labels", f"{IT}/labels.parquet", "--iteration", "1",
                           "--out", f"{IT}/kept.parquet", "--dropped", f"{IT}/dropped.parquet",
                           "--counts", f"{METRICS}/iter_1/filter.json", "--params", "params.yaml"],
                          ["params.yaml", f"{IT}/mixed.parquet", f"{IT}/labels.parquet"],
                          [f"{IT}/kept.parquet", f"{IT}/dropped.parquet", f"{METRICS}/iter_1/filter.json"]),
        **steps,
        "pairs": Command(["pairs", "--recipe", "scdpo", "--problems", PROBLEMS, "--samples", f"{IT}/kept.parquet",
                          "--labels", f"{IT}/labels.parquet", "--model", MODEL, "--iteration", "1",
                          "--steps", f"{IT}/steps_scdpo", "--out", f"{IT}/pairs.parquet",
                          "--summary", f"{METRICS}/iter_1/pairs.json", "--params", "params.yaml"],
                         base + [f"{IT}/kept.parquet", f"{IT}/labels.parquet", f"{IT}/steps_scdpo"],
                         [f"{IT}/pairs.parquet", f"{METRICS}/iter_1/pairs.json"]),
        "eval": Command(["eval", "--model", MODEL, "--problems", PROBLEMS, "--iteration", "0",
                         "--out", f"{METRICS}/iter_0/eval.json", "--predictions", "data/iter_0/eval.parquet",
                         "--params", "params.yaml"],
                        base, [f"{METRICS}/iter_0/eval.json", "data/iter_0/eval.parquet"]),
        "report": Command(["report", "--metrics", METRICS, "--out", "metrics/flywheel.json",
                           "--plot", "metrics/flywheel_plot.json", "--html", "metrics/report.html",
                           "--params", "params.yaml"],
                          ["params.yaml", "data", METRICS],
                          ["metrics/flywheel.json", "metrics/flywheel_plot.json", "metrics/report.html"]),
    }


def mixed_samples(samples_path: Path, problems_path: Path, out: Path) -> None:
    """The sampled rows with some texts replaced by gold rationales: of each problem, sample 0 gets its own
    (correct) and sample 1 the next problem's (wrong), so labels, the filter, steps and pairs all have work."""
    import pyarrow.parquet as pq

    from factory.lineage import write_table
    from factory.schema import from_rows

    problems = [p for p in pq.read_table(problems_path).to_pylist() if p["split"] == "train"]
    rationale = {p["problem_id"]: p["gold_rationale"] for p in problems}
    following = {p["problem_id"]: problems[(i + 1) % len(problems)]["gold_rationale"] for i, p in enumerate(problems)}
    rows = pq.read_table(samples_path).to_pylist()
    for row in rows:
        row["text"] = (rationale if row["sample_index"] == 0 else following)[row["problem_id"]]
        row["finish_reason"] = "stop"
    write_table(from_rows(rows, "samples"), out, kind="samples", stage="test")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """(project folder, {command: Command}): every command run once, uninterrupted, in pipeline order."""
    import pyarrow.parquet as pq

    from factory.problems.arith import ArithConfig, generate_problems
    from factory.schema import from_rows

    # Every run uses a frozen copy of the code: tables record a hash of the modules that ran (code_version), and
    # an edit to the shared tree between the reference run and a resumed one would change every table's bytes.
    code = tmp_path_factory.mktemp("code")
    for package in ("factory", "train"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    ENV["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    found = subprocess.run([sys.executable, "-c", "import factory; print(factory.__file__)"], cwd=code.parent,
                           env=ENV, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).is_relative_to(code), found
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(tiny_model_dir[0], root / MODEL)
    (root / "data").mkdir(exist_ok=True)
    pq.write_table(from_rows(generate_problems(ArithConfig(sizes=SIZES)), "problems"), root / PROBLEMS)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    cmds = commands()
    order = ["sample", "label", "filter", *(f"steps:{r}" for r in STEP_RECIPES), "pairs", "eval", "report"]
    for name in order:
        if name == "label":
            mixed_samples(root / IT / "samples.parquet", root / PROBLEMS, root / IT / "mixed.parquet")
        if name == "report":  # the report reads each iteration's steps.json and eval.json (no model iter_1 here)
            shutil.copy(root / METRICS / "iter_1" / "steps_scdpo.json", root / METRICS / "iter_1" / "steps.json")
            shutil.copy(root / METRICS / "iter_0" / "eval.json", root / METRICS / "iter_1" / "eval.json")
        cmds[name].seconds = run_ok(cmds[name].argv, root)
    assert hidden_leftovers(root) == []
    return root, cmds


def hidden_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def snapshot(root: Path, paths) -> dict[str, bytes | None]:
    """Every file and folder under `paths` of `root` (all of `root` without `paths`): relative path -> bytes
    (None for a folder)."""
    found = {}
    for top in [root / p for p in paths] if paths is not None else [root]:
        entries = [top, *top.rglob("*")] if top.is_dir() else [top]
        for entry in entries:
            if entry != root:
                found[entry.relative_to(root).as_posix()] = None if entry.is_dir() else entry.read_bytes()
    return found


def fresh_project(reference_root: Path, command: Command, folder: Path) -> dict[str, bytes | None]:
    """`folder` with `command`'s inputs copied from the reference; returns what it must hold after the command."""
    folder.mkdir()
    for name in command.inputs:
        source, target = reference_root / name, folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    expected = snapshot(folder, None)
    for parent in {Path(o).parent for o in command.outputs}:  # the output folders the command makes
        for level in [parent, *parent.parents][:-1]:
            expected.setdefault(level.as_posix(), None)
    expected.update(snapshot(reference_root, command.outputs))
    return expected


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `process` once `ready()` holds (polled); False if the process ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait(timeout=60)
    return False


@dataclass(frozen=True)
class Kill:
    how: str  # "time" (seconds), "fraction" (of the reference's wall time), "glob" (a path pattern), "hook"
    at: object
    must_land: bool = True  # the process must be killed (not finish first)

    @property
    def id(self) -> str:
        return f"{self.how}={self.at}"


def kill_points(name: str) -> list[Kill]:
    """Few per command (each case starts the command twice): one or two in the work, one or two in the final writes."""
    if name == "sample":
        shards = f"{IT}/.samples.parquet.shards/job-*"
        return [Kill("glob", f"{shards}/shard-00001.parquet"), Kill("hook", "before:samples.parquet")]
    if name == "label":
        return [Kill("fraction", 0.6, must_land=False), Kill("hook", "before:labels.parquet"),
                Kill("hook", "after:labels.parquet")]
    if name == "filter":
        return [Kill("hook", "before:kept.parquet"), Kill("hook", "after:dropped.parquet")]
    if name == "steps:scdpo":
        return [Kill("fraction", 0.5, must_land=False), Kill("hook", "after:samples.parquet")]
    if name == "steps:sipf_orpo":
        return [Kill("hook", "after:samples.parquet"), Kill("hook", "before:prm")]
    if name == "steps:mcts_dpo":
        return [Kill("fraction", 0.5, must_land=False)]
    if name == "pairs":
        return [Kill("fraction", 0.5, must_land=False), Kill("hook", "before:pairs.parquet")]
    if name == "eval":
        return [Kill("fraction", 0.5, must_land=False), Kill("hook", "after:eval.json")]
    if name == "report":
        return [Kill("hook", "before:flywheel.json"), Kill("hook", "after:flywheel_plot.json")]
    raise KeyError(name)


def cases():
    for name in commands():
        for kill in kill_points(name):
            yield pytest.param(name, kill, id=f"{name}-{kill.id}")


@pytest.mark.parametrize(("name", "kill"), list(cases()))
def test_killed_then_rerun_writes_the_reference_bytes_and_leaves_nothing(reference, tmp_path, name, kill):
    root, cmds = reference
    command = cmds[name]
    folder = tmp_path / "project"
    expected = fresh_project(root, command, folder)

    if kill.how == "hook":
        result = subprocess.run([sys.executable, "-c", CHILD, kill.at, *command.argv], cwd=folder, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == -signal.SIGKILL, f"the hook never fired:\n{result.stderr[-3000:]}"
        landed = True
    else:
        process = subprocess.Popen(factory_argv(command.argv), cwd=folder, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill.how == "glob":
            landed = kill_when(process, lambda: any(folder.glob(kill.at)))
        else:
            delay = kill.at if kill.how == "time" else kill.at * command.seconds
            deadline = time.monotonic() + delay
            landed = kill_when(process, lambda: time.monotonic() >= deadline)
        if kill.must_land:
            assert landed, f"{name} finished before the kill point {kill.id}"

    run_ok(command.argv, folder)  # resume: the command again, to the end
    got = snapshot(folder, None)
    extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    assert not extra and not missing, f"left over: {extra}; missing: {missing}"
    differ = sorted(path for path in expected if got[path] != expected[path])
    assert not differ, f"not the bytes of the uninterrupted run: {differ}"

"""Two writers of one output never mix: a shard folder per job (its fingerprint), locked while a run uses it.

The unit tests drive `run_in_shards` with other processes holding or having held job folders; the slow ones
run two real `factory sample` processes at once on one `--out`, with different and with the same params."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import sampling_workspace
from factory.lineage import read_provenance, read_table
from factory.shards import _held, clear_shards, job_dir, run_in_shards, shard_dir_for

# Holds the flock of job folder argv[1] until stdin closes; prints "locked" once it holds it.
LIMIT = 24  # test problems sampled: 6 shards of 4

HOLDER = """
import fcntl, os, sys
from pathlib import Path
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def rows_of(items):
    return [{"problem_id": f"p-{i}", "question": f"q{i}", "source": "t", "split": "s"} for i in items]


def hold(folder):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def release(process):
    process.stdin.close()
    process.wait()


def test_jobs_with_other_fingerprints_keep_their_own_shards(tmp_path):
    shard_dir = shard_dir_for(tmp_path / "out.parquet")
    calls = []

    def crashing(items):
        if len(calls) == 2:
            raise KeyboardInterrupt  # job a killed after two shards
        calls.append(list(items))
        return rows_of(items)

    with pytest.raises(KeyboardInterrupt):
        run_in_shards(list(range(6)), crashing, shard_size=2, shard_dir=shard_dir, fingerprint="a", kind="problems")
    assert not [f for f in _held if f.parent == shard_dir]  # a failed run lets go of its job
    other = run_in_shards(list(range(10, 16)), lambda items: rows_of(items), shard_size=2, shard_dir=shard_dir,
                          fingerprint="b", kind="problems")
    assert [r["problem_id"] for r in other] == [f"p-{i}" for i in range(10, 16)]
    assert job_dir(shard_dir, "a") != job_dir(shard_dir, "b")
    assert len(list(job_dir(shard_dir, "a").glob("shard-*.parquet"))) == 2  # job b left job a's shards alone

    calls.clear()
    resumed = run_in_shards(list(range(6)), lambda items: calls.append(list(items)) or rows_of(items),
                            shard_size=2, shard_dir=shard_dir, fingerprint="a", kind="problems")
    assert [r["problem_id"] for r in resumed] == [f"p-{i}" for i in range(6)] and calls == [[4, 5]]
    clear_shards(shard_dir)
    assert not shard_dir.exists() and not [f for f in _held if f.parent == shard_dir]


def test_a_second_run_of_one_job_waits_for_the_first(tmp_path, capfd):
    out = tmp_path / "out.parquet"
    shard_dir = shard_dir_for(out)
    holder = hold(job_dir(shard_dir.absolute(), "a"))  # another process is running job a
    releaser = threading.Timer(1.0, release, (holder,))
    releaser.start()
    started = time.monotonic()
    rows = run_in_shards(list(range(4)), rows_of, shard_size=2, shard_dir=shard_dir, fingerprint="a", kind="problems")
    releaser.join()
    assert time.monotonic() - started >= 0.9 and len(rows) == 4
    assert f"waiting for another run writing {out.absolute()} with the same params" in capfd.readouterr().err
    clear_shards(shard_dir)
    assert not shard_dir.exists()


def test_clearing_leaves_a_live_runs_job_and_removes_dead_ones(tmp_path):
    shard_dir = shard_dir_for(tmp_path / "out.parquet").absolute()
    dead = job_dir(shard_dir, "dead")
    dead.mkdir(parents=True)
    (dead / "shard-00000.parquet").write_bytes(b"x")
    (shard_dir / "shard-00000.parquet").write_bytes(b"old layout")
    live = hold(job_dir(shard_dir, "live"))
    try:
        run_in_shards([1, 2], rows_of, shard_size=2, shard_dir=shard_dir, fingerprint="mine", kind="problems")
        clear_shards(shard_dir)
        assert sorted(p.name for p in shard_dir.iterdir()) == [job_dir(shard_dir, "live").name]
    finally:
        release(live)
    clear_shards(shard_dir)
    assert not shard_dir.exists()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model):
    root = sampling_workspace(tmp_path_factory.mktemp("two_writers"), tiny_model)
    for n in (2, 3):
        (root / f"params_{n}.yaml").write_text(yaml.safe_dump({"sample": {
            "n": n, "temperature": 1.0, "max_new_tokens": 32, "batch_size": 8, "seed": 5, "split": "test",
            "limit": LIMIT, "shard_size": 4}}))
    return root


def sample(root, out, n):
    return subprocess.Popen(
        [sys.executable, "-m", "factory.cli", "sample", "--model", str(root / "model"), "--problems",
         str(root / "problems.parquet"), "--iteration", "1", "--out", str(out), "--params", str(root / f"params_{n}.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_samples(path, n):
    rows = read_table(path, "samples").to_pylist()
    assert read_provenance(path)["params"]["n"] == n
    assert len(rows) == LIMIT * n and len({r["sample_id"] for r in rows}) == LIMIT * n
    per_problem = {}
    for row in rows:
        per_problem.setdefault(row["problem_id"], []).append(row["sample_index"])
    assert all(sorted(indices) == list(range(n)) for indices in per_problem.values())


@pytest.mark.slow
def test_two_runs_with_different_params_on_one_output_each_write_their_own(workspace):
    out = workspace / "samples.parquet"
    first, second = sample(workspace, out, 2), sample(workspace, out, 3)
    results = [(process, *process.communicate(timeout=600)) for process in (first, second)]
    for (process, stdout, stderr), n in zip(results, (2, 3)):
        assert process.returncode == 0, stderr[-2000:]
        assert f"{out}: {LIMIT * n} samples ({n} per problem" in stdout  # mixed shards: other counts
    check_samples(out, read_provenance(out)["params"]["n"])  # the last to finish: whole, never mixed
    assert not shard_dir_for(out).exists()


@pytest.mark.slow
def test_two_runs_with_the_same_params_take_turns(workspace):
    out = workspace / "same.parquet"
    first, second = sample(workspace, out, 2), sample(workspace, out, 2)
    (_, err_first), (_, err_second) = first.communicate(timeout=600), second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, err_first[-2000:] + err_second[-2000:]
    waited = [f"waiting for another run writing {out}" in err for err in (err_first, err_second)]
    assert sorted(waited) == [False, True]  # one ran, the other waited for it, then wrote the same rows
    check_samples(out, 2)
    assert not shard_dir_for(out).exists()

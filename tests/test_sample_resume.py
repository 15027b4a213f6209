"""`factory sample` killed mid-run (SIGKILL) and restarted writes the same bytes as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import sampling_workspace
from factory.lineage import read_provenance, read_table
from factory.shards import run_in_shards, shard_dir_for

pytestmark = pytest.mark.slow

SAMPLE_PARAMS = {"n": 2, "temperature": 1.0, "max_new_tokens": 48, "batch_size": 8, "seed": 5,
                 "split": "test", "limit": 40, "shard_size": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model):
    root = sampling_workspace(tmp_path_factory.mktemp("sample"), tiny_model)
    (root / "params.yaml").write_text(yaml.safe_dump({"sample": SAMPLE_PARAMS}))
    return root


def sample_command(root, out):
    return [sys.executable, "-m", "factory.cli", "sample", "--model", str(root / "model"),
            "--problems", str(root / "problems.parquet"), "--iteration", "1", "--out", str(out),
            "--params", str(root / "params.yaml")]


def test_killed_and_resumed_run_writes_the_same_bytes(workspace):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole = workspace / "whole.parquet"
    subprocess.run(sample_command(workspace, whole), check=True, env=env, capture_output=True)

    resumed = workspace / "resumed.parquet"
    shards = shard_dir_for(resumed)
    process = subprocess.Popen(sample_command(workspace, resumed), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(shards.glob("job-*/shard-00002.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in shards.glob("job-*/shard-*.parquet"))
    assert not resumed.exists(), "the run finished before it could be killed"
    assert 3 <= len(finished) < 10

    result = subprocess.run(sample_command(workspace, resumed), check=True, env=env,
                            capture_output=True, text=True)
    assert "resumed" in result.stdout
    assert resumed.read_bytes() == whole.read_bytes()
    assert not shards.exists()
    rows = read_table(resumed, "samples").to_pylist()
    assert len(rows) == 80 and len({r["sample_id"] for r in rows}) == 80
    assert read_provenance(resumed)["model_id"] == rows[0]["model_id"]


def test_shards_of_another_job_are_never_mixed_in(tmp_path):
    calls = []

    def work(items):
        calls.append(list(items))
        return [{"problem_id": "p-1", "question": f"q{i}", "source": "t", "split": "s"} for i in items]

    shard_dir = tmp_path / "shards"
    first = run_in_shards(list(range(5)), work, shard_size=2, shard_dir=shard_dir, fingerprint="a",
                          kind="problems")
    again = run_in_shards(list(range(5)), work, shard_size=2, shard_dir=shard_dir, fingerprint="a",
                          kind="problems")
    assert again == first and len(calls) == 3  # all three shards read back, none recomputed
    run_in_shards(list(range(5)), work, shard_size=2, shard_dir=shard_dir, fingerprint="b", kind="problems")
    assert len(calls) == 6  # a different job recomputes everything

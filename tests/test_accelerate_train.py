"""Training on several processes (issue 22): the training commands under `accelerate launch`, tested on the CPU.

Two processes on this machine's CPU with the gloo backend: `accelerate launch --multi_gpu` starts them through
torchrun, and Trainer (`use_cpu`) sets up a multi-CPU process group. What is checked is what N processes could
break: each command exits 0, writes its model, lineage and tables once, and leaves no checkpoint or temp file; dev
scoring, checkpoint decisions and the second round of sampling run on the main process without a deadlock. NCCL
on real GPUs is not tested here (no GPU on this machine). The weights differ from a one-process run's: the
effective batch is N times `batch_size`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import first_round_inputs
from factory.lineage import model_id, read_model_lineage
from factory.modeling import load_model
from test_iteration import PARAMS as ITERATION_PARAMS

pytestmark = pytest.mark.slow

PARAMS = {**ITERATION_PARAMS,
          "warmup": {**ITERATION_PARAMS["warmup"], "max_epochs": 3},
          "dpo": {"epochs": 1, "batch_size": 2, "warmup_steps": 0},  # 2 steps on each process: a checkpoint between
          "orpo": {"epochs": 1, "batch_size": 4, "warmup_steps": 0, "max_length": 256}}
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return first_round_inputs(tmp_path_factory.mktemp("accelerate"), PARAMS)


def p(root: Path, *parts: str) -> str:
    return str(root.joinpath(*parts))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(argv: list[str], **env) -> tuple[list[str], dict]:
    """The command and environment that run `factory ARGV` as 2 CPU processes under `accelerate launch`."""
    if not ACCELERATE.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "factory.cli", *argv]
    return command, {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", **env}


def launch(argv: list[str], **env) -> str:
    """Run `factory ARGV` as 2 CPU processes under `accelerate launch`; its output (stdout and stderr)."""
    command, variables = launch_command(argv, **env)
    done = subprocess.run(command, env=variables, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def assert_nothing_left(root: Path, *names: str) -> None:
    """No checkpoint, shard, dataset or temp folder of the outputs `names` is left beside or in them."""
    left = [e.name for e in root.iterdir() if e.name.startswith(".") and any(n in e.name for n in names)]
    left += [str(e) for n in names if (root / n).exists() for e in (root / n).rglob("*") if ".tmp" in e.name]
    assert left == []


def assert_model(out: Path, stage: str) -> dict:
    lineage = read_model_lineage(out)
    assert lineage["stage"] == stage and lineage["model_id"] == model_id(out)
    load_model(out)
    return lineage


def test_warmup_on_two_processes_scores_every_epoch_once_and_writes_the_model_once(project):
    out = launch(["warmup", "--problems", p(project, "problems.parquet"), "--base", p(project, "base"),
                  "--out", p(project, "warm"), "--curve", p(project, "curve.json"),
                  "--params", p(project, "params.yaml")])
    # 12 examples, 4 a process, 2 processes: 2 steps an epoch, each epoch scored by the main process alone.
    assert [line.split(":")[0] for line in out.splitlines() if "dev accuracy" in line and "(epoch" in line] \
        == ["step 2 (epoch 1.0)", "step 4 (epoch 2.0)", "step 6 (epoch 3.0)"]
    assert out.count(f"{p(project, 'warm')}: model ") == 1
    lineage = assert_model(project / "warm", "warmup")
    assert lineage["metrics"]["steps"] == 6 and lineage["parent"] == model_id(project / "base")
    assert [h["step"] for h in json.loads((project / "curve.json").read_text())] == [2, 4, 6]
    assert_nothing_left(project, "warm")


def test_dpo_st_on_two_processes_trains_dpo_samples_once_then_sfts(project):
    argv = ["train", "--recipe", "dpo_st", "--iteration", "1", "--problems", p(project, "problems.parquet"),
            "--prev", p(project, "prev"), "--base", p(project, "base"), "--pairs", p(project, "pairs.parquet"),
            "--samples", p(project, "samples.parquet"), "--labels", p(project, "labels.parquet"),
            "--work", p(project, "work_st"), "--out", p(project, "st"), "--summary", p(project, "st.json"),
            "--params", p(project, "params.yaml")]
    out = launch(argv)
    assert out.count(f"{p(project, 'st')}: model ") == 1
    lineage = assert_model(project / "st", "train:dpo_st")
    dpo = assert_model(project / "st" / "dpo", "dpo")
    summary = json.loads((project / "st.json").read_text())
    assert summary["model_id"] == lineage["model_id"] and summary["dpo"]["model_id"] == dpo["model_id"]
    assert summary["second_round"]["sampled_from"] == dpo["model_id"]
    assert [h["step"] for h in summary["sft"]["curve"]] == [2, 3]
    assert sorted(f.name for f in (project / "work_st").iterdir()) == [
        "dropped.parquet", "kept.parquet", "labels.parquet", "samples.parquet"]
    assert_nothing_left(project, "st")


def test_dpo_on_two_processes_killed_after_a_checkpoint_resumes_to_the_same_weights(project):
    """Every process resumes from the checkpoint the main process picks, with its own RNG and unlogged loss."""
    params = project / "params_dpo.yaml"
    params.write_text(yaml.safe_dump({**PARAMS, "dpo": {**PARAMS["dpo"], "epochs": 3}}))

    def dpo_argv(out: str) -> list[str]:
        return ["dpo", "--pairs", p(project, "pairs.parquet"), "--model", p(project, "prev"), "--out", p(project, out),
                "--params", str(params)]

    launch(dpo_argv("dpo"))
    assert assert_model(project / "dpo", "dpo")["metrics"]["steps"] >= 4
    command, variables = launch_command(dpo_argv("resumed"), FACTORY_CHECKPOINT_SECONDS="0")
    process = subprocess.Popen(command, env=variables, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list(project.glob(".resumed.checkpoints/*/checkpoint-*/checkpoint-complete.json")):
            assert process.poll() is None, f"finished before it could be killed:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        # torchrun starts each process in a session of its own: kill them and the launcher one by one.
        for member in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            member.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
    assert not (project / "resumed").exists()
    assert "resuming from" in launch(dpo_argv("resumed"), FACTORY_CHECKPOINT_SECONDS="0")
    assert (project / "resumed" / "model.safetensors").read_bytes() == \
        (project / "dpo" / "model.safetensors").read_bytes()
    assert_nothing_left(project, "dpo", "resumed")


def test_orpo_on_two_processes(project):
    from factory.lineage import read_table, write_table
    from factory.schema import from_rows

    rows = [{**row, "recipe": "sipf_orpo"} for row in read_table(project / "pairs.parquet", "pairs").to_pylist()]
    write_table(from_rows(rows, "pairs"), project / "orpo_pairs.parquet", kind="pairs", stage="pairs")
    launch(["train", "--recipe", "sipf_orpo", "--iteration", "1", "--problems", p(project, "problems.parquet"),
            "--prev", p(project, "prev"), "--base", p(project, "base"), "--pairs", p(project, "orpo_pairs.parquet"),
            "--samples", p(project, "samples.parquet"), "--labels", p(project, "labels.parquet"),
            "--work", p(project, "work_orpo"), "--out", p(project, "orpo"), "--summary", p(project, "orpo.json"),
            "--params", p(project, "params.yaml")])
    lineage = assert_model(project / "orpo", "train:sipf_orpo")
    assert lineage["metrics"]["pairs"] == len(rows)
    assert_nothing_left(project, "orpo")


def test_a_command_that_does_not_train_runs_once_as_a_plain_run(project):
    """Sampling so launched runs on rank 0 alone: a plain run's table, written once.

    Its provenance's code_version may differ from the in-process run's (it hashes the modules loaded), not its rows.
    """
    import pyarrow.parquet as pq

    from factory.lineage import read_provenance

    out = launch(["sample", "--model", p(project, "prev"), "--problems", p(project, "problems.parquet"),
                  "--iteration", "1", "--params", p(project, "params.yaml"), "--out", p(project, "launched.parquet")])
    assert out.count("does not train; rank 0 runs it alone") == 1
    assert pq.read_table(project / "launched.parquet").equals(pq.read_table(project / "samples.parquet"))
    launched, plain = (read_provenance(project / name) for name in ("launched.parquet", "samples.parquet"))
    assert {**launched, "code_version": None} == {**plain, "code_version": None}
    assert_nothing_left(project, "launched")

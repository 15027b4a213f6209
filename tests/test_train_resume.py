"""Killed anywhere, resumed identical (issue 21): SIGKILL a training command once it has checkpointed, run it
again, and the final weights are the bytes an uninterrupted run writes, with nothing left beside them.

Each command runs in a subprocess with FACTORY_CHECKPOINT_SECONDS=0 (a checkpoint at every opportunity), is
killed as soon as the first complete checkpoint (or sampling shard) appears, then runs again to the end. The
uninterrupted references are the in-process runs of the module's fixture (no checkpoints: the default interval
is 10 minutes).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import first_round_inputs
from factory.cli import main as cli
from factory.lineage import model_id
from test_iteration import PARAMS as ITERATION_PARAMS

pytestmark = pytest.mark.slow

# test_iteration's tiny project, with a shorter warm-up and training that outlasts the first checkpoint.
PARAMS = {**ITERATION_PARAMS,
          "warmup": {**ITERATION_PARAMS["warmup"], "max_epochs": 4},
          "sample": {**ITERATION_PARAMS["sample"], "max_new_tokens": 32, "shard_size": 3},
          "dpo": {"epochs": 2, "batch_size": 4, "warmup_steps": 0},  # steps left after the first checkpoint
          "orpo": {"epochs": 2, "batch_size": 4, "warmup_steps": 0, "max_length": 256},
          "self_train": {**ITERATION_PARAMS["self_train"], "max_steps": 6, "score_every": 3, "batch_size": 4}}
CLI = "import sys; from factory.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return first_round_inputs(tmp_path_factory.mktemp("resume"), PARAMS)


def p(root: Path, *parts: str) -> str:
    return str(root.joinpath(*parts))


def warmup_argv(root, out):
    return ["warmup", "--problems", p(root, "problems.parquet"), "--base", p(root, "base"), "--out", p(root, out),
            "--params", p(root, "params.yaml")]


def dpo_argv(root, out):
    return ["dpo", "--pairs", p(root, "pairs.parquet"), "--model", p(root, "prev"), "--out", p(root, out),
            "--params", p(root, "params.yaml")]


def train_argv(root, name):
    return ["train", "--recipe", "dpo_st", "--iteration", "1", "--problems", p(root, "problems.parquet"),
            "--prev", p(root, "prev"), "--base", p(root, "base"), "--pairs", p(root, "pairs.parquet"),
            "--samples", p(root, "samples.parquet"), "--labels", p(root, "labels.parquet"),
            "--work", p(root, f"work_{name}"), "--out", p(root, name), "--summary", p(root, f"{name}.json"),
            "--params", p(root, "params.yaml")]


def env():
    return {**os.environ, "FACTORY_CHECKPOINT_SECONDS": "0", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}


def kill_when(argv, root: Path, pattern: str, timeout: float = 120) -> None:
    """Run the CLI with `argv` and SIGKILL it as soon as a file matching `pattern` (under `root`) exists."""
    process = subprocess.Popen([sys.executable, "-c", CLI, *argv], env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not list(root.glob(pattern)):
            assert process.poll() is None, f"finished before it could be killed:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL, "finished before the kill landed"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_to_end(argv) -> str:
    done = subprocess.run([sys.executable, "-c", CLI, *argv], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_same_model(resumed: Path, reference: Path) -> None:
    assert (resumed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert model_id(resumed) == model_id(reference)


def assert_nothing_left(root: Path, *names: str) -> None:
    """No checkpoint, shard or temp folder of the outputs `names` is left beside them."""
    left = [e.name for e in root.iterdir() if e.name.startswith(".") and any(n in e.name for n in names)]
    left += [str(e) for n in names if (root / n).exists() for e in (root / n).rglob("*") if ".tmp" in e.name]
    assert left == []


CHECKPOINT = "checkpoints/*/checkpoint-*/checkpoint-complete.json"


def test_warmup_killed_mid_epoch_and_at_an_epoch_end_resumes_to_the_same_weights(project):
    # 12 examples in batches of 4: 3 steps an epoch. Killed after its first checkpoint (step 1, mid-epoch), then,
    # resumed, after the checkpoint of step 6 (the end of epoch 2, saved once the epoch was scored).
    kill_when(warmup_argv(project, "warm"), project, f".warm.{CHECKPOINT}")
    kill_when(warmup_argv(project, "warm"), project, ".warm.checkpoints/*/checkpoint-6/checkpoint-complete.json")
    assert not (project / "warm").exists()
    out = run_to_end(warmup_argv(project, "warm"))
    assert "resuming from" in out
    assert_same_model(project / "warm", project / "prev")
    assert_nothing_left(project, "warm")


def test_dpo_st_killed_in_dpo_in_the_second_round_and_in_sft_resumes_to_the_same_weights(project):
    assert cli(train_argv(project, "ref")) == 0
    # Killed during DPO (after its first checkpoint), then during the second round of sampling (after its first
    # shard; DPO is finished and is not trained again), then during the final SFT (after its first checkpoint).
    kill_when(train_argv(project, "st"), project, f"..st.dpo.{CHECKPOINT}")
    kill_when(train_argv(project, "st"), project, ".work_st-samples.shards/job-*/shard-*.parquet")
    kill_when(train_argv(project, "st"), project, f".st.{CHECKPOINT}")
    out = run_to_end(train_argv(project, "st"))
    assert "resuming from" in out and "not trained again" in out
    assert_same_model(project / "st", project / "ref")
    assert_same_model(project / "st" / "dpo", project / "ref" / "dpo")
    assert_nothing_left(project, "st")


class Crash(BaseException):
    """A run dying right after its first checkpoint (in-process: nothing of it runs on)."""


def test_orpo_crashed_after_a_checkpoint_resumes_to_the_same_weights(project, monkeypatch, capsys):
    import pyarrow.parquet as pq

    from train.common import Checkpoints
    from train.orpo import ORPORunConfig, main

    pairs = pq.read_table(project / "pairs.parquet").to_pylist()
    config = ORPORunConfig(**PARAMS["orpo"])
    main(pairs=pairs, model_dir=project / "prev", out_dir=project / "orpo_ref", config=config)
    monkeypatch.setenv("FACTORY_CHECKPOINT_SECONDS", "0")
    complete = Checkpoints._complete

    def complete_then_crash(self, checkpoint):
        complete(self, checkpoint)
        raise Crash

    monkeypatch.setattr(Checkpoints, "_complete", complete_then_crash)
    with pytest.raises(Crash):
        main(pairs=pairs, model_dir=project / "prev", out_dir=project / "orpo", config=config)
    monkeypatch.setattr(Checkpoints, "_complete", complete)
    capsys.readouterr()
    main(pairs=pairs, model_dir=project / "prev", out_dir=project / "orpo", config=config)
    assert "resuming from" in capsys.readouterr().out
    assert_same_model(project / "orpo", project / "orpo_ref")
    assert_nothing_left(project, "orpo")


def test_prm_loop_crashed_after_a_checkpoint_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    from test_prm import toy_examples

    from train.common import LoopCheckpoint
    from train.prm import PRMConfig, train_prm

    folder, tokenizer = tiny_model_dir
    examples = toy_examples(tokenizer, 12)
    # Held-out evaluations at steps 2, 4 and 6: the checkpoint at step 3 carries the best weights of step 2.
    config = PRMConfig(max_steps=6, learning_rate=3e-3, batch_size=5, warmup_steps=0, max_length=128,
                       heldout_fraction=0.25, eval_every=2, patience=0)
    reference = train_prm(examples=examples, model_dir=folder, out_dir=tmp_path / "ref", config=config)
    monkeypatch.setenv("FACTORY_CHECKPOINT_SECONDS", "0")
    save = LoopCheckpoint.save

    def save_then_crash(self, step, state):
        save(self, step, state)
        if step == 3:
            raise Crash

    monkeypatch.setattr(LoopCheckpoint, "save", save_then_crash)
    with pytest.raises(Crash):
        train_prm(examples=examples, model_dir=folder, out_dir=tmp_path / "prm", config=config)
    monkeypatch.setattr(LoopCheckpoint, "save", save)
    capsys.readouterr()
    resumed = train_prm(examples=examples, model_dir=folder, out_dir=tmp_path / "prm", config=config)
    assert "resuming from" in capsys.readouterr().out
    assert_same_model(tmp_path / "prm", tmp_path / "ref")
    assert resumed["batch_loss_last"] == reference["batch_loss_last"]
    assert resumed["curve"] == reference["curve"] and len(reference["curve"]) == 3
    assert (resumed["best_step"], resumed["heldout_accuracy"]) == (reference["best_step"], reference["heldout_accuracy"])
    assert_nothing_left(tmp_path, "prm")

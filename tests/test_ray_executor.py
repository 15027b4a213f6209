"""The generating stages on Ray (params `executor`): the same bytes as in one process, at any number of workers.

Ray starts once for the module (2 CPUs, like CI's machine); the stages find it running and use it. Without
Ray installed (`pip install 'factory[ray]'`) the module skips, except under CI, where it fails.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import sampling_workspace
from factory.executor import ExecutorConfig
from factory.generators.sampling import SamplingConfig, sample_to_file
from factory.params import ParamsError, section
from factory.shards import shard_dir_for

pytestmark = pytest.mark.slow

SAMPLE_PARAMS = {"n": 2, "max_new_tokens": 32, "batch_size": 4, "seed": 3, "split": "test", "limit": 24,
                 "shard_size": 4}
LOCAL, RAY_1, RAY_2 = (ExecutorConfig(), ExecutorConfig(kind="ray", workers=1),
                       ExecutorConfig(kind="ray", workers=2))


@pytest.fixture(scope="module")
def ray_installed():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed: pip install 'factory[ray]'")
        pytest.skip("ray is not installed: pip install 'factory[ray]'")
    return ray


@pytest.fixture(scope="module")
def ray_started(ray_installed):
    from factory.executor import connect

    connect(RAY_2)
    yield
    ray_installed.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model):
    return sampling_workspace(tmp_path_factory.mktemp("ray"), tiny_model, test_problems=24)


def sample_bytes(root, name: str, executor: ExecutorConfig, **params) -> bytes:
    out = root / f"{name}.parquet"
    sample_to_file(model_dir=str(root / "model"), problems_path=str(root / "problems.parquet"), out=str(out),
                   config=SamplingConfig(**SAMPLE_PARAMS | params), iteration=1, executor=executor)
    assert not shard_dir_for(out).exists()
    return out.read_bytes()


@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
def test_sample_on_ray_writes_the_local_bytes_at_any_number_of_workers(ray_started, workspace, temperature):
    local = sample_bytes(workspace, f"local-{temperature}", LOCAL, temperature=temperature)
    assert sample_bytes(workspace, f"ray1-{temperature}", RAY_1, temperature=temperature) == local
    assert sample_bytes(workspace, f"ray2-{temperature}", RAY_2, temperature=temperature) == local


EVAL_PARAMS = {"splits": ["test"], "max_new_tokens": 32, "batch_size": 4}


def eval_bytes(root, name: str, executor: ExecutorConfig) -> tuple[bytes, bytes]:
    """`factory eval`'s metrics and predictions, run in this process with `executor`."""
    from factory.cli import main

    params = root / f"params-{name}.yaml"
    params.write_text(yaml.safe_dump({"eval": EVAL_PARAMS, "executor": dataclasses.asdict(executor)}))
    metrics, predictions = root / f"{name}.json", root / f"{name}.parquet"
    assert main(["eval", "--model", str(root / "model"), "--problems", str(root / "problems.parquet"),
                 "--iteration", "1", "--out", str(metrics), "--predictions", str(predictions),
                 "--params", str(params)]) in (0, None)
    assert not shard_dir_for(predictions).exists()
    return metrics.read_bytes(), predictions.read_bytes()


def test_eval_on_ray_writes_the_local_bytes_and_one_generate_calls_predictions(ray_started, workspace):
    from factory.evaluate import EvalConfig, evaluate
    from factory.lineage import read_table
    from factory.modeling import load_model

    local = eval_bytes(workspace, "eval-local", LOCAL)
    assert eval_bytes(workspace, "eval-ray1", RAY_1) == local
    assert eval_bytes(workspace, "eval-ray2", RAY_2) == local
    # Shards are the decoder's own batches: the predictions of one `evaluate` call over every problem.
    problems = [p for p in read_table(workspace / "problems.parquet", "problems").to_pylist() if p["split"] == "test"]
    whole = evaluate(*load_model(workspace / "model"), problems, section({"eval": EVAL_PARAMS}, "eval", EvalConfig),
                     show_progress=False)
    written = read_table(workspace / "eval-local.parquet").to_pylist()
    assert [(r["problem_id"], r["text"], r["answer_status"]) for r in written] == \
        [(r["problem_id"], r["text"], r["answer_status"]) for r in whole.predictions]


def test_executor_params_are_checked_and_kept_out_of_what_dvc_tracks():
    for bad in ({"kind": "spark"}, {"workers": 0}, {"gpus_per_worker": -1}):
        with pytest.raises(ParamsError):
            section({"executor": bad}, "executor", ExecutorConfig)
    stages = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "dvc.yaml")))["stages"]
    tracked = [param for stage in stages.values() for param in (stage.get("do", stage).get("params") or [])]
    assert not [param for param in tracked if str(param).split(".")[0] == "executor"]


def test_a_killed_ray_sample_resumes_to_the_same_bytes(ray_installed, workspace):
    """`factory sample` on a Ray of its own (2 workers) killed with SIGKILL mid-run, then run again, writes the
    bytes of an uninterrupted local run."""
    def command(executor: dict, out):
        params = workspace / f"params-{executor['kind']}.yaml"
        params.write_text(yaml.safe_dump({"sample": SAMPLE_PARAMS | {"temperature": 1.0, "shard_size": 2},
                                          "executor": executor}))
        return [sys.executable, "-m", "factory.cli", "sample", "--model", str(workspace / "model"),
                "--problems", str(workspace / "problems.parquet"), "--iteration", "1", "--out", str(out),
                "--params", str(params)]

    whole, resumed = workspace / "whole.parquet", workspace / "resumed.parquet"
    subprocess.run(command({"kind": "local"}, whole), check=True, capture_output=True)
    on_ray = command({"kind": "ray", "workers": 2}, resumed)
    shards = shard_dir_for(resumed)
    process = subprocess.Popen(on_ray, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(shards.glob("job-*/shard-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not resumed.exists(), "the run finished before it could be killed"
    assert 2 <= len(list(shards.glob("job-*/shard-*.parquet"))) < 12

    result = subprocess.run(on_ray, check=True, capture_output=True, text=True)
    assert "resumed" in result.stdout
    assert resumed.read_bytes() == whole.read_bytes()


STEPS_PARAMS = {"max_new_tokens": 16, "batch_size": 8, "shard_size": 3, "rollouts": 2, "rollout_samples": 0,
                "attempts": 2, "seed": 2}


@pytest.fixture(scope="module")
def steps_inputs(workspace):
    """Kept samples for the step makers: two correct three-step rationales for each of 8 test problems."""
    import pyarrow.parquet as pq

    from factory.labelers import label_samples
    from factory.lineage import read_table
    from factory.schema import from_rows

    problems = read_table(workspace / "problems.parquet", "problems")
    rows = [{"sample_id": f"s-{p['problem_id']}-{i}", "problem_id": p["problem_id"], "iteration": 1,
             "model_id": "m-test", "generator": "hf", "sample_index": i, "seed": 0, "temperature": 0.7,
             "top_p": 1.0, "max_new_tokens": 64, "calculator": True, "n_tokens": 20, "finish_reason": "stop",
             "text": f"First {i} step.\nThen a second.\nSo the answer.\n#### {p['gold_answer']}"}
            for p in problems.to_pylist() if p["split"] == "test" for i in range(2)][:16]
    samples = from_rows(rows, "samples")
    pq.write_table(samples, workspace / "kept.parquet")
    pq.write_table(label_samples(samples, problems, labelers=("gold",)), workspace / "labels.parquet")
    return workspace


def step_inputs(root, name: str, executor: ExecutorConfig):
    from factory.lineage import model_id
    from factory.step_stage import StepInputs

    return StepInputs(model_dir=str(root / "model"), policy_id=model_id(root / "model"),
                      problems_path=str(root / "problems.parquet"), samples_path=str(root / "kept.parquet"),
                      labels_path=str(root / "labels.parquet"), iteration=1, out_dir=root / name,
                      params={"steps": STEPS_PARAMS, "executor": dataclasses.asdict(executor)},
                      params_path="<test>")


MCTS_PARAMS = {"problems": 6, "width": 2, "simulations": 2, "max_depth": 3, "max_step_tokens": 12, "batch_size": 8,
               "shard_size": 2, "seed": 1}


def steps_bytes(root, recipe: str, name: str, executor: ExecutorConfig) -> list[bytes]:
    """The `steps` stage of `recipe`: its four tables' bytes."""
    from factory.recipes.base import get_recipe
    from factory.step_stage import run_steps

    it = step_inputs(root, name, executor)
    run_steps(recipe=get_recipe(recipe), model_dir=it.model_dir, problems_path=it.problems_path,
              samples_path=it.samples_path, labels_path=it.labels_path, iteration=1, out=str(it.out_dir),
              params=it.params | {"mcts": MCTS_PARAMS}, params_path=it.params_path)
    assert not shard_dir_for(it.out_dir).exists()
    return [(it.out_dir / table).read_bytes() for table in sorted(os.listdir(it.out_dir))]


@pytest.mark.parametrize(("recipe", "table", "rows"), [("scdpo", "samples", 16), ("mcts_dpo", "nodes", 6 * 3)])
def test_steps_on_ray_write_the_local_bytes(ray_started, steps_inputs, recipe, table, rows):
    """SCDPO's continuations (problem shards) and MCTS-DPO's trees (shards of trees advanced together)."""
    from factory.lineage import read_table

    local = steps_bytes(steps_inputs, recipe, f"{recipe}-local", LOCAL)
    assert len(local) == 4 and read_table(steps_inputs / f"{recipe}-local" / f"{table}.parquet").num_rows >= rows
    assert steps_bytes(steps_inputs, recipe, f"{recipe}-ray2", RAY_2) == local


def test_rollouts_on_ray_are_one_generate_calls_and_write_the_local_bytes(ray_started, steps_inputs):
    """SIPF's rollouts, one decoder batch per shard: the rows of one `mc_rollouts` call, wherever they run."""
    from factory.generators.continuations import StepsConfig, mc_rollouts, rollouts_in_shards
    from factory.lineage import read_table
    from factory.modeling import load_model
    from factory.shards import clear_shards
    from factory.step_stage import generate_and_label, write_generated

    config = section({"steps": STEPS_PARAMS}, "steps", StepsConfig)
    written = {}
    for name, executor in (("rollouts-local", LOCAL), ("rollouts-ray2", RAY_2)):
        it = step_inputs(steps_inputs, name, executor)
        made = generate_and_label(it, rollouts_in_shards, config)
        it.out_dir.mkdir()
        write_generated("sipf_orpo", it.out_dir, made.tables, problems_path=it.problems_path,
                        samples_path=it.samples_path, labels_path=it.labels_path, model_id=it.policy_id)
        clear_shards(shard_dir_for(it.out_dir))
        written[name] = [(it.out_dir / table).read_bytes() for table in ("samples.parquet", "labels.parquet")]
        rows = made.tables.samples
    assert written["rollouts-ray2"] == written["rollouts-local"]
    one_call = mc_rollouts(*load_model(steps_inputs / "model"), read_table(it.problems_path).to_pylist(),
                           read_table(it.samples_path).to_pylist(), read_table(it.labels_path).to_pylist(), config,
                           model_id=it.policy_id, iteration=1, show_progress=False)
    assert len(rows) == 16 * 2 * 2
    assert [(r["sample_id"], r["text"]) for r in rows] == [(r["sample_id"], r["text"]) for r in one_call]


def test_the_second_round_of_train_on_ray_writes_the_local_bytes(ray_started, workspace):
    """`train`'s second round (sample, label, filter under its work folder) with params `executor`."""
    from factory.filters import FilterConfig
    from train.iteration import SelfTrainConfig, _second_round

    written = []
    for name, executor in (("round-local", LOCAL), ("round-ray2", RAY_2)):
        work = workspace / name
        work.mkdir()
        _second_round(model_dir=workspace / "model", problems_path=str(workspace / "problems.parquet"), work=work,
                      sampling=SamplingConfig(**SAMPLE_PARAMS), self_train=SelfTrainConfig(n=2), iteration=1,
                      first_round=None, filter_config=FilterConfig(), executor=executor)
        written.append([(work / table).read_bytes() for table in sorted(os.listdir(work))])
    assert len(written[0]) == 4 and written[1] == written[0]


def test_dvc_repro_on_ray_writes_the_local_bytes_and_switching_executor_reruns_nothing(ray_installed, workspace):
    """A DVC project whose `sample` stage tracks params `sample` only, as dvc.yaml's does: switching `executor`
    leaves `dvc status` clean, and a forced `dvc repro` on Ray (a Ray of its own, 2 workers) writes the same bytes."""
    import shutil

    root = workspace / "dvc"
    shutil.copytree(workspace / "model", root / "model")
    shutil.copy(workspace / "problems.parquet", root)
    stage = {"cmd": f"{sys.executable} -m factory.cli sample --model model --problems problems.parquet "
                    "--iteration 1 --out samples.parquet",
             "deps": ["model", "problems.parquet"], "params": ["sample"], "outs": ["samples.parquet"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sample": stage}}))

    def params(executor: dict) -> None:
        (root / "params.yaml").write_text(yaml.safe_dump({"sample": SAMPLE_PARAMS | {"temperature": 1.0},
                                                          "executor": executor}))

    def dvc(*args: str) -> str:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        result = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    params({"kind": "local"})
    dvc("init", "--no-scm", "-q")
    dvc("repro", "-q")
    local = (root / "samples.parquet").read_bytes()
    params({"kind": "ray", "workers": 2})
    assert "up to date" in dvc("status")
    assert "ShardWorker" in dvc("repro", "--force")  # the stage ran, on Ray's actors
    assert (root / "samples.parquet").read_bytes() == local
    assert "up to date" in dvc("status")

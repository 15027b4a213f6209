"""The real DVC pipeline, end to end, on a shrunken copy of the default params."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory.lineage import read_model_lineage, read_provenance

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git+DVC project holding this repo's dvc.yaml and .dvc config, with small params."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", root)
    shutil.copytree(ROOT / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    # Stages list code folders as deps; link them so DVC can hash them.
    for name in ("factory", "train", "audits"):
        (root / name).symlink_to(ROOT / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["recipe"] = "dpo_st"  # whatever the workspace holds (a `dvc exp run` may be switching it)
    params["problems"]["arith"]["sizes"] = {"train": 16, "dev": 6, "answers": 4, "unlabeled": 4,
                                            "test": 8, "test_ood": 4}
    params["model"] |= {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                        "num_heads": 2}
    # A short warm-up that memorises the answer format, so samples end in `#### N` and some are wrong.
    params["pretrain"] |= {"steps": 3, "problems": 12, "arithmetic": 4, "batch_size": 4, "warmup_steps": 0}
    params["warmup"] |= {"max_epochs": 12, "batch_size": 4, "learning_rate": 0.01, "warmup_steps": 0,
                         "patience": 20, "dev_max_new_tokens": 8}
    params["eval"] |= {"max_new_tokens": 32}
    # Iterations sample `train`, whose gold rationales make pairs even for a barely trained model.
    params["sample"] |= {"split": "train", "limit": 0, "n": 2, "max_new_tokens": 64, "shard_size": 16}
    params["filter"] |= {"min_steps": 0}
    params["dpo"] |= {"epochs": 1, "batch_size": 16, "warmup_steps": 0}
    params["self_train"] |= {"n": 1, "max_steps": 2, "score_every": 2, "batch_size": 16, "warmup_steps": 0,
                             "dev_max_new_tokens": 16}
    params["steps"] |= {"max_new_tokens": 64, "attempts": 2, "rollouts": 2, "rollout_samples": 8}
    params["prm"] |= {"max_steps": 4, "batch_size": 8, "warmup_steps": 0}
    params["orpo"] |= {"epochs": 1, "batch_size": 16, "warmup_steps": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], root)
    return root


ITERATION_STAGES = ("sample", "label", "filter", "steps", "pairs", "audit", "train", "eval")


def test_repro_runs_every_stage_then_nothing(project):
    first = run(["dvc", "repro"], project)
    for stage in ("problems", "base", "warmup", "warmup_eval", "report"):
        assert f"Running stage '{stage}'" in first
    for k in (1, 2):
        for stage in ITERATION_STAGES:
            assert f"Running stage '{stage}@{k}'" in first
    flywheel = json.loads((project / "metrics" / "flywheel.json").read_text())
    assert flywheel["recipe"] == "dpo_st" and set(flywheel) == {"recipe", "iter_0", "iter_1", "iter_2"}
    assert flywheel["iter_0"]["test"] >= 0 and "pair_yield" in flywheel["iter_2"]
    plot = json.loads((project / "metrics" / "flywheel_plot.json").read_text())
    assert [row["iteration"] for row in plot] == [0, 1, 2]
    lineage = read_model_lineage(project / "models" / "iter_0")
    assert lineage["stage"] == "warmup" and lineage["parent"] == read_model_lineage(project / "models" / "base")["model_id"]
    assert read_provenance(project / "data" / "iter_0" / "eval.parquet")["model_id"] == lineage["model_id"]
    assert "dev_accuracy" in run(["dvc", "plots", "show", "--json"], project)
    assert "iter_2" in run(["dvc", "metrics", "show"], project)

    second = run(["dvc", "repro"], project)
    assert "Running stage" not in second
    assert "up to date" in run(["dvc", "status"], project)
    assert json.loads((project / "metrics" / "iterations" / "iter_1" / "audit.json").read_text())["passed"]


def test_every_pair_traces_to_samples_of_the_previous_iterations_model(project):
    for k in (1, 2):
        previous = read_model_lineage(project / "models" / f"iter_{k - 1}")["model_id"]
        samples = pq.read_table(project / "data" / f"iter_{k}" / "samples.parquet").to_pylist()
        model_of = {s["sample_id"]: s["model_id"] for s in samples}
        pairs = pq.read_table(project / "data" / f"iter_{k}" / "pairs.parquet").to_pylist()
        assert pairs, f"iteration {k} made no pairs"
        for pair in pairs:
            assert pair["iteration"] == k
            assert model_of[pair["rejected_sample_id"]] == previous
            assert pair["chosen_sample_id"] is None or model_of[pair["chosen_sample_id"]] == previous
        assert read_model_lineage(project / "models" / f"iter_{k}")["parent"] == previous


def test_changing_an_iteration_2_knob_reruns_iteration_2_only(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["iterations"]["2"]["sample"] = {"temperature": 0.9}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run(["dvc", "repro"], project)
    for stage in ITERATION_STAGES:
        assert f"Running stage '{stage}@2'" in out
        assert f"Running stage '{stage}@1'" not in out
    assert "Running stage 'warmup'" not in out
    temperatures = set(pq.read_table(project / "data" / "iter_2" / "samples.parquet").column("temperature").to_pylist())
    assert temperatures == {0.9}


def test_switching_the_recipe_reruns_training_but_not_the_first_sampling(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["recipe"] = "self_train"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run(["dvc", "repro"], project)
    assert "Running stage 'train@1'" in out and "Running stage 'sample@1'" not in out
    assert read_model_lineage(project / "models" / "iter_1")["stage"] == "train:self_train"
    assert not (project / "models" / "iter_1" / "dpo").exists()
    assert json.loads((project / "metrics" / "flywheel.json").read_text())["recipe"] == "self_train"


def test_step_level_recipes_run_in_the_same_pipeline_and_pass_the_gate(project):
    """scdpo: step-controlled continuations and DPO; sipf_orpo: rollouts, a PRM and ORPO on a growing dataset."""
    for recipe, extra in (("scdpo", {}), ("sipf_orpo", {"filter": {"calculator_consistent": True}})):
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["recipe"] = recipe
        for section, values in extra.items():
            params[section] |= values
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        out = run(["dvc", "repro"], project)
        assert "Running stage 'steps@1'" in out and "Running stage 'sample@1'" not in out
        for k in (1, 2):
            audit = json.loads((project / "metrics" / "iterations" / f"iter_{k}" / "audit.json").read_text())
            assert audit["passed"] and "step_negatives" in audit["checks"]
            steps = json.loads((project / "metrics" / "iterations" / f"iter_{k}" / "steps.json").read_text())
            generated = pq.read_table(project / "data" / f"iter_{k}" / "steps" / "samples.parquet").to_pylist()
            assert steps["generated"]["rows"] == len(generated)
            assert {row["generator"] for row in generated} <= {"step_controlled" if recipe == "scdpo" else "rollout"}
            assert all(row["parent_sample_id"] and row["prefix_steps"] is not None for row in generated)
        lineage = read_model_lineage(project / "models" / "iter_2")
        assert lineage["stage"] == f"train:{recipe}"
    process = pq.read_table(project / "data" / "iter_2" / "steps" / "process.parquet").to_pylist()
    assert {row["source"] for row in process} <= {"rollouts", "prm"}
    # The growing dataset: iteration 2's ORPO trained on iteration 1's pairs file and its own.
    assert lineage["params"]["pairs_files"] == ["data/iter_1/pairs.parquet", "data/iter_2/pairs.parquet"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["recipe"], params["filter"]["calculator_consistent"] = "dpo_st", False
    (project / "params.yaml").write_text(yaml.safe_dump(params))  # the next tests start from dpo_st again


def test_factory_recipe_then_repro_runs_scpo_as_its_paper_sets_it_up(project):
    """One command switches params to ScPO (unlabeled problems, 8 votes each); `dvc repro` needs no other flag."""
    saved = (project / "params.yaml").read_text()
    run(["factory", "recipe", "scpo", "--write"], project)
    out = run(["dvc", "repro"], project)
    assert "Running stage 'sample@1'" in out and "Running stage 'train@2'" in out
    problems = {p["problem_id"]: p for p in pq.read_table(project / "data" / "problems.parquet").to_pylist()}
    samples = pq.read_table(project / "data" / "iter_1" / "samples.parquet").to_pylist()
    assert {problems[s["problem_id"]]["split"] for s in samples} == {"unlabeled"} and len(samples) == 8 * 4
    pairs = pq.read_table(project / "data" / "iter_1" / "pairs.parquet").to_pylist()
    assert {row["recipe"] for row in pairs} <= {"scpo"}
    for k in (1, 2):
        lineage = read_model_lineage(project / "models" / f"iter_{k}")
        assert lineage["stage"] == "train:scpo" and "self_train" not in lineage["params"]  # no second round
    (project / "params.yaml").write_text(saved)  # the next tests start from dpo_st again
    run(["dvc", "repro"], project)


def test_changing_an_eval_knob_reruns_only_eval(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["eval"]["max_new_tokens"] = 40
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run(["dvc", "repro"], project)
    assert "Running stage 'warmup_eval'" in out and "Running stage 'eval@2'" in out
    assert "Running stage 'warmup'" not in out and "Running stage 'train@1'" not in out


def test_a_broken_invariant_fails_the_audit_stage_and_training_waits(project):
    """Tightened to "no length difference at all", the length-bias check fails on any real pairs."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["audit"] |= {"max_length_ratio": 1.0, "max_longer_share": 0.0, "min_pairs_for_bias": 1}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "audit check 'length_bias' failed (" in output and "iteration 1" in output
    assert "Running stage 'train@1'" not in output

"""The real DVC pipeline, end to end, on a shrunken copy of the default params."""

import json
import os
import shutil
import subprocess
from pathlib import Path

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
    for name in ("factory", "train"):
        (root / name).symlink_to(ROOT / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["problems"]["arith"]["sizes"] = {"train": 64, "dev": 16, "answers": 8, "unlabeled": 8,
                                            "test": 24, "test_ood": 16}
    params["model"] |= {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                        "num_heads": 2}
    params["warmup"] |= {"max_epochs": 2, "batch_size": 16, "warmup_steps": 2, "dev_max_new_tokens": 32}
    params["eval"] |= {"max_new_tokens": 48}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], root)
    return root


def test_repro_runs_every_stage_then_nothing(project):
    first = run(["dvc", "repro"], project)
    for stage in ("problems", "warmup", "eval"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((project / "metrics" / "eval_iter_0.json").read_text())
    assert set(metrics) == {"test", "test_ood"}
    assert metrics["test"]["n"] == 24 and 0 <= metrics["test"]["accuracy"] <= 1
    lineage = read_model_lineage(project / "models" / "iter_0")
    assert lineage["stage"] == "warmup" and lineage["model_id"].startswith("m-")
    assert read_provenance(project / "data" / "eval" / "iter_0.parquet")["model_id"] == lineage["model_id"]
    curve = json.loads((project / "metrics" / "warmup_curve.json").read_text())
    assert [point["epoch"] for point in curve] == [1, 2]

    second = run(["dvc", "repro"], project)
    assert "Running stage" not in second
    assert "up to date" in run(["dvc", "status"], project)


def test_changing_an_eval_knob_reruns_only_eval(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["eval"]["max_new_tokens"] = 40
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run(["dvc", "repro"], project)
    assert "Running stage 'eval'" in out
    assert "Running stage 'warmup'" not in out and "Running stage 'problems'" not in out

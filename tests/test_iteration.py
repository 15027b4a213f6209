"""One iteration's training step for each recipe, through the CLI, on a tiny model (real TRL, real sampling)."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from factory.cli import main as cli
from factory.lineage import model_id, read_model_lineage, read_provenance
from train.iteration import SelfTrainConfig, self_training_examples

pytestmark = pytest.mark.slow

PARAMS = {
    # Samples come from `train`, whose gold rationales make pairs even for an untrained model.
    "problems": {"arith": {"seed": 5, "sizes": {"train": 12, "dev": 6, "answers": 4, "unlabeled": 2, "test": 4,
                                                  "test_ood": 2}}},
    "model": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
              "max_length": 384},
    "pretrain": {"steps": 0},  # random weights: these tests are about training, tests/test_warmup.py pretrains
    # A short warm-up that memorises the answer format, so samples end in `#### N` and some are wrong.
    "warmup": {"max_epochs": 12, "batch_size": 4, "learning_rate": 0.01, "warmup_steps": 0, "patience": 20,
               "dev_max_new_tokens": 8},
    "sample": {"split": "train", "n": 2, "max_new_tokens": 64, "shard_size": 5},
    "filter": {"min_steps": 0, "max_tokens": 256},
    "dpo": {"epochs": 1, "batch_size": 8, "warmup_steps": 0},
    "self_train": {"n": 2, "max_steps": 3, "score_every": 2, "batch_size": 8, "warmup_steps": 0,
                   "dev_max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("iteration")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    p = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    args = ["--params", p("params.yaml")]
    assert cli(["problems", "arith", "--out", p("problems.parquet")] + args) == 0
    assert cli(["base", "--problems", p("problems.parquet"), "--out", p("base")] + args) == 0
    assert cli(["warmup", "--problems", p("problems.parquet"), "--base", p("base"), "--out", p("prev")] + args) == 0
    assert cli(["sample", "--model", p("prev"), "--problems", p("problems.parquet"), "--iteration", "1",
                "--out", p("samples.parquet")] + args) == 0
    assert cli(["label", p("samples.parquet"), "--problems", p("problems.parquet"), "--out", p("labels.parquet"),
                "--summary", p("label.json")]) == 0
    assert cli(["filter", p("samples.parquet"), "--labels", p("labels.parquet"), "--out", p("kept.parquet"),
                "--dropped", p("dropped.parquet"), "--iteration", "1"] + args) == 0
    assert cli(["pairs", "--problems", p("problems.parquet"), "--samples", p("kept.parquet"), "--labels",
                p("labels.parquet"), "--model", p("prev"), "--iteration", "1", "--out", p("pairs.parquet")]
               + args) == 0
    return root


def train(project, recipe):
    p = lambda *parts: str(project.joinpath(*parts))  # noqa: E731
    out = p(f"model_{recipe}")
    assert cli(["train", "--recipe", recipe, "--iteration", "1", "--problems", p("problems.parquet"),
                "--prev", p("prev"), "--base", p("base"), "--pairs", p("pairs.parquet"),
                "--samples", p("samples.parquet"), "--labels", p("labels.parquet"), "--work", p(f"work_{recipe}"),
                "--out", out, "--summary", p(f"train_{recipe}.json"), "--params", p("params.yaml")]) == 0
    return json.loads((project / f"train_{recipe}.json").read_text())


def test_dpo_st_runs_dpo_then_self_trains_from_the_base_on_the_dpo_models_samples(project):
    summary = train(project, "dpo_st")
    assert summary["dpo"]["pairs"] == pq.read_metadata(project / "pairs.parquet").num_rows > 0
    dpo_dir = project / "model_dpo_st" / "dpo"
    assert read_model_lineage(dpo_dir)["model_id"] == summary["dpo"]["model_id"] == model_id(dpo_dir)
    # The second round was sampled from the DPO model, and every row says so.
    second = pq.read_table(project / "work_dpo_st" / "samples.parquet")
    assert set(second.column("model_id").to_pylist()) == {summary["dpo"]["model_id"]}
    assert second.num_rows == 12 * 2 and summary["second_round"]["sampled"] == 24
    assert summary["sft"]["init"] == model_id(project / "base") and summary["sft"]["steps"] == 3
    lineage = read_model_lineage(project / "model_dpo_st")
    assert lineage["stage"] == "train:dpo_st" and lineage["parent"] == model_id(project / "prev")
    kept = pq.read_table(project / "work_dpo_st" / "kept.parquet")
    dropped = pq.read_table(project / "work_dpo_st" / "dropped.parquet")
    assert kept.num_rows + dropped.num_rows == second.num_rows
    assert summary["sft"]["examples"] == 12 + summary["second_round"]["correct_kept"]


def test_self_train_pools_both_rounds_from_the_previous_model_without_dpo(project):
    summary = train(project, "self_train")
    assert "dpo" not in summary and not (project / "model_self_train" / "dpo").exists()
    second = pq.read_table(project / "work_self_train" / "samples.parquet")
    assert set(second.column("model_id").to_pylist()) == {model_id(project / "prev")}
    first_ids = set(pq.read_table(project / "samples.parquet").column("sample_id").to_pylist())
    assert first_ids.isdisjoint(second.column("sample_id").to_pylist())  # a second, different draw
    kept = pq.read_table(project / "work_self_train" / "kept.parquet")
    dropped = pq.read_table(project / "work_self_train" / "dropped.parquet")
    assert kept.num_rows + dropped.num_rows == len(first_ids) + second.num_rows
    assert read_provenance(project / "work_self_train" / "kept.parquet")["inputs"]["first_round_samples"]


def test_sft_control_trains_the_previous_model_on_gold_for_the_same_steps(project):
    summary = train(project, "sft")
    assert "second_round" not in summary and summary["sft"]["examples"] == 12
    assert summary["sft"]["init"] == model_id(project / "prev") and summary["sft"]["steps"] == 3


def scpo_pairs_file(project, name, rows):
    from factory.lineage import write_table
    from factory.schema import from_rows

    path = project / name
    write_table(from_rows(rows, "pairs"), path, kind="pairs", stage="test")
    return path


def test_scpo_model_is_the_weighted_dpo_model_of_the_previous_one(project):
    dpo_st_rows = pq.read_table(project / "pairs.parquet").to_pylist()
    weighted = [{**r, "recipe": "scpo", "weight": 0.25 * (1 + i % 4)} for i, r in enumerate(dpo_st_rows)]
    (project / "pairs.parquet").rename(project / "pairs_dpo_st.parquet")
    try:
        scpo_pairs_file(project, "pairs.parquet", weighted)
        summary = train(project, "scpo")
    finally:
        (project / "pairs_dpo_st.parquet").replace(project / "pairs.parquet")
    assert "sft" not in summary and "second_round" not in summary
    assert summary["dpo"]["pairs"] == len(weighted) > 0
    assert summary["dpo"]["mean_weight"] == round(sum(r["weight"] for r in weighted) / len(weighted), 4)
    lineage = read_model_lineage(project / "model_scpo")
    assert lineage["stage"] == "train:scpo" and lineage["parent"] == model_id(project / "prev")
    assert lineage["model_id"] == summary["model_id"] == model_id(project / "model_scpo") != lineage["parent"]


def test_dpo_is_scpo_training_on_gold_pairs(project):
    summary = train(project, "dpo")
    assert "sft" not in summary and summary["dpo"]["pairs"] == pq.read_metadata(project / "pairs.parquet").num_rows
    assert read_model_lineage(project / "model_dpo")["stage"] == "train:dpo"


def test_scpo_refuses_pairs_of_another_rule_and_keeps_the_model_without_pairs(project, capsys):
    argv = lambda pairs, out: ["train", "--recipe", "scpo", "--iteration", "1", "--problems",  # noqa: E731
                               str(project / "problems.parquet"), "--prev", str(project / "prev"), "--base",
                               str(project / "base"), "--pairs", str(pairs), "--samples",
                               str(project / "samples.parquet"), "--labels", str(project / "labels.parquet"),
                               "--work", str(project / "work_scpo"), "--out", str(project / out),
                               "--params", str(project / "params.yaml")]
    assert cli(argv(project / "pairs.parquet", "model_wrong")) == 2
    assert "trains on 'scpo' pairs, but the file holds 'dpo_st' pairs: re-run its pairs stage with recipe: scpo" \
        in capsys.readouterr().err
    empty = scpo_pairs_file(project, "pairs_empty.parquet", [])
    assert cli(argv(empty, "model_unchanged")) == 0
    assert "no pairs in" in (out := capsys.readouterr().out) and "scpo keeps the previous model" in out
    assert model_id(project / "model_unchanged") == model_id(project / "prev")
    assert read_model_lineage(project / "model_unchanged")["metrics"] == {"skipped": "no pairs", "pairs": 0}


def test_unknown_recipe_is_refused_by_name(project, capsys):
    assert cli(["train", "--recipe", "magic", "--iteration", "1", "--problems", "x", "--prev", "x", "--base", "x",
                "--pairs", "x", "--samples", "x", "--labels", "x", "--work", "x", "--out", "x"]) == 2
    assert "unknown recipe 'magic'" in capsys.readouterr().err


def test_self_training_examples_are_gold_plus_correct_kept_samples():
    problems = [
        {"problem_id": "p-1", "split": "train", "question": "q1", "gold_rationale": "g1"},
        {"problem_id": "p-2", "split": "answers", "question": "q2", "gold_rationale": None},
    ]
    kept = [{"sample_id": "s-a", "problem_id": "p-2", "text": "right"},
            {"sample_id": "s-b", "problem_id": "p-2", "text": "wrong"}]
    labels = [{"sample_id": "s-a", "correct": True}, {"sample_id": "s-b", "correct": False},
              {"sample_id": "s-c", "correct": True}]  # s-c was filtered out: not in kept
    examples = self_training_examples(problems, kept, labels)
    assert [(e["question"], e["rationale"], e["sample_id"]) for e in examples] == [
        ("q1", "g1", None), ("q2", "right", "s-a")]


def test_self_train_config_checks_its_values():
    with pytest.raises(ValueError, match="init must be"):
        SelfTrainConfig(init="warmup")
    with pytest.raises(ValueError, match="positive"):
        SelfTrainConfig(max_steps=0)

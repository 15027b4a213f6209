"""The flywheel report, the recipe comparison's arithmetic, per-iteration params and label summaries."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from factory.compare import experiment_command, format_summary, summarize
from factory.labelers import label_summary
from factory.params import ParamsError, with_iteration
from factory.report import flywheel_report, format_table, iteration_numbers


def write(folder, name, value):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(value))


def test_report_joins_every_iterations_metrics(tmp_path):
    for k, accuracy in ((0, 0.24), (1, 0.30)):
        write(tmp_path / f"iter_{k}", "eval.json", {"test": {"accuracy": accuracy, "stderr": 0.01},
                                                   "test_ood": {"accuracy": 0.01, "stderr": 0.003}})
    write(tmp_path / "iter_1", "label.json", {"sample_accuracy": 0.2, "solved_fraction": 0.45})
    write(tmp_path / "iter_1", "pairs.json", {"pairs": 30, "problems_with_pairs": 10, "problems_seen": 40})
    write(tmp_path / "iter_1", "train.json", {"recipe": "dpo_st", "sft": {"examples": 1300, "dev_accuracy": 0.3},
                                              "second_round": {"correct_kept": 300},
                                              "dpo": {"reward_accuracy": 0.8}})
    rows = flywheel_report(tmp_path, {"iterations": {"1": {"prev": 0}}})
    assert rows[0] == {"iteration": 0, "test": 0.24, "test_stderr": 0.01, "test_ood": 0.01, "test_ood_stderr": 0.003}
    assert rows[1]["pair_yield"] == 0.25 and rows[1]["solved_fraction"] == 0.45
    assert rows[1]["recipe"] == "dpo_st" and rows[1]["self_train_correct"] == 300
    assert not any(key.startswith(("pass_at_", "precondition_")) for key in rows[1])  # not measured: left out
    table = format_table(rows)
    assert table.splitlines()[0].startswith("iteration | recipe | test")
    assert "0.300" in table


def test_report_names_a_missing_evaluation(tmp_path):
    write(tmp_path / "iter_0", "eval.json", {"test": {"accuracy": 0.2, "stderr": 0.01}})
    with pytest.raises(FileNotFoundError, match="iter_1/eval.json"):
        flywheel_report(tmp_path, {"iterations": {"1": {"prev": 0}}})


def test_iterations_must_chain_to_earlier_ones():
    assert iteration_numbers({"iterations": {"2": {"prev": 1}, "1": {"prev": 0}}}) == [0, 1, 2]
    with pytest.raises(ValueError, match="iterations.2"):
        iteration_numbers({"iterations": {"2": {"prev": 3}}})


def test_iteration_overrides_merge_into_sections_and_bad_ones_are_named():
    params = {"sample": {"n": 4, "seed": 0}, "iterations": {"2": {"prev": 1, "sample": {"n": 8}}}}
    assert with_iteration(params, 2)["sample"] == {"n": 8, "seed": 0}
    assert with_iteration(params, 1) is params
    with pytest.raises(ParamsError, match="iterations.2.sample"):
        with_iteration({"iterations": {"2": {"prev": 1, "sample": 8}}}, 2)


def test_label_summary_counts_statuses_and_solved_problems():
    labels = pa.table({"problem_id": ["p-1", "p-1", "p-2", "p-3"],
                       "answer_status": ["correct", "wrong", "wrong", "unparseable"],
                       "correct": [True, False, False, None], "calc_wrong": [0, 1, 0, 0]})
    summary = label_summary(labels)
    assert summary["answer_status"] == {"correct": 1, "unparseable": 1, "wrong": 2}
    assert summary["problems"] == 3 and summary["problems_solved"] == 1
    assert summary["solved_fraction"] == 0.3333 and summary["sample_accuracy"] == 0.25
    assert summary["calc_wrong"] == 1


def run(test0, test1, test2):
    return {f"iter_{k}": {"test": v, "test_ood": 0.0} for k, v in enumerate((test0, test1, test2))}


def test_summary_pairs_each_recipe_with_the_control_seed_by_seed():
    results = {
        "sft": {0: run(0.24, 0.25, 0.25), 1: run(0.24, 0.23, 0.24)},
        "dpo_st": {0: run(0.24, 0.30, 0.33), 1: run(0.24, 0.28, 0.31)},
    }
    summary = summarize(results)
    assert summary["accuracy"]["dpo_st"]["iter_2"][0] == pytest.approx(0.32)
    versus = {(d["recipe"], d["baseline"]): d for d in summary["paired"]}
    assert versus[("dpo_st", "sft")]["per_seed"] == pytest.approx([0.08, 0.07])
    assert versus[("dpo_st", "sft")]["mean"] == pytest.approx(0.075)
    assert versus[("dpo_st", "sft")]["stderr"] == pytest.approx(0.005)
    assert versus[("dpo_st", "warm-up")]["per_seed"] == pytest.approx([0.09, 0.07])
    assert ("sft", "dpo_st") not in versus  # only against recipes listed before
    text = format_summary(summary)
    assert "dpo_st       - sft          at iter_2: [+8.0, +7.0] -> +7.5 ± 0.5" in text


def test_experiment_command_sets_the_recipe_and_every_seed():
    command = experiment_command("self_train", 1)
    assert command[:3] == ["dvc", "exp", "run"]
    settings = [command[i + 1] for i, arg in enumerate(command) if arg == "-S"]
    assert settings == ["recipe=self_train", "sample.seed=1", "dpo.seed=1", "self_train.seed=1", "steps.seed=1",
                        "prm.seed=1", "orpo.seed=1", "mcts.seed=1"]


def test_scpo_experiments_set_their_pair_rule_and_sample_unlabeled_problems_at_the_same_budget():
    settings = lambda recipe: [a for a in experiment_command(recipe, 0) if "=" in a]  # noqa: E731
    assert settings("scpo")[:3] == ["recipe=scpo", "sample.split=unlabeled", "sample.n=8"]
    semi = settings("scpo_semi")
    assert "sample.split=answers+unlabeled" in semi and not any(s.startswith("pairs.") for s in semi)
    assert settings("dpo")[:2] == ["recipe=dpo", "sample.n=8"]  # gold pairs (dpo_st rule), ScPO's training
    # The default's budget: dpo_st's two rounds of limit x n equal ScPO's one round of limit x 8.
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    sample, second = params["sample"], params["self_train"]
    assert sample["limit"] * (sample["n"] + second["n"]) == sample["limit"] * 8 == 2 * 250 * 8


def test_each_experiment_starts_from_the_workspace_params(tmp_path, monkeypatch):
    """`dvc exp run` leaves its -S values in params.yaml; the next recipe must not inherit them."""
    from factory import compare

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("recipe: dpo_st\npairs: {recipe: dpo_st}\n")
    Path("dvc.yaml").write_text("stages: {}\n")
    seen = []

    def fake_run(command, check=False):
        if command[:3] == ["dvc", "exp", "run"]:
            seen.append(Path("params.yaml").read_text())
            Path("params.yaml").write_text("recipe: scpo\npairs: {recipe: scpo}\n")  # what an experiment leaves
            Path("metrics").mkdir(exist_ok=True)
            Path("metrics/flywheel.json").write_text(json.dumps({"iter_0": {"test": 0.2}}))

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    results = compare.run_experiments(["scpo", "dpo_st"], [0], out=tmp_path / "compare.json")
    assert seen == ["recipe: dpo_st\npairs: {recipe: dpo_st}\n"] * 2
    assert Path("params.yaml").read_text() == seen[0] and set(results) == {"scpo", "dpo_st"}


def test_report_rows_carry_the_precondition_signals_and_verdict(tmp_path):
    write(tmp_path / "iter_0", "eval.json", {"test": {"accuracy": 0.2, "stderr": 0.01}})
    write(tmp_path / "iter_1", "eval.json", {"test": {"accuracy": 0.2, "stderr": 0.01}})
    write(tmp_path / "iter_1", "label.json", {"sample_accuracy": 0.2, "solved_fraction": 0.4,
                                              "pass_at_k": {"1": 0.2, "2": 0.3, "4": 0.4},
                                              "vote": {"majority_accuracy": 0.4, "mean_top_share": 0.5,
                                                       "majority_on_gold": {"problems": 9, "majority_accuracy": 0.33}}})
    write(tmp_path / "iter_1", "steps.json", {"self_eval": {"auc": 0.48},
                                              "step_negatives": {"negatives_per_parent": 1.5},
                                              "process": {"prm": {"heldout_accuracy": 0.7,
                                                                  "heldout_majority_baseline": 0.72}}})
    write(tmp_path / "iter_1", "train.json", {"recipe": "mcts_dpo", "precondition": {
        "signal": "self_eval_auc", "value": 0.48, "threshold": 0.6, "holds": False, "message": "..."}})
    row = flywheel_report(tmp_path, {"iterations": {"1": {"prev": 0}}})[1]
    assert {k: v for k, v in row.items() if k.startswith(("pass_at", "majority_", "self_eval", "prm_", "step_neg",
                                                          "precondition"))} == {
        "pass_at_1": 0.2, "pass_at_2": 0.3, "pass_at_4": 0.4, "majority_accuracy": 0.4,
        "majority_accuracy_gold": 0.33, "majority_gold_problems": 9, "self_eval_auc": 0.48,
        "prm_heldout_accuracy": 0.7, "prm_heldout_baseline": 0.72, "step_negative_yield": 1.5,
        "precondition_signal": "self_eval_auc", "precondition_value": 0.48, "precondition_threshold": 0.6,
        "precondition_holds": False}

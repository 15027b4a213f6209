"""Each recipe's precondition signal, checked against hand-computed cases."""

import doctest

import pytest
from conftest import sampling_workspace

import factory.preconditions
from factory.preconditions import (auc, iteration_signals, label_signals, majority_on_gold, pass_at_k,
                                   self_eval_signal, step_negative_yield)


def test_doctests():
    assert doctest.testmod(factory.preconditions).failed == 0


def test_pass_at_k_by_hand():
    # Problem a: 1 of 4 correct; b: 2 of 4; c: no gold (not counted); d: 0 of 3 (so k stops at 3).
    ids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 3
    correct = [True, False, False, False, True, True, False, False, None, None, None, None, False, False, False]
    signals = label_signals(ids, correct)
    # pass@1: (1/4 + 2/4 + 0) / 3; pass@2: a: 1 - C(3,2)/C(4,2) = 1/2, b: 1 - C(2,2)/C(4,2) = 5/6;
    # pass@3: a: 1 - C(3,3)/C(4,3) = 3/4, b: 1.
    assert signals == {"gold_problems": 3, "pass_at_k": {"1": 0.25, "2": round((1 / 2 + 5 / 6) / 3, 4),
                                                          "3": round((3 / 4 + 1) / 3, 4)}}
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_no_gold_measures_nothing():
    votes = [{"problem_id": "a", "top_share": 1.0, "majority_correct": None}]
    signals = label_signals(["a", "a"], [None, None], votes)
    assert signals == {"gold_problems": 0, "pass_at_k": {},
                       "majority_on_gold": {"problems": 0, "majority_accuracy": None, "by_top_share": [
                           {"top_share": "[0.0, 0.5)", "problems": 0, "majority_accuracy": None},
                           {"top_share": "[0.5, 0.75)", "problems": 0, "majority_accuracy": None},
                           {"top_share": "[0.75, 1.0]", "problems": 0, "majority_accuracy": None}]}}
    named = iteration_signals({"pass_at_k": {}, "vote": {"majority_on_gold": signals["majority_on_gold"]}}, {})
    assert named["pass_at_n"] is None and named["majority_accuracy_gold"] is None


def test_vote_share_buckets():
    result = majority_on_gold([(0.25, True), (0.49, False), (0.5, False), (0.74, True), (0.75, True), (1.0, True),
                               (1.0, False)])
    assert result["problems"] == 7 and result["majority_accuracy"] == round(4 / 7, 4)
    assert [(b["problems"], b["majority_accuracy"]) for b in result["by_top_share"]] == \
        [(2, 0.5), (2, 0.5), (3, round(2 / 3, 4))]


def test_auc_with_ties_and_one_class():
    # Pairs (pos, neg): (0.8,0.5) 1, (0.8,0.2) 1, (0.5,0.5) 1/2, (0.5,0.2) 1, (0.2,0.5) 0, (0.2,0.2) 1/2 -> 4/6.
    assert auc([0.8, 0.5, 0.2], [0.5, 0.2]) == pytest.approx(4 / 6)
    assert auc([0.9] * 3, [0.9] * 2) == 0.5  # blind: every node the same P(yes)
    assert auc([0.1], [0.9]) == 0.0 and auc([0.9], [0.1]) == 1.0
    assert auc([0.5], []) is None and auc([], [0.5]) is None


def test_self_eval_signal_reads_terminal_nodes_only():
    def node(terminal, outcome, p):
        return {"terminal": terminal, "outcome": outcome, "self_eval": p}

    nodes = [node(True, 1.0, 0.9), node(True, -1.0, 0.4), node(True, -1.0, 0.95), node(False, None, 0.1),
             node(True, 1.0, None)]
    assert self_eval_signal(nodes) == {"auc": 0.5, "correct_terminals": 1, "wrong_terminals": 2,
                                       "mean_p_yes_correct": 0.9, "mean_p_yes_wrong": 0.675}
    one_class = self_eval_signal([node(True, -1.0, 0.9)])
    assert one_class["auc"] is None and one_class["wrong_terminals"] == 1
    assert iteration_signals({}, {"self_eval": one_class})["self_eval_auc"] is None


def test_step_negative_yield():
    rows = [{"parent_sample_id": p} for p in ["s-1", "s-1", "s-2", "s-3"]]
    assert step_negative_yield(rows, [True, False, None, False]) == {
        "parents": 3, "continuations": 4, "negatives": 2, "still_correct": 1, "negatives_per_parent": 0.6667}
    assert step_negative_yield([], [])["negatives_per_parent"] is None


@pytest.fixture(scope="module")
def step_workspace(tiny_model, tmp_path_factory):
    """The tiny model, problems, and two correct three-step kept samples for each of 6 test problems."""
    import pyarrow.parquet as pq

    from factory.labelers import label_samples
    from factory.lineage import read_table
    from factory.schema import from_rows

    root = sampling_workspace(tmp_path_factory.mktemp("steps"), tiny_model, test_problems=6)
    problems = read_table(root / "problems.parquet", "problems")
    rows = [{"sample_id": f"s-{p['problem_id']}-{i}", "problem_id": p["problem_id"], "iteration": 1,
             "model_id": "m-test", "generator": "hf", "sample_index": i, "seed": 0, "temperature": 0.7,
             "top_p": 1.0, "max_new_tokens": 64, "calculator": True, "n_tokens": 20, "finish_reason": "stop",
             "text": f"First {i} step.\nThen a second.\nSo the answer.\n#### {p['gold_answer']}"}
            for p in problems.to_pylist() if p["split"] == "test" for i in range(2)]
    samples = from_rows(rows, "samples")
    pq.write_table(samples, root / "kept.parquet")
    pq.write_table(label_samples(samples, problems, labelers=("gold",)), root / "labels.parquet")
    return root


def run_step_stage(root, recipe: str, params: dict) -> dict:
    from factory.recipes import get_recipe
    from factory.step_stage import run_steps

    return run_steps(recipe=get_recipe(recipe), model_dir=str(root / "model"),
                     problems_path=str(root / "problems.parquet"), samples_path=str(root / "kept.parquet"),
                     labels_path=str(root / "labels.parquet"), iteration=1, out=str(root / recipe), params=params,
                     params_path="<test>")


@pytest.mark.slow
def test_steps_json_of_scdpo_counts_its_negatives(step_workspace):
    from factory.lineage import read_table

    summary = run_step_stage(step_workspace, "scdpo", {"steps": {"max_new_tokens": 16, "batch_size": 8,
                                                                 "attempts": 2, "seed": 2}})
    samples = read_table(step_workspace / "scdpo/samples.parquet", "samples").to_pylist()
    verdicts = read_table(step_workspace / "scdpo/labels.parquet", "labels").column("correct").to_pylist()
    assert summary["step_negatives"] == step_negative_yield(samples, verdicts)
    assert summary["step_negatives"]["continuations"] == len(samples) > 0


@pytest.mark.slow
def test_steps_json_of_mcts_dpo_has_the_self_eval_auc(step_workspace):
    from factory.lineage import read_table

    mcts = {"problems": 6, "width": 2, "simulations": 2, "max_depth": 3, "max_step_tokens": 12, "batch_size": 8,
            "seed": 1}
    summary = run_step_stage(step_workspace, "mcts_dpo", {"mcts": mcts})
    nodes = read_table(step_workspace / "mcts_dpo/nodes.parquet", "nodes").to_pylist()
    assert summary["self_eval"] == self_eval_signal(nodes)
    assert summary["self_eval"]["wrong_terminals"] + summary["self_eval"]["correct_terminals"] \
        == sum(n["terminal"] for n in nodes) > 0


@pytest.mark.slow
def test_steps_json_of_sipf_orpo_has_the_prm_held_out_accuracy(step_workspace):
    summary = run_step_stage(step_workspace, "sipf_orpo", {
        "steps": {"max_new_tokens": 16, "batch_size": 8, "rollouts": 2, "rollout_samples": 0, "seed": 2},
        "prm": {"max_steps": 4, "batch_size": 4, "warmup_steps": 0, "max_length": 256, "eval_every": 2}})
    prm = summary["process"]["prm"]
    assert prm["heldout_examples"] == 2 * 1 and prm["examples_trained"] == 2 * 5  # 1 of 6 problems held out
    assert prm["heldout_accuracy"] is not None and prm["heldout_majority_baseline"] >= 0.5
    signals = iteration_signals({}, summary)
    assert (signals["prm_heldout_accuracy"], signals["prm_heldout_baseline"]) == \
        (prm["heldout_accuracy"], prm["heldout_majority_baseline"])


def train_argv(root, label: dict | None, steps: dict | None = None) -> list[str]:
    """`factory train` for iteration 1 with these label.json and steps.json; the model paths are never read when
    the gate stops it, and a faked training step stands in otherwise."""
    import json

    argv = ["train", "--iteration", "1", "--problems", str(root / "problems.parquet"), "--prev", str(root / "prev"),
            "--base", str(root / "base"), "--pairs", str(root / "pairs.parquet"), "--samples",
            str(root / "samples.parquet"), "--labels", str(root / "labels.parquet"), "--work", str(root / "work"),
            "--out", str(root / "out"), "--summary", str(root / "train.json"), "--params", str(root / "params.yaml")]
    for name, figures in (("label", label), ("steps", steps)):
        if figures is not None:
            (root / f"{name}.json").write_text(json.dumps(figures))
            argv += [f"--{name}-summary", str(root / f"{name}.json")]
    return argv


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The project's params with `recipe: dpo`, and the recipe's training step faked (no model is trained)."""
    import dataclasses
    from pathlib import Path

    import yaml

    from factory.recipes import RECIPES

    params = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params | {"recipe": "dpo"}))
    trained = []

    def fake_train(it):
        trained.append(it.iteration)
        return {"iteration": it.iteration, "recipe": "dpo", "model_id": "m-fake",
                "dpo": {"pairs": 0, "reward_accuracy": 0.0}}

    for name in ("dpo", "mcts_dpo"):
        monkeypatch.setitem(RECIPES, name, dataclasses.replace(RECIPES[name], train=fake_train))
    return tmp_path, params, trained


def test_a_failing_precondition_warns_before_training_and_is_recorded(project, capsys):
    import json

    from factory.cli import main

    root, _, trained = project
    assert main(train_argv(root, {"pass_at_k": {"1": 0.0, "4": 0.0}})) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "warning: recipe dpo: precondition fails: pass_at_n = 0, threshold 0 (" in err and trained == [1]
    record = json.loads((root / "train.json").read_text())["precondition"]
    assert record | {"message": None} == {"signal": "pass_at_n", "value": 0.0, "threshold": 0.0, "holds": False,
                                          "message": None}
    assert main(train_argv(root, {"pass_at_k": {"1": 0.25, "4": 0.5}})) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((root / "train.json").read_text())["precondition"]["holds"] is True


def test_the_gate_stops_a_failing_precondition_before_training(project, capsys):
    import yaml

    from factory.cli import main

    root, params, trained = project
    (root / "params.yaml").write_text(yaml.safe_dump(params | {"recipe": "dpo", "preconditions": {"gate": "fail"}}))
    assert main(train_argv(root, {"pass_at_k": {"1": 0.0}})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("factory train: error: recipe dpo: precondition fails: pass_at_n = 0") and "\n" not in err
    assert "preconditions.gate is fail" in err and trained == [] and not (root / "train.json").exists()


def test_an_unmeasurable_precondition_is_reported_as_unmeasured_never_as_holding(project, capsys):
    import json

    import yaml

    from factory.cli import main

    root, params, trained = project
    # mcts_dpo on trees with no wrong terminal node: the AUC is undefined; even the gate lets it train, saying so.
    (root / "params.yaml").write_text(yaml.safe_dump(params | {"recipe": "mcts_dpo", "sample": {"n": 1},
                                                               "preconditions": {"gate": "fail"}}))
    steps = {"self_eval": {"auc": None, "correct_terminals": 3, "wrong_terminals": 0}}
    assert main(train_argv(root, {"pass_at_k": {"1": 0.5}}, steps)) == 0
    assert "warning: recipe mcts_dpo: precondition unmeasured: self_eval_auc" in capsys.readouterr().err
    record = json.loads((root / "train.json").read_text())["precondition"]
    assert (record["signal"], record["value"], record["holds"]) == ("self_eval_auc", None, None) and trained == [1]


def test_every_recipe_but_gold_only_sft_declares_a_precondition_with_params_thresholds():
    from pathlib import Path

    import yaml

    from factory.params import as_dict
    from factory.preconditions import PreconditionsConfig, check_recipe
    from factory.recipes import RECIPES
    from train.prm import PRMConfig

    assert [name for name, recipe in RECIPES.items() if recipe.precondition is None] == ["sft"]
    blind = {"self_eval_auc": 0.48, "majority_accuracy_gold": 0.34, "prm_heldout_accuracy": 0.7,
             "prm_heldout_baseline": 0.7, "step_negative_yield": 0.25, "pass_at_n": 0.0}
    verdicts = {name: check_recipe(recipe, blind, PreconditionsConfig()) for name, recipe in RECIPES.items()}
    assert {name: (c.signal, c.holds) for name, c in verdicts.items() if c} == {
        "dpo_st": ("pass_at_n", False), "self_train": ("pass_at_n", False), "dpo": ("pass_at_n", False),
        "scpo": ("majority_accuracy_gold", False), "scpo_semi": ("majority_accuracy_gold", False),
        "scdpo": ("step_negative_yield", False), "sipf_orpo": ("prm_heldout_accuracy", False),
        "mcts_dpo": ("self_eval_auc", False)}
    assert verdicts["sipf_orpo"].threshold == 0.7  # the baseline is the threshold: equal to it does not hold
    # The defaults are params.yaml's values.
    params = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    assert params["preconditions"] == as_dict(PreconditionsConfig())
    assert {key: params["prm"][key] for key in ("heldout_fraction", "eval_every", "patience")} == \
        {key: getattr(PRMConfig(), key) for key in ("heldout_fraction", "eval_every", "patience")}

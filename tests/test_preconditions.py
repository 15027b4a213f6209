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

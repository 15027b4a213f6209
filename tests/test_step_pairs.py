"""Step-level pair rules (scdpo, sipf_orpo), SIPF's growing dataset and the step-negatives audit check."""

import json

import pytest

from factory.ids import file_fingerprint
from factory.pairs import StepData
from factory.recipes import pair_rules
from factory.reasoning_steps import split_steps

QUESTION = "Mia has 12 marbles and buys 7. She gives 1 away. How many?"
PROBLEMS = [{"problem_id": "p-1", "question": QUESTION, "gold_answer": "18",
             "gold_rationale": "12+7=<<12+7=19>>19\n19-1=<<19-1=18>>18\n#### 18", "split": "train"}]
FIRST = "She has 12+7=<<12+7=19>>19 marbles."
CORRECT = f"{FIRST}\nThen 19-1=<<19-1=18>>18.\n#### 18"
# The calculator locates this one's first wrong step at step 1, after the same first step as CORRECT.
WRONG_AT_1 = f"{FIRST}\nThen 19-1=<<19-1=17>>17.\n#### 17"
CONTINUATION = f"{FIRST}\nThen 19+1=<<19+1=20>>20.\n#### 20"


def sample(sample_id, text, **extra):
    return {"sample_id": sample_id, "problem_id": "p-1", "text": text, "generator": "hf", "parent_sample_id": None,
            "prefix_steps": None, "sample_index": 0} | extra


def label(sample_id, correct, first_error_step=None):
    return {"sample_id": sample_id, "problem_id": "p-1", "correct": correct, "first_error_step": first_error_step,
            "answer": None}


def continuation(sample_id, text, parent="s-a", j=1):
    return sample(sample_id, text, generator="step_controlled", parent_sample_id=parent, prefix_steps=j)


def make_pairs(rule, problems, samples, labels, *, steps=None, **kwargs):
    """Run the pair rule named `rule` with its own settings class."""
    config = pair_rules()[rule].settings(**kwargs.pop("config", {}))
    return pair_rules()[rule].make(problems, samples, labels, config=config, steps=steps, **kwargs)


def scdpo(samples, labels, steps, **config):
    return make_pairs("scdpo", PROBLEMS, samples, labels, prompt_for=lambda q: f"Q: {q}\n", iteration=1,
                      config=config, steps=steps)


def test_scdpo_pairs_are_naive_plus_step_controlled_plus_calculator_located():
    samples = [sample("s-a", CORRECT), sample("s-b", WRONG_AT_1)]
    labels = [label("s-a", True), label("s-b", False, first_error_step=1)]
    steps = StepData(
        samples=[continuation("c-1", CONTINUATION), continuation("c-2", CONTINUATION),  # the same text twice
                 continuation("c-3", CORRECT)],
        labels=[label("c-1", False), label("c-2", False), label("c-3", True)])
    rows, summary = scdpo(samples, labels, steps)
    naive = [r for r in rows if r["prefix_steps"] is None]
    step_level = [r for r in rows if r["prefix_steps"] is not None]
    assert {(r["chosen_sample_id"], r["rejected_sample_id"]) for r in naive} == {("s-a", "s-b"), (None, "s-b")}
    assert {(r["chosen_sample_id"], r["rejected_sample_id"]) for r in step_level} == {("s-a", "c-1"), ("s-a", "s-b")}
    for row in step_level:
        assert row["prompt"] == f"Q: {QUESTION}\n{FIRST}\n" and row["prefix_steps"] == 1
        assert row["chosen"] == "Then 19-1=<<19-1=18>>18.\n#### 18"
        assert row["recipe"] == "scdpo" and row["weight"] == 1.0
    assert summary["step_pairs"] == {"step_controlled": 1, "calculator_located": 1, "continuations": 3,
                                         "continuations_correct": 1, "continuations_unjudged": 0,
                                         "parent_not_kept": 0, "duplicate": 1}
    assert summary["pairs"] == len(rows) == 4 and len({r["pair_id"] for r in rows}) == 4


def test_scdpo_refuses_a_continuation_that_does_not_keep_its_parents_steps():
    samples = [sample("s-a", CORRECT)]
    steps = StepData(samples=[continuation("c-1", "She has 3 marbles.\nThen 4.\n#### 4")], labels=[label("c-1", False)])
    with pytest.raises(ValueError, match="c-1.*does not keep the first 1 steps of its parent 's-a'"):
        scdpo(samples, [label("s-a", True)], steps)


def test_scdpo_skips_continuations_whose_parent_was_filtered_out():
    rows, summary = scdpo([sample("s-b", WRONG_AT_1)], [label("s-b", False)],
                          StepData(samples=[continuation("c-1", CONTINUATION)], labels=[label("c-1", False)]))
    assert summary["step_pairs"]["parent_not_kept"] == 1
    assert all(r["prefix_steps"] is None for r in rows)


def sipf(samples, labels, rewards, **config):
    process = [{"sample_id": s, "problem_id": "p-1", "source": "prm", "path_reward": r} for s, r in rewards.items()]
    return make_pairs("sipf_orpo", PROBLEMS, samples, labels, prompt_for=lambda q: q, iteration=1,
                      config=config, steps=StepData(process=process))


def test_sipf_pairs_prefer_a_correct_sample_by_the_widest_reward_margin():
    samples = [sample("s-1", CORRECT), sample("s-2", CORRECT.replace("Then", "So")), sample("s-3", WRONG_AT_1)]
    labels = [label("s-1", True), label("s-2", True), label("s-3", False)]
    rows, summary = sipf(samples, labels, {"s-1": 0.9, "s-2": 0.5, "s-3": 0.2}, pairs_per_problem=2, eta=0.1)
    assert [(r["chosen_sample_id"], r["rejected_sample_id"]) for r in rows] == [("s-1", "s-3"), ("s-1", "s-2")]
    assert summary["mean_margin"] == 0.55 and summary["rejected_correct"] == 1

    rows, summary = sipf(samples, labels, {"s-1": 0.5, "s-2": 0.5, "s-3": 0.45}, eta=0.1)
    assert rows == [] and summary["skipped"]["no_margin"] == 1


def test_step_recipes_refuse_step_data_made_for_another_recipe():
    for recipe in ("scdpo", "sipf_orpo"):
        with pytest.raises(ValueError, match=f"recipe '{recipe}' needs step data made for it.*'dpo_st'"):
            make_pairs(recipe, PROBLEMS, [sample("s-1", CORRECT)], [label("s-1", True)], prompt_for=str, iteration=1,
                       steps=StepData(recipe="dpo_st"))
    rows, summary = sipf([sample("s-1", CORRECT)], [label("s-1", True)], {})
    assert rows == [] and summary["skipped"]["no_process_score"] == 1


def test_sipf_dataset_grows_through_the_previous_models_lineage(tmp_path, monkeypatch):
    from factory.io import write_json
    from factory.recipes.sipf_orpo import earlier_pairs

    monkeypatch.chdir(tmp_path)
    pairs = tmp_path / "iter_1_pairs.parquet"
    pairs.write_bytes(b"pairs of iteration 1")
    model = tmp_path / "iter_1"
    write_json(model / "lineage.json", {"stage": "train:sipf_orpo", "params": {"pairs_files": [str(pairs)]},
                                        "data": {"pairs_0": file_fingerprint(pairs)}})
    assert earlier_pairs(str(model)) == [str(pairs)]
    pairs.write_bytes(b"changed since")
    with pytest.raises(ValueError, match="changed since the model trained on it"):
        earlier_pairs(str(model))
    write_json(model / "lineage.json", {"stage": "warmup"})
    assert earlier_pairs(str(model)) == []


def test_step_negatives_check_finds_a_continuation_that_changed_its_parents_prefix(tmp_path):
    from factory.audit import catalog, load_checks, run_checks
    from factory.lineage import write_table
    from factory.schema import from_rows

    def samples_rows(rows):
        base = {"iteration": 1, "model_id": "m-1", "seed": 0, "temperature": 0.7, "top_p": 1.0,
                "max_new_tokens": 64, "calculator": True, "n_tokens": 9, "finish_reason": "stop"}
        return from_rows([base | r for r in rows], "samples")

    def labels_rows(rows):
        base = {"answer_status": "wrong", "n_steps": 2, "calc_total": 2, "calc_wrong": 0, "calc_invalid": 0}
        return from_rows([base | r for r in rows], "labels")

    folder = tmp_path / "data" / "iter_1"
    write_table(samples_rows([sample("s-a", CORRECT)]), folder / "samples.parquet", kind="samples", stage="sample")
    write_table(labels_rows([label("s-a", True)]), folder / "labels.parquet", kind="labels", stage="label")
    kept_prefix = continuation("c-1", CONTINUATION)
    changed_prefix = continuation("c-2", "She has 12+8=<<12+8=20>>20 marbles.\nThen 19.\n#### 19")
    write_table(samples_rows([kept_prefix, changed_prefix]), folder / "steps" / "samples.parquet", kind="samples",
                stage="steps")
    write_table(labels_rows([label("c-1", False), label("c-2", False)]), folder / "steps" / "labels.parquet",
                kind="labels", stage="steps")
    write_table(from_rows([], "pairs"), folder / "pairs.parquet", kind="pairs", stage="pairs")
    (check,) = [c for c in load_checks("audits") if c.name == "step_negatives"]
    (result,) = run_checks(catalog(tmp_path), [check])
    rows = [dict(zip(result.columns, row)) for row in result.rows]
    assert [(row["sample_id"], row["problem"]) for row in rows] == [
        ("c-2", "prefix differs from the parent's first steps")]
    assert split_steps(CONTINUATION)[:1] == split_steps(CORRECT)[:1]


def test_the_audit_steps_macro_is_split_steps():
    import duckdb

    from factory.audit import _MACROS

    con = duckdb.connect()
    con.execute(_MACROS)
    for text in [CORRECT, "a\r\n\n  b \t\n####7\nc", "", "#### 5", " x\n\n"]:
        assert con.execute("SELECT steps(?)", [text]).fetchone()[0] == split_steps(text), json.dumps(text)

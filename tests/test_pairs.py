"""Preference pairs: DPO-ST's least-similar rule on tiny hand-made rows, and `factory pairs`."""

import doctest
import json
import random

import pyarrow as pa
import pytest

from factory import pairs as pairs_module
from factory import text as text_module
from factory.cli import main
from factory.lineage import model_id, read_provenance, read_table, write_table
from factory.pairs import PairsConfig
from factory.recipes import RECIPES, PairRule, Recipe, get_recipe, pair_rules, register
from factory.recipes.dpo_st import dpo_st_pairs
from factory.schema import from_rows
from factory.text import jaccard, word_set

PROMPT = lambda q: f"Q: {q}\nA:\n"  # noqa: E731

MIA = {
    "problem_id": "p-mia",
    "question": "Mia has 12 marbles and buys 7 more. How many marbles does she have?",
    "gold_answer": "19",
    "gold_rationale": "Mia has 12 marbles and buys 7 more.\nShe has 12+7=<<12+7=19>>19 marbles.\n#### 19",
}
TOM = {
    "problem_id": "p-tom",
    "question": "Tom has 3 boxes of 4 pens. How many pens?",
    "gold_answer": "12",
    "gold_rationale": "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12",
}
# Mia: 2 correct + 2 wrong (+ gold). Jaccard of each positive × negative:
#            s-w1    s-w2
#   gold     0.267   0.053   <- kept (1st)
#   s-c1     0.500   0.083   <- kept (3rd)
#   s-c2     0.077   0.364   <- kept (2nd)
MIA_SAMPLES = {
    "s-c1": ("She has 12+7=<<12+7=19>>19 marbles.\n#### 19", True),
    "s-c2": ("Seven more than twelve is 19.\n#### 19", True),
    "s-w1": ("She has 12+7=<<12+7=18>>18 marbles.\n#### 18", False),
    "s-w2": ("Twelve times seven is 84.\n#### 84", False),
}
# Tom: every sample is correct, so there is nothing to reject.
TOM_SAMPLES = {
    "s-t1": ("Tom has 3*4=<<3*4=12>>12 pens.\n#### 12", True),
    "s-t2": ("4 pens in each of 3 boxes is 12.\n#### 12", True),
}


def make_rows(groups=((MIA, MIA_SAMPLES), (TOM, TOM_SAMPLES))):
    problems, samples, labels = [], [], []
    for problem, group in groups:
        problems.append(problem)
        for sample_id, (text, correct) in group.items():
            samples.append({"sample_id": sample_id, "problem_id": problem["problem_id"], "text": text,
                            "model_id": "m-test"})
            labels.append({"sample_id": sample_id, "problem_id": problem["problem_id"], "correct": correct,
                           "answer": text.rsplit("#### ", 1)[1]})
    return problems, samples, labels


def run(problems, samples, labels, **config):
    return dpo_st_pairs(problems, samples, labels, prompt_for=PROMPT, iteration=1, config=PairsConfig(**config))


def test_word_set_drops_annotations_and_case():
    assert word_set("She has 3*4=<<3*4=12>>12 Pens.") == {"she", "has", "3*4=12", "pens."}
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0 and jaccard({"a"}, set()) == 0.0


def test_keeps_the_three_least_similar_pairs_with_gold_as_chosen():
    rows, summary = run(*make_rows())
    assert [(r["chosen_sample_id"], r["rejected_sample_id"]) for r in rows] == [
        (None, "s-w2"), ("s-c2", "s-w1"), ("s-c1", "s-w2")
    ]
    gold = rows[0]
    assert gold["chosen"] == MIA["gold_rationale"] and gold["rejected"] == MIA_SAMPLES["s-w2"][0]
    assert {r["prompt"] for r in rows} == {PROMPT(MIA["question"])}
    assert {(r["problem_id"], r["iteration"], r["recipe"], r["weight"]) for r in rows} == {("p-mia", 1, "dpo_st", 1.0)}
    assert gold["pair_id"] == pairs_module.content_id("pair", "dpo_st", 1, "p-mia", "gold", "s-w2")
    assert len({r["pair_id"] for r in rows}) == 3
    assert summary == {
        "recipe": "dpo_st", "iteration": 1, "problems_seen": 2, "problems_with_pairs": 1, "pairs": 3,
        "pairs_with_gold": 1, "mean_weight": 1.0, "unjudged_samples": 0,
        "skipped": {"no_positive": 0, "no_negative": 1},
    }


def test_pair_id_is_pinned():
    # A change to what defines a pair id must fail loudly: ids are joined across iterations.
    rows, _ = run(*make_rows())
    assert rows[0]["pair_id"] == "pair-abcc066258a8ca67"


def test_chosen_is_correct_or_gold_and_rejected_is_wrong():
    problems, samples, labels = make_rows()
    rows, _ = run(problems, samples, labels, pairs_per_problem=10)
    correct = {label["sample_id"]: label["correct"] for label in labels}
    assert len(rows) == 6  # 3 positives × 2 negatives, all kept
    for row in rows:
        assert correct[row["rejected_sample_id"]] is False
        assert row["chosen_sample_id"] is None or correct[row["chosen_sample_id"]] is True
        if row["chosen_sample_id"] is None:
            assert row["chosen"] == MIA["gold_rationale"]
    similarities = [jaccard(word_set(r["chosen"]), word_set(r["rejected"])) for r in rows]
    assert similarities == sorted(similarities)


def test_problem_without_wrong_or_right_samples_is_skipped_with_reason():
    rows, summary = run(*make_rows(((TOM, TOM_SAMPLES),)))
    assert rows == [] and summary["skipped"] == {"no_positive": 0, "no_negative": 1}
    only_wrong = {"s-w1": MIA_SAMPLES["s-w1"]}
    rows, summary = run(*make_rows((({**MIA, "gold_rationale": None}, only_wrong),)))
    assert rows == [] and summary["skipped"] == {"no_positive": 1, "no_negative": 0}
    rows, summary = run(*make_rows(((MIA, only_wrong),)), include_gold=False)
    assert rows == [] and summary["skipped"] == {"no_positive": 1, "no_negative": 0}


def test_without_gold_only_samples_are_chosen():
    rows, _ = run(*make_rows(), include_gold=False)
    assert [(r["chosen_sample_id"], r["rejected_sample_id"]) for r in rows] == [
        ("s-c2", "s-w1"), ("s-c1", "s-w2"), ("s-c2", "s-w2")
    ]


def test_unjudged_samples_are_neither_positive_nor_negative():
    problems, samples, labels = make_rows()
    for label in labels:
        if label["sample_id"] == "s-w2":
            label["correct"] = None
    rows, summary = run(problems, samples, labels)
    assert "s-w2" not in {r["rejected_sample_id"] for r in rows}
    assert summary["unjudged_samples"] == 1 and summary["pairs"] == 3


def test_ties_break_by_chosen_id_gold_first_then_rejected_id():
    same = "Mia has 19 marbles.\n#### 19"
    group = {"s-b": (same, True), "s-a": (same, True), "s-y": ("#### 5", False), "s-x": ("#### 5", False)}
    rows, _ = run(*make_rows((({**MIA, "gold_rationale": same}, group),)), pairs_per_problem=4)
    assert [(r["chosen_sample_id"], r["rejected_sample_id"]) for r in rows] == [
        (None, "s-x"), (None, "s-y"), ("s-a", "s-x"), ("s-a", "s-y")
    ]


def test_shuffled_inputs_give_identical_rows():
    problems, samples, labels = make_rows()
    expected = run(problems, samples, labels)
    generator = random.Random(0)
    for _ in range(5):
        for rows in (problems, samples, labels):
            generator.shuffle(rows)
        assert run(problems, samples, labels) == expected


def test_rows_validate_as_the_pairs_table():
    rows, _ = run(*make_rows())
    table = from_rows(rows, "pairs")
    assert table.num_rows == 3
    assert table.column("chosen_sample_id").null_count == 1


def test_inputs_that_do_not_join_are_errors_naming_the_sample():
    problems, samples, labels = make_rows()
    with pytest.raises(ValueError, match="<labels>: no label for sample 's-w2'"):
        run(problems, samples, [label for label in labels if label["sample_id"] != "s-w2"])
    with pytest.raises(ValueError, match=r"<samples>: row \d+ field 'problem_id': 'p-tom' is not in the problems file"):
        run([MIA], samples, labels)
    with pytest.raises(ValueError, match="sample 's-c1' appears twice"):
        run(problems, samples + samples[:1], labels)


def test_one_registry_names_every_recipe_and_rule():
    assert list(RECIPES) == ["dpo_st", "sft", "self_train", "dpo", "scpo", "scpo_semi", "scdpo", "sipf_orpo",
                             "mcts_dpo"]
    assert pair_rules()["dpo_st"].make is dpo_st_pairs and get_recipe("dpo").pairs is get_recipe("dpo_st").pairs
    assert set(pair_rules()) == {"dpo_st", "scpo", "scpo_semi", "scdpo", "sipf_orpo", "mcts_dpo"}
    with pytest.raises(ValueError, match="unknown recipe 'best'; known: dpo_st, sft, self_train, dpo, scpo"):
        get_recipe("best")
    with pytest.raises(ValueError, match="pairs_per_problem must be a positive integer, got 0"):
        PairsConfig(pairs_per_problem=0)
    rows, _ = pair_rules()["dpo_st"].make(*make_rows(), prompt_for=PROMPT, iteration=1, config=PairsConfig())
    assert len(rows) == 3


def test_a_new_recipe_is_one_registration(monkeypatch, capsys):
    """A tenth recipe: a rule, a training step and one registration, and the CLI, compare and the audit know it."""
    from dataclasses import dataclass
    from typing import ClassVar

    from factory.audit import _macros
    from factory.compare import experiment_command

    @dataclass(frozen=True, kw_only=True)
    class LongestPairs(PairsConfig):
        rule: ClassVar[str] = "longest"

    def longest_pairs(problems, samples, labels, *, prompt_for, iteration, config, steps=None):
        rows, summary = dpo_st_pairs(problems, samples, labels, prompt_for=prompt_for, iteration=iteration,
                                     config=config)
        return sorted(rows, key=lambda r: -len(r["chosen"]))[:1], summary

    recipe = Recipe(module="tests.toy", name="longest", paper="a toy", summary="the longest chosen",
                    train=lambda it: {}, pairs=PairRule(make=longest_pairs, settings=LongestPairs, gold_judged=True),
                    needs={"sample.split": "answers"}, setup={"sample.n": 2})
    monkeypatch.setattr("factory.recipes.base.RECIPES", dict(RECIPES))
    assert register(recipe) is recipe and get_recipe("longest") is recipe
    with pytest.raises(ValueError, match="registered twice"):
        register(recipe)
    assert "'longest'" in _macros()  # its pairs are gold-judged: the gold audits apply
    assert experiment_command("longest", 3)[3:9] == ["-S", "recipe=longest", "-S", "sample.split=answers", "-S",
                                                     "sample.n=2"]
    assert main(["recipe", "--list"]) == 0 and "a toy: the longest chosen" in capsys.readouterr().out
    rows, _ = recipe.pairs.make(*make_rows(), prompt_for=PROMPT, iteration=1, config=LongestPairs())
    assert len(rows) == 1 and rows[0]["recipe"] == "longest"


def test_doctests():
    from factory.recipes import dpo_st, scpo

    for module in (dpo_st, scpo, text_module):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# --- the command -------------------------------------------------------------------------


TOKENIZER_TEXTS = [p["question"] + "\n" + p["gold_rationale"] for p in (MIA, TOM)] * 20


def write_inputs(tmp_path):
    problems, samples, labels = make_rows()
    problem_rows = [{**p, "source": "test", "split": "answers"} for p in problems]
    sample_rows = [
        {**s, "iteration": 1, "generator": "test", "sample_index": i, "seed": 0, "temperature": 0.7,
         "top_p": 1.0, "max_new_tokens": 64, "calculator": True, "n_tokens": 5, "finish_reason": "stop"}
        for i, s in enumerate(samples)
    ]
    label_rows = [
        {**label, "answer_status": "correct" if label["correct"] else "wrong", "n_steps": 1,
         "calc_total": 1, "calc_wrong": 0, "calc_invalid": 0}
        for label in labels
    ]
    paths = {kind: tmp_path / f"{kind}.parquet" for kind in ("problems", "samples", "labels")}
    write_table(from_rows(problem_rows, "problems"), paths["problems"], kind="problems", stage="test")
    write_table(pa.Table.from_pylist(sample_rows), paths["samples"], kind="samples", stage="test")
    write_table(from_rows(label_rows, "labels"), paths["labels"], kind="labels", stage="test")
    return paths


@pytest.fixture
def cli_inputs(tmp_path, monkeypatch):
    from factory.modeling import train_tokenizer

    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults apply unless one is named
    model = tmp_path / "model"
    train_tokenizer(TOKENIZER_TEXTS, 300).save_pretrained(model)
    paths = write_inputs(tmp_path)
    argv = ["pairs", "--problems", str(paths["problems"]), "--samples", str(paths["samples"]),
            "--labels", str(paths["labels"]), "--model", str(model), "--iteration", "1"]
    return tmp_path, paths, argv


def test_cli_writes_pairs_with_provenance_and_summary(cli_inputs, capsys):
    tmp_path, paths, argv = cli_inputs
    out, summary = tmp_path / "pairs.parquet", tmp_path / "summary.json"
    assert main([*argv, "--recipe", "dpo_st", "--out", str(out), "--summary", str(summary)]) == 0
    rows = read_table(out, "pairs").to_pylist()
    assert [(r["chosen_sample_id"], r["rejected_sample_id"]) for r in rows] == [
        (None, "s-w2"), ("s-c2", "s-w1"), ("s-c1", "s-w2")
    ]
    assert rows[0]["prompt"] == f"Question: {MIA['question']}\nAnswer:\n"  # the tiny chat template
    expected, _ = run(*make_rows())
    assert [r["pair_id"] for r in rows] == [r["pair_id"] for r in expected]
    provenance = read_provenance(out)
    # The model whose samples these are: audits/wrong_model.sql checks every side against it.
    assert provenance["stage"] == "pairs" and provenance["model_id"] == model_id(argv[argv.index("--model") + 1])
    assert provenance["params"]["recipe"] == "dpo_st"
    assert provenance["params"]["pairs"] == {"pairs_per_problem": 3, "include_gold": True}
    assert set(provenance["inputs"]) == {"problems", "samples", "labels"}
    assert json.loads(summary.read_text())["skipped"] == {"no_positive": 0, "no_negative": 1}
    assert "3 dpo_st pairs from 1 of 2 problems" in capsys.readouterr().out


def test_cli_reads_the_pairs_params_section(cli_inputs):
    tmp_path, _, argv = cli_inputs
    params = tmp_path / "custom.yaml"
    params.write_text("pairs:\n  pairs_per_problem: 1\n  include_gold: false\n")
    out = tmp_path / "pairs.parquet"
    assert main([*argv, "--params", str(params), "--out", str(out)]) == 0
    assert [(r["chosen_sample_id"], r["rejected_sample_id"]) for r in read_table(out).to_pylist()] == [("s-c2", "s-w1")]


def test_cli_errors_name_the_sample_and_file(cli_inputs, capsys):
    tmp_path, paths, argv = cli_inputs
    labels = read_table(paths["labels"], "labels")
    write_table(labels.filter(pa.compute.not_equal(labels["sample_id"], "s-w1")), paths["labels"],
                kind="labels", stage="test")
    assert main([*argv, "--out", str(tmp_path / "pairs.parquet")]) == 2
    assert f"{paths['labels']}: no label for sample 's-w1'" in capsys.readouterr().err
    assert main([*argv, "--recipe", "best", "--out", str(tmp_path / "pairs.parquet")]) == 2
    assert "unknown recipe 'best'; known: dpo_st, sft, self_train" in capsys.readouterr().err
    assert not (tmp_path / "pairs.parquet").exists()

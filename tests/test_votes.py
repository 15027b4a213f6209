"""Majority votes and ScPO pairs: hand-made rows, a per-row reference, gold never read, `factory label --votes`."""

import json
import math
from collections import Counter

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory.cli import main
from factory.labelers import label_summary, vote_table
from factory.labelers.vote import vote_columns
from factory.lineage import read_table
from factory.recipes.scpo import ScPOPairs, ScPOSemiPairs, scpo_pairs, scpo_semi_pairs

PROMPT = lambda q: f"Q: {q}\nA:\n"  # noqa: E731


def labels_table(problem_ids, answers, correct=None):
    return pa.table({"problem_id": problem_ids, "answer": pa.array(answers, pa.string()),
                     "correct": pa.array(correct or [None] * len(answers), pa.bool_())})


def test_vote_columns_and_table_on_hand_made_votes():
    labels = labels_table(["a", "a", "a", "a", "b", "b", "c"], ["1", "1", "2", None, "3", "4", None],
                          [True, True, False, False, None, None, None])
    columns = {k: v.to_pylist() for k, v in vote_columns(labels).items()}
    assert columns == {"vote_count": [2, 2, 1, 0, 1, 1, 0], "vote_share": [0.5, 0.5, 0.25, 0.0, 0.5, 0.5, 0.0],
                       "vote_rank": [1, 1, 2, None, 1, 1, None]}
    a, b, c = vote_table(labels).to_pylist()
    assert (a["n_samples"], a["n_answered"], a["n_answers"], a["top_answer"], a["top_votes"]) == (4, 3, 2, "1", 2)
    assert a["entropy"] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert a["majority_correct"] is True and a["tied"] is False
    assert b["tied"] is True and b["top_answer"] is None and b["majority_correct"] is None and b["entropy"] == 1.0
    assert (c["n_answered"], c["top_share"], c["top_answer"], c["entropy"]) == (0, 0.0, None, 0.0)


def reference_votes(problem_ids, answers):
    """The straightforward per-row computation the columnar vote columns must match."""
    k = Counter(problem_ids)
    votes = Counter((p, a) for p, a in zip(problem_ids, answers) if a is not None)
    rows = []
    for p, a in zip(problem_ids, answers):
        count = votes[(p, a)] if a is not None else 0
        ranks = sorted({v for (q, _), v in votes.items() if q == p}, reverse=True)
        rows.append((count, count / k[p], ranks.index(count) + 1 if a is not None else None))
    return rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pqr"), st.sampled_from(["1", "2", "3", None])), min_size=1, max_size=30))
def test_vote_columns_match_a_per_row_reference(rows):
    problem_ids, answers = [p for p, _ in rows], [a for _, a in rows]
    columns = vote_columns(labels_table(problem_ids, answers))
    got = list(zip(*(columns[n].to_pylist() for n in ("vote_count", "vote_share", "vote_rank"))))
    assert got == reference_votes(problem_ids, answers)


class NoGold(dict):
    """A row that fails the test if anyone reads a gold-derived field."""

    FORBIDDEN = {"gold_answer", "gold_rationale", "correct", "answer_status"}

    def __getitem__(self, key):
        assert key not in self.FORBIDDEN, f"ScPO read gold field {key!r}"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert key not in self.FORBIDDEN, f"ScPO read gold field {key!r}"
        return super().get(key, default)


def vote_rows(groups, *, gold=None):
    """problems, samples, labels for {problem_id: [answer per sample]}, votes computed by the labeler."""
    problems, samples, ids, answers = [], [], [], []
    for problem_id, group in groups.items():
        problems.append({"problem_id": problem_id, "question": f"question {problem_id}",
                         "gold_answer": (gold or {}).get(problem_id), "gold_rationale": None})
        for index, answer in enumerate(group):
            samples.append({"sample_id": f"{problem_id}-s{index}", "problem_id": problem_id,
                            "text": f"step {index} of {problem_id}\n#### {answer}" if answer else f"rambling {index}"})
            ids.append(problem_id)
            answers.append(answer)
    columns = vote_columns(labels_table(ids, answers))
    correct = [None if (gold or {}).get(p) is None else a == gold[p] for p, a in zip(ids, answers)]
    labels = [{"sample_id": s["sample_id"], "problem_id": p, "answer": a, "correct": c, "answer_status": "x",
               "vote_count": v} for s, p, a, c, v in zip(samples, ids, answers, correct,
                                                          columns["vote_count"].to_pylist())]
    return problems, samples, labels


def test_scpo_keeps_consistent_problems_and_weighs_pairs_by_the_vote_margin():
    groups = {
        "p-major": ["7", "7", "7", "5", "5", "9", None, "7"],  # 4/8 for 7; fewest: None (0 votes)
        "p-low": ["1", "2", "3", "4", "1", "6", "8", "5"],  # top share 2/8 < 0.5
        "p-tie": ["1", "1", "1", "1", "2", "2", "2", "2"],  # no majority
        "p-unanimous": ["4"] * 8,  # nothing to reject
    }
    problems, samples, labels = vote_rows(groups)
    rows, summary = scpo_pairs(problems, samples, labels, prompt_for=PROMPT, iteration=2,
                               config=ScPOPairs(pairs_per_problem=2))
    assert {r["problem_id"] for r in rows} == {"p-major"} and len(rows) == 2
    assert {r["rejected_sample_id"] for r in rows} == {"p-major-s6"}
    assert {r["chosen_sample_id"] for r in rows} <= {"p-major-s0", "p-major-s1", "p-major-s2", "p-major-s7"}
    assert all(r["weight"] == 4 / 8 and r["recipe"] == "scpo" and r["iteration"] == 2 for r in rows)
    assert rows[0]["prompt"] == PROMPT("question p-major")
    assert summary["skipped"] == {"no_positive": 0, "no_negative": 1, "tied_vote": 1, "low_consistency": 1}
    lenient, _ = scpo_pairs(problems, samples, labels, prompt_for=PROMPT, iteration=2,
                            config=ScPOPairs(pairs_per_problem=1, min_vote_share=0.25))
    low = [r for r in lenient if r["problem_id"] == "p-low"]
    assert len(low) == 1 and low[0]["weight"] == (2 - 1) / 8


def test_scpo_never_reads_gold():
    groups = {"p-1": ["7", "7", "7", "5"], "p-2": ["3", "3", "8", "8", "8"]}
    problems, samples, labels = vote_rows(groups, gold={"p-1": "5", "p-2": "3"})
    guarded_problems = [NoGold(p) for p in problems]
    guarded_labels = [NoGold(label) for label in labels]
    rows, _ = scpo_pairs(guarded_problems, samples, guarded_labels, prompt_for=PROMPT, iteration=1,
                         config=ScPOPairs())
    # The majority is followed even where gold says it is wrong: p-1's chosen answer 7 is not gold's 5.
    assert [(r["problem_id"], r["chosen"].split("#### ")[1], r["rejected"].split("#### ")[1]) for r in rows][:1] \
        == [("p-1", "7", "5")]
    # Scrambled gold changes nothing.
    scrambled = [{**p, "gold_answer": "0"} for p in problems]
    again, _ = scpo_pairs(scrambled, samples, [{**label, "correct": not label["correct"]} for label in labels],
                          prompt_for=PROMPT, iteration=1, config=ScPOPairs())
    assert again == rows


def test_scpo_needs_vote_labels():
    problems, samples, labels = vote_rows({"p-1": ["7", "7", "5"]})
    with pytest.raises(ValueError, match="--labelers vote"):
        scpo_pairs(problems, samples, [{**label, "vote_count": None} for label in labels], prompt_for=PROMPT,
                   iteration=1, config=ScPOPairs())


def test_semi_supervised_uses_gold_where_it_exists_and_votes_elsewhere():
    groups = {"p-gold": ["7", "7", "7", "5"], "p-free": ["3", "3", "3", "8"]}
    problems, samples, labels = vote_rows(groups, gold={"p-gold": "5"})
    rows, summary = scpo_semi_pairs(problems, samples, labels, prompt_for=PROMPT, iteration=1,
                                    config=ScPOSemiPairs(pairs_per_problem=1))
    by_problem = {r["problem_id"]: r for r in rows}
    # Gold overrules the (wrong) majority on the labelled problem; the unlabelled one follows the vote.
    assert by_problem["p-gold"]["chosen"].endswith("#### 5") and by_problem["p-gold"]["weight"] == 1.0
    assert by_problem["p-free"]["chosen"].endswith("#### 3") and by_problem["p-free"]["weight"] == 2 / 4
    assert (summary["gold_pairs"], summary["vote_pairs"], summary["pairs"]) == (1, 1, 2)
    assert {r["recipe"] for r in rows} == {"scpo_semi"}


def test_label_cli_writes_votes_without_reading_gold_and_answers_the_audit_question(tmp_path, capsys):
    problems = tmp_path / "problems.parquet"
    from factory.lineage import write_table
    from factory.schema import from_rows

    rows = [{"problem_id": f"p-{i}", "question": f"q {i}", "gold_answer": str(i % 3), "source": "test",
             "split": "unlabeled"} for i in range(6)]
    write_table(from_rows(rows, "problems"), problems, kind="problems", stage="test")
    samples = tmp_path / "samples.jsonl"
    with samples.open("w") as handle:
        for i in range(6):
            for answer in ([str(i % 3)] * 3 + ["9"]) if i % 2 else (["9"] * 2 + [str(i % 3)] * 2):
                handle.write(json.dumps({"problem_id": f"p-{i}", "text": f"so\n#### {answer}"}) + "\n")
    labels, votes = tmp_path / "labels.parquet", tmp_path / "votes.parquet"
    argv = ["label", str(samples), "--problems", str(problems), "--out", str(labels), "--votes", str(votes)]
    assert main([*argv, "--labelers", "vote"]) == 0
    assert set(read_table(labels, "labels").column("answer_status").to_pylist()) == {"no_gold"}
    assert read_table(votes, "votes").column("majority_correct").null_count == 6
    assert main([*argv, "--summary", str(tmp_path / "label.json")]) == 0
    summary = json.loads((tmp_path / "label.json").read_text())["vote"]
    assert summary == {"mean_top_share": round((3 * 0.75 + 3 * 0.5) / 6, 4), "problems_with_majority": 3,
                       "majority_accuracy": 1.0, "majority_on_gold": {
                           "problems": 6, "majority_accuracy": 0.5,  # a tied vote is not a right majority
                           "by_top_share": [{"top_share": "[0.0, 0.5)", "problems": 0, "majority_accuracy": None},
                                            {"top_share": "[0.5, 0.75)", "problems": 3, "majority_accuracy": 0.0},
                                            {"top_share": "[0.75, 1.0]", "problems": 3, "majority_accuracy": 1.0}]}}
    # "How often is the majority answer wrong, by vote-share bucket?" in one query.
    answer = duckdb.sql(f"""
        select floor(top_share * 4) / 4 as bucket, count(*) as problems,
               avg(case when majority_correct then 0 else 1 end) as wrong_rate
        from '{votes}' where top_answer is not null group by bucket order by bucket""").fetchall()
    assert answer == [(0.75, 3, 0.0)]
    assert main([*argv, "--labelers", "gold"]) == 2
    assert "--votes needs the vote labeler" in capsys.readouterr().err


def test_label_summary_reports_the_vote():
    labels = labels_table(["a", "a", "b", "b"], ["1", "1", "2", "3"], [True, True, False, False])
    labels = labels.append_column("answer_status", pa.array(["correct", "correct", "wrong", "wrong"]))
    labels = labels.append_column("calc_wrong", pa.array([0, 0, 0, 0]))
    for name, column in vote_columns(labels).items():
        labels = labels.append_column(name, column)
    vote = label_summary(labels)["vote"]
    assert vote.pop("majority_on_gold")["majority_accuracy"] == 0.5  # b ties: no majority, counted as not right
    assert vote == {"mean_top_share": 0.75, "problems_with_majority": 1, "majority_accuracy": 1.0}

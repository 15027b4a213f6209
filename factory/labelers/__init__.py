"""Labelers attach verdicts to samples: the gold answer, the calculator checks, the majority vote.

`label_samples` joins samples to their problems and runs the chosen labelers,
returning a `labels` table. A sample whose problem is unknown is an error
rather than a silently unjudged row: one line naming the samples file, the
row and the field, and the problems file; if `factory problems` dropped that
problem (its dropped table lies next to the problems file) it says so, with
the reason (`factory.problems.files.unknown_problem`, which `factory pairs`
uses too). The final answer is always extracted, its canonical form
(`answer_canonical`, `factory.labelers.canonical`) always computed, and the
calculator always checks the annotations (all need nothing but the text and,
for the canonical form, gold when read). `gold` judges against gold answers;
without it gold is never read (`correct` is null, status `no_gold`). `vote`
adds each sample's vote count, share and rank; `vote_table` gives one row per
problem. Symbolic answers go to math-verify through `verifier`
(`factory.labelers.symbolic`; default: the shared one).

Each labeler works on whole Arrow columns and hands the rows its fast path
does not cover to its per-row reference (`gold_labels`, `calculator_labels`),
so the labels are the reference's by construction.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from factory.labelers.annotations import calculator_columns
from factory.labelers.canonical import canonical_column
from factory.labelers.gold import gold_columns
from factory.labelers.vote import vote_columns, vote_table
from factory.problems.files import unknown_problem
from factory.schema import validate

LABELERS = ("gold", "vote")
__all__ = ["LABELERS", "check_labelers", "label_samples", "label_summary", "vote_table"]


def check_labelers(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(names) - set(LABELERS))
    if unknown:
        raise ValueError(f"unknown labeler(s) {unknown}; known: {', '.join(LABELERS)} "
                         "(answer extraction and the calculator checks always run)")
    return tuple(name for name in LABELERS if name in names)


def label_samples(samples: pa.Table, problems: pa.Table, *, samples_source: str = "<samples>",
                  labelers: tuple[str, ...] = LABELERS, problems_source: str | None = None,
                  verifier=None) -> pa.Table:
    labelers = check_labelers(labelers)
    problem_ids = samples.column("problem_id")
    # The last row of a problem_id wins, as in a dict built from the problems file.
    reversed_ids = problems.column("problem_id").take(pa.array(range(problems.num_rows - 1, -1, -1), pa.int64()))
    last = pc.subtract(problems.num_rows - 1, pc.index_in(problem_ids, value_set=reversed_ids))
    unknown = last.is_null()
    if pc.any(unknown).as_py():
        row = pc.index(unknown, True).as_py()
        raise unknown_problem(samples_source, row, problem_ids[row].as_py(), problems_source)
    if "gold" in labelers:
        golds = problems.column("gold_answer").take(last)
    else:
        golds = pa.nulls(samples.num_rows, pa.string())
    texts = samples.column("text")
    columns = {"sample_id": samples.column("sample_id"), "problem_id": problem_ids}
    columns |= gold_columns(texts, golds, verifier=verifier)
    columns["answer_canonical"] = canonical_column(problem_ids, columns["answer"], golds, columns["correct"],
                                                   verifier=verifier)
    columns |= calculator_columns(texts)
    labels = pa.table(columns)
    if "vote" in labelers:
        for name, column in vote_columns(labels).items():
            labels = labels.append_column(name, column)
    return validate(labels, "labels", source=samples_source)


def label_summary(labels: pa.Table, votes: pa.Table | None = None) -> dict:
    """Counts per answer status, how many problems got at least one correct sample, pass@k, and the vote.

    `votes` is `vote_table(labels)` when the caller has it already. pass@k and the vote's accuracy on problems
    with a gold answer are the recipes' precondition signals (`factory.preconditions.label_signals`).
    """
    from factory.preconditions import label_signals

    statuses: dict[str, int] = {}
    for status in labels.column("answer_status").to_pylist():
        statuses[status] = statuses.get(status, 0) + 1
    problems: dict[str, bool] = {}
    for problem_id, correct in zip(labels.column("problem_id").to_pylist(), labels.column("correct").to_pylist()):
        problems[problem_id] = problems.get(problem_id, False) or correct is True
    solved = sum(problems.values())
    summary = {
        "samples": labels.num_rows,
        "answer_status": dict(sorted(statuses.items())),
        "sample_accuracy": round(statuses.get("correct", 0) / labels.num_rows, 4) if labels.num_rows else 0.0,
        "problems": len(problems),
        "problems_solved": solved,
        "solved_fraction": round(solved / len(problems), 4) if problems else 0.0,
        "calc_wrong": sum(labels.column("calc_wrong").to_pylist()),
    }
    if votes is None and "vote_count" in labels.column_names and labels.column("vote_count").null_count < labels.num_rows:
        votes = vote_table(labels)
    problem_ids, verdicts = labels.column("problem_id").to_pylist(), labels.column("correct").to_pylist()
    signals = label_signals(problem_ids, verdicts, votes.to_pylist() if votes is not None else None)
    summary["gold_problems"], summary["pass_at_k"] = signals["gold_problems"], signals["pass_at_k"]
    if votes is not None:
        summary["vote"] = vote_summary(votes) | {"majority_on_gold": signals["majority_on_gold"]}
    return summary


def vote_summary(votes: pa.Table) -> dict:
    """Mean top share, problems with a majority, and (where gold judged them) how often the majority is right."""
    rows = votes.num_rows
    with_majority = [c for c, a in zip(votes.column("majority_correct").to_pylist(),
                                       votes.column("top_answer").to_pylist()) if a is not None]
    judged = [c for c in with_majority if c is not None]
    return {
        "mean_top_share": round(sum(votes.column("top_share").to_pylist()) / rows, 4) if rows else 0.0,
        "problems_with_majority": len(with_majority),
        "majority_accuracy": round(sum(judged) / len(judged), 4) if judged else None,
    }

"""Labelers attach verdicts to samples: the gold answer and the calculator checks.

`label_samples` joins samples to their problems and runs every labeler,
returning a `labels` table; a sample whose problem is unknown is an error that
names the file and row rather than a silently unjudged row.
"""

from __future__ import annotations

import pyarrow as pa

from factory.labelers.calculator import calculator_labels
from factory.labelers.gold import gold_labels
from factory.schema import validate


def label_samples(samples: pa.Table, problems: pa.Table, *, samples_source: str = "<samples>") -> pa.Table:
    gold_by_problem = dict(zip(problems.column("problem_id").to_pylist(), problems.column("gold_answer").to_pylist()))
    problem_ids = samples.column("problem_id").to_pylist()
    for row, problem_id in enumerate(problem_ids):
        if problem_id not in gold_by_problem:
            raise ValueError(f"{samples_source}: row {row} field 'problem_id': {problem_id!r} is not in the problems file")
    texts = samples.column("text").to_pylist()
    columns = {"sample_id": samples.column("sample_id").to_pylist(), "problem_id": problem_ids}
    columns |= gold_labels(texts, [gold_by_problem[p] for p in problem_ids])
    columns |= calculator_labels(texts)
    return validate(pa.table(columns), "labels", source=samples_source)


def label_summary(labels: pa.Table) -> dict:
    """Counts per answer status, and how many problems got at least one correct sample (pass@n)."""
    statuses: dict[str, int] = {}
    for status in labels.column("answer_status").to_pylist():
        statuses[status] = statuses.get(status, 0) + 1
    problems: dict[str, bool] = {}
    for problem_id, correct in zip(labels.column("problem_id").to_pylist(), labels.column("correct").to_pylist()):
        problems[problem_id] = problems.get(problem_id, False) or correct is True
    solved = sum(problems.values())
    return {
        "samples": labels.num_rows,
        "answer_status": dict(sorted(statuses.items())),
        "sample_accuracy": round(statuses.get("correct", 0) / labels.num_rows, 4) if labels.num_rows else 0.0,
        "problems": len(problems),
        "problems_solved": solved,
        "solved_fraction": round(solved / len(problems), 4) if problems else 0.0,
        "calc_wrong": sum(labels.column("calc_wrong").to_pylist()),
    }

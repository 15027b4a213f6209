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

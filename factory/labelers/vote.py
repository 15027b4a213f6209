"""Majority-vote labeler (self-consistency): votes per final answer, per problem.

An answer votes by its `answer_canonical` text (`factory.labelers.canonical`),
so ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are one vote; labels without that
column (written before it existed) vote by `answer`. It reads only the answers,
never gold, so it labels problems that have none (ScPO's setting). Both are
vectorised rather than a Python loop per row: the per-sample columns in numpy
over dictionary codes, the per-problem table as one DuckDB query over Arrow.

Per sample (columns of `labels`): `vote_count`, the samples of its problem with
the same answer (0 when it has none); `vote_share`, that count over the
problem's samples k; `vote_rank`, 1 for the most-voted answer (tied answers
share a rank; null when it has no answer).

Per problem (the `votes` table): k, the answered samples, the distinct
answers, the top answer with its votes and share (null when answers tie for
the top: there is no majority), the entropy of the vote in bits, and, only
where gold judged the samples, whether the majority answer is correct (for
auditing; nothing trains on it).
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_PROBLEM_VOTES = """
with answers as (
    select problem_id, answer, count(*) as votes, bool_or(correct) as correct
    from labels where answer is not null group by problem_id, answer
),
samples as (
    select problem_id, count(*) as n_samples, count(answer) as n_answered from labels group by problem_id
),
tops as (
    select problem_id, max(votes) as top_votes, count(*) as n_answers,
           -sum(votes * log2(votes)) / sum(votes) + log2(sum(votes)) as entropy
    from answers group by problem_id
),
leaders as (
    select a.problem_id, count(*) as n_leaders, any_value(a.answer) as answer, any_value(a.correct) as correct
    from answers a join tops t on a.problem_id = t.problem_id and a.votes = t.top_votes
    group by a.problem_id
)
select
    s.problem_id,
    s.n_samples::int as n_samples,
    s.n_answered::int as n_answered,
    coalesce(t.n_answers, 0)::int as n_answers,
    case when l.n_leaders = 1 then l.answer end as top_answer,
    coalesce(t.top_votes, 0)::int as top_votes,
    coalesce(t.top_votes, 0)::double / s.n_samples as top_share,
    coalesce(l.n_leaders > 1, false) as tied,
    greatest(coalesce(t.entropy, 0.0), 0.0) as entropy,
    case when l.n_leaders = 1 then l.correct end as majority_correct
from samples s
left join tops t using (problem_id)
left join leaders l using (problem_id)
order by s.problem_id
"""


def _query(sql: str, labels: pa.Table) -> pa.Table:
    connection = duckdb.connect()
    try:
        connection.register("labels", labels)
        return connection.sql(sql).to_arrow_table()
    finally:
        connection.close()


def vote_columns(labels: pa.Table) -> dict[str, pa.Array]:
    """`vote_count`, `vote_share` and `vote_rank` for each row of `labels` (problem_id, answer), in row order."""
    problem = _codes(labels.column("problem_id"))
    answer = _codes(voting_answers(labels))
    answered = answer >= 0
    k = np.bincount(problem)[problem] if len(problem) else np.zeros(0, np.int64)
    _, group, count = np.unique(problem * (answer.max(initial=0) + 2) + answer + 1, return_inverse=True,
                                return_counts=True)
    votes = np.where(answered, count[group], 0)
    # Dense rank of the vote count within the problem, most votes first, among answered rows.
    rank_key = problem[answered] * (len(problem) + 1) + (len(problem) - votes[answered])
    distinct, position = np.unique(rank_key, return_inverse=True)
    distinct_problem = distinct // (len(problem) + 1)
    first_of_problem = np.searchsorted(distinct_problem, distinct_problem)
    rank = np.zeros(len(problem), np.int64)
    rank[answered] = position - first_of_problem[position] + 1
    return {
        "vote_count": pa.array(votes, pa.int32()),
        "vote_share": pa.array(votes / np.maximum(k, 1), pa.float64()),
        "vote_rank": pa.array(rank, pa.int32(), mask=~answered),
    }


def voting_answers(labels: pa.Table) -> pa.ChunkedArray:
    """The answer each label votes with: `answer_canonical`, or `answer` where that is null or missing."""
    if "answer_canonical" not in labels.column_names:
        return labels.column("answer")
    return pc.coalesce(labels.column("answer_canonical"), labels.column("answer"))


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Dictionary codes of a string column; null is -1."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    return encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def vote_table(labels: pa.Table) -> pa.Table:
    """One `votes` row per problem of `labels` (problem_id, answer, correct), sorted by problem_id.

    `top_answer` is the winning answer's canonical text.
    """
    from factory.schema import validate

    columns = pa.table({"problem_id": labels.column("problem_id"), "answer": voting_answers(labels),
                        "correct": labels.column("correct")})
    return validate(_query(_PROBLEM_VOTES, columns), "votes")

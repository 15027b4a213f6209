"""Majority-vote labeler (self-consistency): votes per normalised final answer, per problem.

It reads only the extracted answers, never gold, so it labels problems that
have none (ScPO's setting). Both functions are one DuckDB query over Arrow,
vectorised rather than a Python loop per row.

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
import pyarrow as pa

_SAMPLE_VOTES = """
with counted as (
    select row, problem_id, answer,
           count(answer) over (partition by problem_id, answer) as votes,
           count(*) over (partition by problem_id) as k
    from labels
)
select
    votes::int as vote_count,
    votes::double / k as vote_share,
    case when answer is not null
         then dense_rank() over (partition by problem_id, answer is null order by votes desc) end::int as vote_rank,
    row
from counted
order by row
"""

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
    indexed = labels.select(["problem_id", "answer"]).append_column("row", pa.array(range(labels.num_rows), pa.int64()))
    votes = _query(_SAMPLE_VOTES, indexed)
    return {name: votes.column(name).combine_chunks() for name in ("vote_count", "vote_share", "vote_rank")}


def vote_table(labels: pa.Table) -> pa.Table:
    """One `votes` row per problem of `labels` (problem_id, answer, correct), sorted by problem_id."""
    from factory.schema import validate

    columns = labels.select(["problem_id", "answer", "correct"])
    return validate(_query(_PROBLEM_VOTES, columns), "votes")

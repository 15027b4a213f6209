"""The filter contract: a subclass says keep or drop-with-a-reason; the base does the rest.

A per-row filter implements only `judge(row) -> True | (False, reason)`. A rule
that needs the other rows of a group (near-duplicates within a problem)
subclasses `GroupFilter` and implements `group_key`, `order_key` and
`judge_group`. Either way `apply(rows)` returns a `FilterResult`: the kept rows
in input order, the dropped ones as rows of the `dropped` table (the whole
input row kept as canonical JSON, so nothing is lost), and the counts.

`reasons(table)` is the same decision for a whole Arrow table (null: keep);
it judges row by row unless a filter overrides it with vectorised code, as
the built-in rules do, their `judge` staying the reference. `dropped_table`
makes the `dropped` rows of a table at once.

A reason reads "kind (details naming the values)", e.g.
"no final answer (answer_status=unparseable)"; its kind, the text before " (",
is what the counts group by.

>>> class ShortText(Filter):
...     name = "short_text"
...     def judge(self, row):
...         return True if len(row["text"]) >= 3 else (False, f"too short (len={len(row['text'])})")
>>> result = ShortText().apply([{"sample_id": "s-1", "text": "abc"}, {"sample_id": "s-2", "text": "a"}])
>>> [r["sample_id"] for r in result.kept], result.dropped[0]["reason"], result.counts["dropped"]
(['s-1'], 'too short (len=1)', {'too short': 1})
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from factory.arrow import canonical_json_rows
from factory.ids import canonical_json
from factory.schema import DROPPED

Verdict = bool | tuple[bool, str]
STAGE = "filter"


def reason_kind(reason: str) -> str:
    """'near-duplicate (of s-1, Jaccard 0.900 > 0.7)' -> 'near-duplicate'."""
    return reason.split(" (", 1)[0]


def reason_kind_counts(reasons: pa.Array) -> dict[str, int]:
    """{reason kind: rows}, sorted by kind, of an array of reasons (no nulls)."""
    kinds = pc.list_element(pc.split_pattern(reasons, " (", max_splits=1), 0)
    return dict(sorted((count["values"], count["counts"]) for count in pc.value_counts(kinds).to_pylist()))


@dataclass
class FilterResult:
    """What one filter did: kept rows (input order), dropped rows (`dropped` schema), counts."""

    kept: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


class Filter:
    """Base of every filter; subclasses implement `judge` (or `GroupFilter.judge_group`)."""

    name: str = "filter"  # recorded in dropped rows and counts
    columns: tuple[str, ...] | None = None  # the columns `reasons` reads (None: all), so it is handed no others
    table: str = "samples"  # the table the rows belong to
    id_column: str = "sample_id"  # their id in that table

    def judge(self, row: dict) -> Verdict:
        """True to keep `row`, or (False, "kind (values)") to drop it."""
        raise NotImplementedError(f"{type(self).__name__} must implement judge(row)")

    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        """`judge` of each row (aligned with `rows`)."""
        return [self.judge(row) for row in rows]

    def apply(self, rows: list[dict]) -> FilterResult:
        return self.collect(rows, self.verdicts(rows))

    def reasons(self, table: pa.Table) -> pa.Array:
        """Per row of `table`: null to keep it, else the reason to drop it (what `apply` decides)."""
        rows = table.to_pylist()
        return pa.array([self._reason(verdict, row) for row, verdict in zip(rows, self.verdicts(rows), strict=True)],
                        pa.string())

    def dropped_table(self, table: pa.Table, reasons: pa.Array) -> pa.Table:
        """Rows of the `dropped` table for the rows of `table`, dropped for `reasons` (aligned, no nulls)."""
        n = table.num_rows
        return pa.table({
            "row_id": table.column(self.id_column),
            "table": pa.array([self.table] * n, pa.string()),
            "stage": pa.array([STAGE] * n, pa.string()),
            "filter": pa.array([self.name] * n, pa.string()),
            "reason": reasons,
            "row": canonical_json_rows(table),
        }).cast(DROPPED)

    def collect(self, rows: list[dict], verdicts: list[Verdict]) -> FilterResult:
        """Split `rows` by their verdicts (aligned with rows) and count the drops per reason kind."""
        result = FilterResult()
        per_kind: dict[str, int] = defaultdict(int)
        for row, verdict in zip(rows, verdicts, strict=True):
            reason = self._reason(verdict, row)
            if reason is None:
                result.kept.append(row)
                continue
            per_kind[reason_kind(reason)] += 1
            result.dropped.append({
                "row_id": row[self.id_column],
                "table": self.table,
                "stage": STAGE,
                "filter": self.name,
                "reason": reason,
                "row": canonical_json(row),
            })
        result.counts = {"input": len(rows), "kept": len(result.kept), "dropped": dict(sorted(per_kind.items()))}
        return result

    def _reason(self, verdict: Verdict, row: dict) -> str | None:
        """None to keep; the reason to drop. A drop without a reason is a bug in the filter."""
        if verdict is True:
            return None
        if isinstance(verdict, tuple) and len(verdict) == 2 and verdict[0] is False:
            reason = verdict[1]
            if isinstance(reason, str) and reason.strip():
                return reason
        raise TypeError(
            f"filter {self.name!r} judged {self.id_column}={row.get(self.id_column)!r} as {verdict!r}; "
            "expected True or (False, 'reason')"
        )

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({settings})"


class GroupFilter(Filter):
    """A filter whose verdict on a row depends on the other rows of its group.

    Rows are grouped by `group_key` and each group is judged in `order_key`
    order, so the verdicts do not depend on the order of the input.
    """

    def group_key(self, row: dict) -> Hashable:
        raise NotImplementedError(f"{type(self).__name__} must implement group_key(row)")

    def order_key(self, row: dict):
        raise NotImplementedError(f"{type(self).__name__} must implement order_key(row)")

    def judge_group(self, rows: list[dict]) -> list[Verdict]:
        """Verdicts for one group's rows, given in `order_key` order (aligned with them)."""
        raise NotImplementedError(f"{type(self).__name__} must implement judge_group(rows)")

    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, row in enumerate(rows):
            groups[self.group_key(row)].append(index)
        verdicts: list[Verdict | None] = [None] * len(rows)
        for indices in groups.values():
            indices.sort(key=lambda i: self.order_key(rows[i]))
            for index, verdict in zip(indices, self.judge_group([rows[i] for i in indices]), strict=True):
                verdicts[index] = verdict
        return verdicts

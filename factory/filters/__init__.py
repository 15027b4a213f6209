"""Filters drop sample rows with a recorded reason: final answer, length, calculator consistency, near-duplicates.

`run_filters` joins samples to their labels, applies the filters of
`build_filters(config)` in order (each sees only what the previous kept) and
returns the kept samples, the dropped rows with filter and reason, and counts
that always reconcile: input = kept + every drop. It works on Arrow tables
(`Filter.reasons`); `join_labels` and `Filter.apply` are the same over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.filters.base import Filter, FilterResult, GroupFilter, reason_kind, reason_kind_counts
from factory.filters.rules import CalculatorConsistencyFilter, FinalAnswerFilter, LengthFilter, NearDuplicateFilter
from factory.schema import SAMPLES, validate

__all__ = [
    "CalculatorConsistencyFilter", "Filter", "FilterConfig", "FilterResult", "FinalAnswerFilter", "GroupFilter", "LengthFilter",
    "NearDuplicateFilter", "build_filters", "join_labels", "join_labels_table", "reason_kind", "run_filters",
]


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """Thresholds of the sample filters (params.yaml `filter`)."""

    min_steps: int = 1  # drop rationales with fewer steps before `#### N`
    max_tokens: int = 256  # drop rationales longer than this many generated tokens
    dedup_threshold: float = 0.7  # drop a sample whose Jaccard similarity to a kept one exceeds this (DPO-ST)
    calculator_consistent: bool = False  # drop samples with a wrong or invalid <<a=b>> annotation (SIPF)

    def __post_init__(self):
        build_filters(self)  # the filters check their own thresholds; a bad value fails here, by name


def build_filters(config: FilterConfig) -> list[Filter]:
    """The filters in the order they run: format, length, calculator consistency (when asked), near-duplicates."""
    return [
        FinalAnswerFilter(),
        LengthFilter(min_steps=config.min_steps, max_tokens=config.max_tokens),
        *([CalculatorConsistencyFilter()] if config.calculator_consistent else []),
        NearDuplicateFilter(threshold=config.dedup_threshold),
    ]


def join_labels(samples: list[dict], labels: list[dict], *, samples_source: str = "<samples>",
                labels_source: str = "<labels>") -> list[dict]:
    """Each sample row with its label's columns added (the sample's own columns win on a clash)."""
    by_id: dict[str, dict] = {}
    for index, label in enumerate(labels):
        if label["sample_id"] in by_id:
            raise ValueError(f"{labels_source}: row {index + 1}: sample_id {label['sample_id']!r} is labelled twice")
        by_id[label["sample_id"]] = label
    rows = []
    for index, sample in enumerate(samples):
        label = by_id.get(sample["sample_id"])
        if label is None:
            raise ValueError(
                f"{samples_source}: row {index + 1}: sample_id {sample['sample_id']!r} has no label in {labels_source}"
            )
        if label["problem_id"] != sample["problem_id"]:
            raise ValueError(
                f"{samples_source}: row {index + 1}: sample_id {sample['sample_id']!r} has problem_id "
                f"{sample['problem_id']!r} but its label in {labels_source} has {label['problem_id']!r}"
            )
        rows.append(sample | {k: v for k, v in label.items() if k not in sample})
    return rows


def join_labels_table(samples: pa.Table, labels: pa.Table, *, samples_source: str = "<samples>",
                      labels_source: str = "<labels>") -> pa.Table:
    """`join_labels` of two tables: the samples' columns, then the labels' other columns, in sample order."""
    sample_ids, label_ids = samples.column("sample_id"), labels.column("sample_id")
    aligned = samples.num_rows == labels.num_rows and pc.all(pc.equal(sample_ids, label_ids)).as_py() is not False
    position = None if aligned else pc.index_in(sample_ids, value_set=label_ids)
    problems = labels.column("problem_id") if aligned else labels.column("problem_id").take(position)
    if (len(pc.unique(label_ids)) < labels.num_rows or (position is not None and position.null_count)
            or pc.all(pc.equal(problems, samples.column("problem_id"))).as_py() is False):
        join_labels(samples.to_pylist(), labels.to_pylist(), samples_source=samples_source,
                    labels_source=labels_source)  # raises, naming the first bad row
    joined = samples
    for name in labels.column_names:
        if name not in samples.column_names:
            column = labels.column(name) if aligned else labels.column(name).take(position)
            joined = joined.append_column(labels.schema.field(name), column)
    return joined


def run_filters(samples: pa.Table, labels: pa.Table, config: FilterConfig, *, samples_source: str = "<samples>",
                labels_source: str = "<labels>") -> tuple[pa.Table, pa.Table, dict]:
    """(kept samples, dropped rows, counts); kept rows keep their input order and only the samples columns.

    counts = {"input": n, "kept": k, "dropped": {filter name: {reason kind: count}}}.
    """
    samples = validate(samples, "samples", source=samples_source)
    labels = validate(labels, "labels", source=labels_source)
    rows = join_labels_table(samples, labels, samples_source=samples_source, labels_source=labels_source)
    alive = np.ones(rows.num_rows, bool)  # the rows every filter so far kept
    dropped: list[pa.Table] = []
    per_filter: dict[str, dict[str, int]] = {}
    for rule in build_filters(config):
        seen = rows.select(list(rule.columns)) if rule.columns else rows
        reasons = rule.reasons(seen if alive.all() else seen.filter(alive))
        drop = np.zeros(rows.num_rows, bool)
        drop[np.flatnonzero(alive)[reasons.is_valid().to_numpy(zero_copy_only=False)]] = True
        reasons = reasons.drop_null()
        dropped.append(rule.dropped_table(rows.filter(drop), reasons))
        per_filter[rule.name] = reason_kind_counts(reasons)
        alive &= ~drop
    counts = {"input": samples.num_rows, "kept": int(alive.sum()), "dropped": per_filter}
    total_dropped = sum(n for kinds in per_filter.values() for n in kinds.values())
    dropped_rows = pa.concat_tables(dropped).combine_chunks()
    if counts["input"] != counts["kept"] + total_dropped or total_dropped != dropped_rows.num_rows:
        raise AssertionError(f"filter counts do not reconcile: {counts} ({dropped_rows.num_rows} dropped rows)")
    kept = rows.select(SAMPLES.names).filter(alive).cast(SAMPLES)
    return kept, dropped_rows, counts

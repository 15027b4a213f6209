"""Process labels: step scores of a sample from Monte Carlo rollouts (SIPF, Chen et al. 2025).

A sample with n steps (`factory.reasoning_steps`, 0-based) gets one score per step:
step i < n-1 scores the share of the rollouts from its prefix (the first i+1
steps, `prefix_steps` = i+1) whose final answer is correct; the last step
scores the sample's own correctness (1.0 or 0.0). A step is good when its
score is above `good_threshold` (0: "good if some rollout reaches the gold
answer"); the path reward is the mean or the min of the scores.

`error_drop_rate` checks the scores against the calculator: on samples whose
annotations locate a first wrong step, does the score drop at or before it?
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from factory.generators.continuations import StepsConfig, _rows, choose_rollout_samples
from factory.schema import from_rows
from factory.reasoning_steps import split_steps

__all__ = ["aggregate_scores", "error_drop_rate", "rollout_scores"]


def aggregate_scores(scores: list[float], how: str) -> float:
    """The path reward of step scores: their mean or their min.

    >>> aggregate_scores([1.0, 0.5, 0.0], "mean"), aggregate_scores([1.0, 0.5, 0.0], "min")
    (0.5, 0.0)
    """
    if not scores:
        raise ValueError("no step scores to aggregate")
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "min":
        return min(scores)
    raise ValueError(f"aggregate must be mean or min, got {how!r}")


def rollout_scores(samples, labels, rollouts, rollout_labels, config: StepsConfig, *, model_id: str) -> pa.Table:
    """A `process` table (source "rollouts") for the samples `mc_rollouts` rolled out, sorted by sample_id.

    `samples`, `labels`, `rollouts` (rows of `mc_rollouts`) and `rollout_labels`
    (their labels) are tables or lists of dicts. The samples scored are
    `choose_rollout_samples(samples, labels, config)`: the same choice as
    `mc_rollouts` made from the same inputs; a rollout whose label is missing
    or not correct counts as a failure, and a prefix without rollouts is an
    error.
    """
    labels_by_id = {row["sample_id"]: row for row in _rows(labels)}
    correct_by_id = {row["sample_id"]: row.get("correct") is True for row in _rows(rollout_labels)}
    outcomes: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for row in _rows(rollouts):
        outcomes[row["parent_sample_id"], row["prefix_steps"]].append(correct_by_id.get(row["sample_id"], False))
    process = []
    for sample in sorted(choose_rollout_samples(samples, labels, config), key=lambda s: s["sample_id"]):
        n_steps = len(split_steps(sample["text"], config.delimiter))
        scores = []
        for p in range(1, n_steps):
            results = outcomes.get((sample["sample_id"], p))
            if not results:
                raise ValueError(f"sample {sample['sample_id']}: no rollouts from its first {p} step(s)")
            scores.append(sum(results) / len(results))
        scores.append(1.0 if labels_by_id[sample["sample_id"]]["correct"] else 0.0)
        process.append({
            "sample_id": sample["sample_id"],
            "problem_id": sample["problem_id"],
            "source": "rollouts",
            "step_scores": scores,
            "step_labels": [score > config.good_threshold for score in scores],
            "path_reward": aggregate_scores(scores, config.aggregate),
            "n_rollouts": config.rollouts,
            "model_id": model_id,
        })
    return from_rows(process, "process")


def solve_rates(labels) -> dict[str, float]:
    """Each problem's share of samples labelled correct (among those judged against gold)."""
    judged: dict[str, list[bool]] = defaultdict(list)
    for row in _rows(labels):
        if row.get("correct") is not None:
            judged[row["problem_id"]].append(row["correct"])
    return {problem_id: sum(values) / len(values) for problem_id, values in judged.items()}


def error_drop_rate(process, labels, *, rates: dict[str, float] | None = None) -> dict:
    """How often the rollout scores drop at or before the step the calculator says is the first wrong one.

    Over the `process` rows whose sample's label has a `first_error_step` e
    (a wrong `<<a=b>>` annotation located in step e) inside its scores
    ("located"): with s_i the score of step i and s_{-1} the problem's
    empirical solve rate (share of its samples in `labels` judged correct, a
    Monte Carlo estimate from the empty prefix; `rates` overrides it), the
    score "drops at or before e" when s_i < s_{i-1} for some i <= e, and
    "drops exactly at e" when s_e < s_{e-1}. Returns {"located",
    "drop_at_or_before", "rate" (their ratio to 4 decimals; None when nothing is located),
    "drop_exactly_at", "no_drop" (located rows with no drop up to e)}.

    >>> process = [{"sample_id": "a", "problem_id": "p", "step_scores": [0.5, 0.0, 0.0]},
    ...            {"sample_id": "b", "problem_id": "p", "step_scores": [1.0, 1.0, 0.0]}]
    >>> labels = [{"sample_id": "a", "problem_id": "p", "correct": False, "first_error_step": 1},
    ...           {"sample_id": "b", "problem_id": "p", "correct": True, "first_error_step": 0}]
    >>> error_drop_rate(process, labels)
    {'located': 2, 'drop_at_or_before': 1, 'rate': 0.5, 'drop_exactly_at': 1, 'no_drop': 1}
    """
    labels_rows = _rows(labels)
    by_id = {row["sample_id"]: row for row in labels_rows}
    rates = solve_rates(labels_rows) if rates is None else rates
    located = at_or_before = exactly = 0
    for row in _rows(process):
        label = by_id.get(row["sample_id"])
        error = None if label is None else label.get("first_error_step")
        scores = row["step_scores"]
        if error is None or not 0 <= error < len(scores):
            continue
        located += 1
        previous = [rates.get(row["problem_id"], 0.0)] + list(scores[:-1])  # s_{i-1} for each i
        drops = [scores[i] < previous[i] for i in range(error + 1)]
        at_or_before += any(drops)
        exactly += drops[error]
    return {
        "located": located,
        "drop_at_or_before": at_or_before,
        "rate": round(at_or_before / located, 4) if located else None,
        "drop_exactly_at": exactly,
        "no_drop": located - at_or_before,
    }

"""The sample filters: final answer, length, calculator consistency, near-duplicates.

Rows are samples joined with their labels (so `answer_status`, `n_steps` and
`correct` sit beside `text`, `n_tokens` and `finish_reason`). Each rule's
`judge` (or `judge_group`) is the reference; its `reasons` gives the same
verdicts for a whole table with Arrow and numpy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.filters.base import Filter, GroupFilter, Verdict
from factory.filters.similarity import jaccard as bulk_jaccard
from factory.filters.similarity import word_bitsets
from factory.arrow import as_array
from factory.text import jaccard, word_set


class FinalAnswerFilter(Filter):
    """Drop rationales that stopped at the token budget or that give no final answer.

    >>> FinalAnswerFilter().judge({"finish_reason": "stop", "answer_status": "unparseable"})
    (False, 'no final answer (answer_status=unparseable)')
    """

    name = "final_answer"
    columns = ("finish_reason", "max_new_tokens", "answer_status")

    def judge(self, row: dict) -> Verdict:
        # Truncation first: it is the cause when a cut-off rationale also has no answer.
        if row["finish_reason"] == "length":
            budget = row.get("max_new_tokens")
            return False, f"truncated at max_new_tokens (finish_reason=length, max_new_tokens={budget})"
        if row["answer_status"] == "unparseable":
            return False, "no final answer (answer_status=unparseable)"
        return True

    def reasons(self, table: pa.Table) -> pa.Array:
        budget = (table.column("max_new_tokens").cast(pa.string()).fill_null("None")
                  if "max_new_tokens" in table.column_names else "None")
        truncated = pc.binary_join_element_wise(
            "truncated at max_new_tokens (finish_reason=length, max_new_tokens=", budget, ")", "")
        return _first_reason(table.num_rows, [
            (pc.equal(table.column("finish_reason"), "length"), truncated),
            (pc.equal(table.column("answer_status"), "unparseable"), "no final answer (answer_status=unparseable)"),
        ])


class LengthFilter(Filter):
    """Drop rationales with fewer than `min_steps` steps or more than `max_tokens` tokens.

    `min_steps=1`: a rationale needs at least one step before `#### N`; a bare
    answer teaches no reasoning and gives step-level recipes nothing to pair.
    `max_tokens=256`: the decoding budget of the default params (`sample` and
    `eval` max_new_tokens), so what is kept fits what the model is asked to write.

    >>> LengthFilter(min_steps=2).judge({"n_steps": 1, "n_tokens": 30})
    (False, 'too few steps (n_steps=1 < min_steps=2)')
    """

    name = "length"
    columns = ("n_steps", "n_tokens")

    def __init__(self, *, min_steps: int = 1, max_tokens: int = 256):
        if min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {min_steps}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.min_steps = min_steps
        self.max_tokens = max_tokens

    def judge(self, row: dict) -> Verdict:
        if row["n_steps"] < self.min_steps:
            return False, f"too few steps (n_steps={row['n_steps']} < min_steps={self.min_steps})"
        if row["n_tokens"] > self.max_tokens:
            return False, f"too many tokens (n_tokens={row['n_tokens']} > max_tokens={self.max_tokens})"
        return True

    def reasons(self, table: pa.Table) -> pa.Array:
        steps, tokens = table.column("n_steps"), table.column("n_tokens")
        return _first_reason(table.num_rows, [
            (pc.less(steps, self.min_steps), pc.binary_join_element_wise(
                "too few steps (n_steps=", steps.cast(pa.string()), f" < min_steps={self.min_steps})", "")),
            (pc.greater(tokens, self.max_tokens), pc.binary_join_element_wise(
                "too many tokens (n_tokens=", tokens.cast(pa.string()), f" > max_tokens={self.max_tokens})", "")),
        ])


class CalculatorConsistencyFilter(Filter):
    """Drop rationales with an annotation `<<a=b>>` that does not hold or cannot be evaluated.

    Self-iterative process feedback (Chen et al., COLING 2025) keeps only
    calculator-consistent samples before it scores their steps; params
    `filter.calculator_consistent` switches it on.

    >>> CalculatorConsistencyFilter().judge({"calc_wrong": 1, "calc_invalid": 0, "first_error_step": 2})
    (False, 'calculator inconsistent (calc_wrong=1, calc_invalid=0, first_error_step=2)')
    """

    name = "calculator_consistent"
    columns = ("calc_wrong", "calc_invalid", "first_error_step")

    def judge(self, row: dict) -> Verdict:
        if row["calc_wrong"] or row["calc_invalid"]:
            return False, (f"calculator inconsistent (calc_wrong={row['calc_wrong']}, "
                           f"calc_invalid={row['calc_invalid']}, first_error_step={row['first_error_step']})")
        return True

    def reasons(self, table: pa.Table) -> pa.Array:
        wrong, invalid = table.column("calc_wrong"), table.column("calc_invalid")
        first = table.column("first_error_step").cast(pa.string()).fill_null("None")
        return _first_reason(table.num_rows, [
            (pc.or_(pc.greater(wrong, 0), pc.greater(invalid, 0)), pc.binary_join_element_wise(
                "calculator inconsistent (calc_wrong=", wrong.cast(pa.string()), ", calc_invalid=",
                invalid.cast(pa.string()), ", first_error_step=", first, ")", "")),
        ])


class NearDuplicateFilter(GroupFilter):
    """Within each (problem_id, correct) group, drop a sample too similar to one already kept.

    Similarity is the Jaccard index of the two texts' word sets (lowercased,
    calculator annotations removed: `factory.text.word_set`). Samples are taken
    in (sample_index, sample_id) order; each is compared with the group's kept
    samples and dropped when its similarity to the most similar one is strictly
    above `threshold`, naming that sample. Correct and wrong samples are separate
    groups: an identical wrong twin of a correct sample is a negative, not a copy.

    `threshold=0.7`: DPO-ST (Wang et al., ACL 2024) removes near-duplicate
    rationales whose token-set Jaccard similarity exceeds 0.7.
    """

    name = "near_duplicate"
    columns = ("problem_id", "correct", "sample_index", "sample_id", "text")

    def __init__(self, *, threshold: float = 0.7):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold}")
        self.threshold = threshold

    def group_key(self, row: dict):
        return row["problem_id"], row["correct"]

    def order_key(self, row: dict):
        # The text breaks ties between rows that share an index and id, so order never depends on input order.
        return row["sample_index"], row["sample_id"], row["text"]

    def judge_group(self, rows: list[dict]) -> list[Verdict]:
        kept: list[tuple[str, frozenset[str]]] = []
        verdicts: list[Verdict] = []
        for row in rows:
            words = word_set(row["text"])
            best_id, best = None, -1.0
            for kept_id, kept_words in kept:
                similarity = jaccard(words, kept_words)
                if similarity > best:
                    best_id, best = kept_id, similarity
            if best > self.threshold:
                verdicts.append((False, f"near-duplicate (of {best_id}, Jaccard {best:.3f} > {self.threshold})"))
            else:
                kept.append((row["sample_id"], words))
                verdicts.append(True)
        return verdicts

    def reasons(self, table: pa.Table) -> pa.Array:
        """`judge_group` for all groups at once: every pair of a group scored in bulk, and the greedy
        keep-or-drop settled over the pairs above the threshold only."""
        n = table.num_rows
        problem = pc.dictionary_encode(table.column("problem_id").combine_chunks()).indices.to_numpy()
        correct = table.column("correct").combine_chunks()
        group = problem * 3 + np.where(correct.is_null().to_numpy(zero_copy_only=False), 2,
                                       correct.fill_null(False).to_numpy(zero_copy_only=False))
        order = pc.sort_indices(pa.table({"group": group, "index": table.column("sample_index"),
                                          "id": table.column("sample_id"), "text": table.column("text")}),
                                sort_keys=[(key, "ascending") for key in ("group", "index", "id", "text")])
        order = order.to_numpy()
        ordered_group = group[order]
        first, later = _ordered_pairs(ordered_group)
        bitsets = word_bitsets(table.column("text"), problem)  # rows usually come grouped by problem
        # Jaccard <= smaller set / larger set: pairs of sizes too far apart cannot be above the threshold.
        ordered_size = bitsets.size[order]
        small, large = (f(ordered_size[first], ordered_size[later]) for f in (np.minimum, np.maximum))
        possible = np.flatnonzero((small / np.maximum(large, 1) > self.threshold) | (large == 0))
        first, later = first[possible], later[possible]
        similarity = bulk_jaccard(bitsets, order[first], order[later])
        close = similarity > self.threshold
        kept, best, best_similarity = _greedy(len(order), first[close], later[close], similarity[close])
        dropped = np.flatnonzero(~kept)
        dropped = dropped[np.argsort(order[dropped])]  # in row order
        similarities, index = np.unique(best_similarity[dropped], return_inverse=True)
        best_ids = as_array(table.column("sample_id").take(pa.array(order[best[dropped]])))
        text = pc.binary_join_element_wise(
            "near-duplicate (of ", best_ids, ", Jaccard ",
            pa.array([f"{value:.3f}" for value in similarities], pa.string()).take(pa.array(index.reshape(-1))),
            f" > {self.threshold})", "")
        mask = np.zeros(n, bool)
        mask[order[dropped]] = True
        return pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(mask), as_array(text))


def _first_reason(n: int, rules: list[tuple[pa.Array, pa.Array | str]]) -> pa.Array:
    """The reason of the first rule whose condition holds (null conditions do not), else null."""
    reasons = pa.nulls(n, pa.string())
    for condition, reason in reversed(rules):
        reasons = pc.if_else(pc.fill_null(condition, False), reason, reasons)
    return reasons


def _ordered_pairs(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, of positions in the same run of `groups` (sorted)."""
    n = len(groups)
    end = np.r_[np.flatnonzero(groups[1:] != groups[:-1]) + 1, n][np.cumsum(np.r_[0, groups[1:] != groups[:-1]])] \
        if n else np.zeros(0, np.int64)
    partners = end - np.arange(n) - 1
    first = np.repeat(np.arange(n), partners)
    later = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(partners) - partners, partners)
    return first, later


def _greedy(n: int, first: np.ndarray, later: np.ndarray, similarity: np.ndarray) -> tuple[np.ndarray, ...]:
    """Take positions in order; drop one when an earlier kept one is above the threshold (the pairs given).

    Returns kept (bool per position) and, for dropped positions, the most similar kept earlier one
    (the first of equals) and that similarity. Settled in rounds: a position is decided once all
    its earlier neighbours are.
    """
    earlier = np.bincount(later, minlength=n)  # close earlier neighbours of each position
    state = np.where(earlier == 0, 1, 0).astype(np.int8)  # 0 undecided, 1 kept, 2 dropped
    while (state == 0).any():
        by_kept = np.bincount(later[state[first] == 1], minlength=n) > 0
        by_dropped = np.bincount(later[state[first] == 2], minlength=n)
        undecided = state == 0
        state[undecided & by_kept] = 2
        state[undecided & ~by_kept & (by_dropped == earlier)] = 1
    kept = state == 1
    best = np.zeros(n, np.int64)
    best_similarity = np.zeros(n)
    to_kept = np.flatnonzero(kept[first])
    rank = np.lexsort((first[to_kept], -similarity[to_kept], later[to_kept]))
    chosen = to_kept[rank]
    leading = np.r_[True, later[chosen][1:] != later[chosen][:-1]] if len(chosen) else np.zeros(0, bool)
    best[later[chosen[leading]]] = first[chosen[leading]]
    best_similarity[later[chosen[leading]]] = similarity[chosen[leading]]
    return kept, best, best_similarity

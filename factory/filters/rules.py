"""The sample filters: final answer, length, near-duplicates.

Rows are samples joined with their labels (so `answer_status`, `n_steps` and
`correct` sit beside `text`, `n_tokens` and `finish_reason`).
"""

from __future__ import annotations

from factory.filters.base import Filter, GroupFilter, Verdict
from factory.text import jaccard, word_set


class FinalAnswerFilter(Filter):
    """Drop rationales that stopped at the token budget or that give no final answer.

    >>> FinalAnswerFilter().judge({"finish_reason": "stop", "answer_status": "unparseable"})
    (False, 'no final answer (answer_status=unparseable)')
    """

    name = "final_answer"

    def judge(self, row: dict) -> Verdict:
        # Truncation first: it is the cause when a cut-off rationale also has no answer.
        if row["finish_reason"] == "length":
            budget = row.get("max_new_tokens")
            return False, f"truncated at max_new_tokens (finish_reason=length, max_new_tokens={budget})"
        if row["answer_status"] == "unparseable":
            return False, "no final answer (answer_status=unparseable)"
        return True


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

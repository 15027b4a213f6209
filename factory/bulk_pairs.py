"""DPO-ST's pair rule (`factory.recipes.dpo_st.dpo_st_pairs`) over Arrow tables, for the `pairs` stage.

Similarities are computed in bulk (`factory.filters.similarity`) and the k
least similar pairs of every problem picked with numpy; the rows are the
reference rule's, in its order (tests/test_data_plane.py checks them equal).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.arrow import as_array, json_strings, threads
from factory.filters.similarity import jaccard as bulk_jaccard
from factory.filters.similarity import word_bitsets
from factory.ids import ID_PREFIXES, canonical_json
from factory.pairs import GOLD, NO_NEGATIVE, NO_POSITIVE, PairsConfig
from factory.schema import PAIRS


def dpo_st_table(problems: pa.Table, samples: pa.Table, labels: pa.Table, *, prompt_for: Callable[[str], str],
                  iteration: int, config: PairsConfig) -> tuple[pa.Table, dict] | None:
    """`dpo_st_pairs` in bulk: every positive x negative of a problem scored at once, the k least similar kept.

    None when the inputs do not join (`dpo_st_pairs` then names the culprit) or a sample id is empty (it
    would tie with the gold rationale's "").
    """
    joined = _Joined.of(problems, samples, labels)
    if joined is None:
        return None
    gold = (joined.problem_column(problems, "gold_rationale") if "gold_rationale" in problems.column_names
            else pa.nulls(joined.n_problems, pa.string()))
    with_gold = np.flatnonzero(pc.fill_null(pc.greater(pc.utf8_length(gold), 0), False).to_numpy(
        zero_copy_only=False) & config.include_gold)
    # Texts: the samples, then the gold rationales (chosen, never rejected); `owner` is a text's problem.
    texts = pa.chunked_array([*samples.column("text").cast(pa.string()).chunks,
                              as_array(gold.take(pa.array(with_gold)))], pa.string())
    owner = np.r_[joined.code, with_gold]
    positive = np.r_[np.flatnonzero(joined.verdict == 1), len(joined.ids) + np.arange(len(with_gold))]
    negative = np.flatnonzero(joined.verdict == 0)
    n_positive = np.bincount(owner[positive], minlength=joined.n_problems)
    n_negative = np.bincount(owner[negative], minlength=joined.n_problems)
    chosen, rejected = _products(positive[np.argsort(owner[positive], kind="stable")], n_positive,
                                 negative[np.argsort(owner[negative], kind="stable")], n_negative)
    compared = np.flatnonzero(np.bincount(np.r_[chosen, rejected], minlength=len(texts)))
    similarity = bulk_jaccard(word_bitsets(texts, owner, only=compared), chosen, rejected)
    # The rule's order: problem_id, similarity, chosen id (gold first, as ""), rejected id; the k first per problem.
    rank = np.r_[joined.id_rank, np.full(len(with_gold), -1)] + 1
    chosen, rejected = _first_k(owner[chosen], joined.problem_rank[owner[chosen]], similarity,
                                rank[chosen] * (len(rank) + 1) + rank[rejected], chosen, rejected,
                                config.pairs_per_problem)
    table = pair_rows(joined.problem_column(problems, "question"), joined.problem_ids, owner, chosen, rejected,
                       joined.ids, texts, prompt_for=prompt_for, iteration=iteration, config=config)
    weights = table.column("weight").to_pylist()
    summary = {
        "recipe": config.rule, "iteration": iteration, "problems_seen": joined.n_problems,
        "problems_with_pairs": int(np.count_nonzero(np.bincount(owner[chosen], minlength=joined.n_problems))),
        "pairs": table.num_rows, "pairs_with_gold": int(np.sum(chosen >= len(joined.ids))),
        "mean_weight": round(sum(weights) / len(weights), 4) if weights else None,
        "skipped": {NO_POSITIVE: int(np.sum(n_positive == 0)),
                    NO_NEGATIVE: int(np.sum((n_positive > 0) & (n_negative == 0)))},
        "unjudged_samples": int(np.sum(joined.verdict == -1)),
    }
    return table, summary


@dataclass(frozen=True)
class _Joined:
    """Samples joined to their labels and problems, as `check_inputs` checks them.

    `verdict` is 1 / 0 / -1 for correct / wrong / unjudged; problems are numbered by first appearance among
    the samples (`code`, so a problem's texts stay together) and ranked by problem_id (the output order).
    """

    ids: pa.Array
    id_rank: np.ndarray
    verdict: np.ndarray
    problem_ids: pa.Array
    code: np.ndarray
    problem_rank: np.ndarray
    problem_row: np.ndarray  # the problems table's row of each problem (the last, as in the rule's dict)

    @property
    def n_problems(self) -> int:
        return len(self.problem_ids)

    def problem_column(self, problems: pa.Table, name: str) -> pa.Array:
        return as_array(problems.column(name).cast(pa.string()).take(pa.array(self.problem_row)))

    @classmethod
    def of(cls, problems: pa.Table, samples: pa.Table, labels: pa.Table) -> _Joined | None:
        ids = samples.column("sample_id").cast(pa.string()).combine_chunks()
        label_ids = labels.column("sample_id").cast(pa.string())
        sample_problems = samples.column("problem_id").cast(pa.string()).combine_chunks()
        with ThreadPoolExecutor(threads()) as pool:  # independent hash and sort passes
            position = pool.submit(pc.index_in, ids, value_set=label_ids)
            id_rank = pool.submit(_ranks, ids)
            label_ids_unique = pool.submit(lambda: len(pc.unique(label_ids)) == len(label_ids))
            ids_unique = pool.submit(lambda: len(pc.unique(ids)) == len(ids))
            encoded = pool.submit(pc.dictionary_encode, sample_problems)
            position, id_rank, encoded = position.result(), id_rank.result(), encoded.result()
        if (position.null_count or ids.null_count or sample_problems.null_count or not label_ids_unique.result()
                or not ids_unique.result() or pc.any(pc.equal(ids, "")).as_py()):
            return None
        problem_ids = problems.column("problem_id").cast(pa.string())
        reversed_ids = problem_ids.take(pa.array(np.arange(len(problem_ids))[::-1]))
        found = pc.index_in(encoded.dictionary, value_set=reversed_ids)
        if found.null_count:
            return None
        correct = labels.column("correct").cast(pa.bool_()).take(position)
        verdict = np.where(correct.is_null().to_numpy(zero_copy_only=False), -1,
                           correct.fill_null(False).to_numpy(zero_copy_only=False))
        return cls(ids=ids, id_rank=id_rank, verdict=verdict, problem_ids=encoded.dictionary,
                   code=encoded.indices.to_numpy(), problem_rank=_ranks(encoded.dictionary),
                   problem_row=len(problem_ids) - 1 - found.to_numpy())


def _first_k(problem: np.ndarray, problem_rank: np.ndarray, similarity: np.ndarray, tie_break: np.ndarray,
             chosen: np.ndarray, rejected: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k first pairs of each problem by (similarity, tie_break), in (problem_rank, similarity, tie_break) order.

    Pairs come grouped by `problem`. A few rounds each take the least pair of every problem (cheaper than
    sorting them all); for large k, one sort.
    """
    if not len(similarity):
        return chosen, rejected
    starts = np.flatnonzero(np.r_[True, problem[1:] != problem[:-1]])
    segment = np.cumsum(np.r_[0, problem[1:] != problem[:-1]])
    if k > 8:
        order = np.lexsort((tie_break, similarity, problem_rank))
        position = np.arange(len(order))
        first = np.r_[True, problem_rank[order][1:] != problem_rank[order][:-1]]
        keep = order[position - np.maximum.accumulate(np.where(first, position, 0)) < k]
        return chosen[keep], rejected[keep]
    remaining = similarity.copy()
    picked, rounds = [], []
    for round_ in range(k):
        least = np.minimum.reduceat(remaining, starts)
        at_least = remaining == least[segment]
        tie = np.minimum.reduceat(np.where(at_least, tie_break, np.iinfo(np.int64).max), starts)
        winner = np.flatnonzero(at_least & (tie_break == tie[segment]) & np.isfinite(remaining))
        picked.append(winner)
        rounds.append(np.full(len(winner), round_))
        remaining[winner] = np.inf
    picked, rounds = np.concatenate(picked), np.concatenate(rounds)
    keep = picked[np.lexsort((rounds, problem_rank[picked]))]
    return chosen[keep], rejected[keep]


def _products(positive: np.ndarray, n_positive: np.ndarray, negative: np.ndarray,
              n_negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (positive, negative) of each problem (both lists grouped by problem, in problem order)."""
    pairs = n_positive * n_negative
    positive_start = np.r_[0, np.cumsum(n_positive)[:-1]]
    negative_start = np.r_[0, np.cumsum(n_negative)[:-1]]
    problem = np.repeat(np.arange(len(pairs)), pairs)
    within = np.arange(int(pairs.sum())) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    columns = np.maximum(n_negative[problem], 1)
    return (positive[positive_start[problem] + within // columns],
            negative[negative_start[problem] + within % columns])


def _ranks(values: pa.Array) -> np.ndarray:
    """The rank of each string in code-point order (Python's str order)."""
    ranks = np.empty(len(values), np.int64)
    ranks[pc.sort_indices(values).to_numpy()] = np.arange(len(values))
    return ranks


def pair_rows(questions: pa.Array, problem_ids: pa.Array, owner: np.ndarray, chosen: np.ndarray,
               rejected: np.ndarray, ids: pa.Array, texts: pa.ChunkedArray, *, prompt_for: Callable[[str], str],
               iteration: int, config: PairsConfig) -> pa.Table:
    """The `pairs` rows of (chosen, rejected) texts; a chosen text past the samples is a gold rationale."""
    n = len(chosen)
    gold = chosen >= len(ids)
    with ThreadPoolExecutor(2) as pool:  # Arrow copies the texts while Python writes prompts and pair ids
        chosen_text, rejected_text = (pool.submit(lambda rows: as_array(texts.take(pa.array(rows))), rows)
                                      for rows in (chosen, rejected))
        first = np.r_[True, owner[chosen][1:] != owner[chosen][:-1]] if n else np.zeros(0, bool)
        with_pairs, pair_problem = owner[chosen][first], np.cumsum(first) - 1  # in output order
        prompts = pa.array([prompt_for(q) for q in questions.take(pa.array(with_pairs)).to_pylist()], pa.string())
        problem_id = problem_ids.take(pa.array(owner[chosen]))
        chosen_id = ids.take(pa.array(np.where(gold, 0, chosen), mask=gold))
        rejected_id = ids.take(pa.array(rejected))
        # content_id("pair", recipe, iteration, problem_id, chosen_id or GOLD, rejected_id), column by column
        hashed = pc.binary_join_element_wise(
            f"[{canonical_json(config.rule)},{canonical_json(iteration)},", json_strings(problem_id), ",",
            json_strings(chosen_id.fill_null(GOLD)), ",", json_strings(rejected_id), "]", "")
        pair_id = [ID_PREFIXES["pair"] + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
                   for text in hashed.to_pylist()]
        return pa.table({
            "pair_id": pa.array(pair_id, pa.string()),
            "problem_id": problem_id,
            "iteration": pa.array(np.full(n, iteration), pa.int32()),
            "recipe": pa.array([config.rule] * n, pa.string()),
            "prompt": prompts.take(pa.array(pair_problem)),
            "chosen": chosen_text.result(),
            "rejected": rejected_text.result(),
            "chosen_sample_id": chosen_id,
            "rejected_sample_id": rejected_id,
            "weight": pa.array(np.ones(n), pa.float64()),
            "prefix_steps": pa.nulls(n, pa.int32()),
            "chosen_node_id": pa.nulls(n, pa.string()),
            "rejected_node_id": pa.nulls(n, pa.string()),
        }, schema=PAIRS)

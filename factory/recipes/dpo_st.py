"""DPO-ST (Wang et al., ACL 2024): self-training with DPO. The default recipe.

Paper: Tianduo Wang, Shichen Li, Wei Lu, "Self-Training with Direct Preference
Optimization Improves Chain-of-Thought Reasoning", ACL 2024.

- Needs: the defaults (`sample.split: answers`, 4 samples per problem at T=0.7).
- Pairs: per problem, the correct samples (and the gold rationale) against the
  wrong ones, the `pairs.pairs_per_problem` (3) least similar by token-set
  Jaccard. Gold-judged. The per-row rule is below; `factory.bulk_pairs` is the
  same rule over Arrow tables, tested equal, used by the `pairs` stage.
- Training: DPO (+ NLL on chosen) from the previous model on the iteration's
  pairs (beta 0.1, the previous model is also the reference), then the
  self-training step: `self_train.n` more samples per problem from the DPO
  model; the correct ones that pass the filters (near-duplicates included)
  join the gold rationales, and the **base** model (`self_train.init`) is
  trained on them for `self_train.max_steps` optimizer steps. The DPO model is
  kept in `models/iter_k/dpo`.
"""

from __future__ import annotations

from collections.abc import Callable

from factory.pairs import (NO_NEGATIVE, NO_POSITIVE, SKIP_REASONS, PairsConfig, StepData, check_inputs,
                           group_by_problem, least_similar, pair_row, summarize)
from factory.preconditions import Check, PreconditionsConfig, at_least
from factory.recipes.base import PairRule, Recipe, register


def dpo_st_pairs(problems: list[dict], samples: list[dict], labels: list[dict], *, prompt_for: Callable[[str], str],
                 iteration: int, config: PairsConfig, steps: StepData | None = None) -> tuple[list[dict], dict]:
    """DPO-ST pairs (Wang et al., ACL 2024): the least similar correct × wrong rationales.

    Per problem with samples: positives are the samples labelled correct, plus
    the gold rationale (`config.include_gold`; its chosen_sample_id is None);
    negatives are the samples labelled wrong; samples that could not be judged
    (correct is None) are neither. Every positive × negative is scored by
    token-set Jaccard (`factory.text`) and the `config.pairs_per_problem`
    least similar are kept. A problem with no positive (checked first) or no
    negative is skipped and counted. Rows come sorted by problem_id, then
    similarity, so shuffled inputs give the same output.

    >>> problems = [{"problem_id": "p-1", "question": "2+3?", "gold_answer": "5",
    ...              "gold_rationale": "2+3=<<2+3=5>>5\\n#### 5"}]
    >>> samples = [{"sample_id": "s-a", "problem_id": "p-1", "text": "add them: 5\\n#### 5"},
    ...            {"sample_id": "s-b", "problem_id": "p-1", "text": "2+3=6\\n#### 6"}]
    >>> labels = [{"sample_id": "s-a", "correct": True}, {"sample_id": "s-b", "correct": False}]
    >>> rows, summary = dpo_st_pairs(problems, samples, labels, prompt_for=lambda q: f"Q: {q}\\n",
    ...                              iteration=1, config=PairsConfig(pairs_per_problem=1))
    >>> [(r["chosen_sample_id"], r["rejected_sample_id"], r["prompt"], r["chosen"]) for r in rows]
    [('s-a', 's-b', 'Q: 2+3?\\n', 'add them: 5\\n#### 5')]
    >>> summary["pairs"], summary["skipped"]
    (1, {'no_positive': 0, 'no_negative': 0})
    """
    label_by_id = check_inputs(problems, samples, labels)
    problem_by_id = {p["problem_id"]: p for p in problems}
    rows: list[dict] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    unjudged = 0
    for problem_id, group in group_by_problem(samples).items():
        problem = problem_by_id[problem_id]
        verdicts = [label_by_id[s["sample_id"]]["correct"] for s in group]
        unjudged += sum(v is None for v in verdicts)
        judged = list(zip(group, verdicts))
        positives: list[tuple[str | None, str]] = [(s["sample_id"], s["text"]) for s, v in judged if v is True]
        negatives = [(s["sample_id"], s["text"]) for s, v in judged if v is False]
        if config.include_gold and problem.get("gold_rationale"):
            positives.append((None, problem["gold_rationale"]))
        if not positives or not negatives:
            skipped[NO_POSITIVE if not positives else NO_NEGATIVE] += 1
            continue
        prompt = prompt_for(problem["question"])
        kept = least_similar(positives, negatives, config.pairs_per_problem)
        for _, chosen_id, chosen, rejected_id, rejected in kept:
            rows.append(pair_row(config, iteration, problem_id, prompt, chosen_id, chosen, rejected_id, rejected,
                                  1.0))
    summary = summarize(config, iteration, samples, rows, skipped) | {"unjudged_samples": unjudged}
    return rows, summary


def train(it) -> dict:
    """DPO from the previous model, then SFT of the base on gold plus the DPO model's correct samples."""
    from train import iteration as blocks

    summary = it.start()
    dpo_dir = blocks.dpo_beside(it, blocks.read_pairs(it), summary)
    examples = blocks.second_round(it, dpo_dir or it.prev_dir, summary, pool_first_round=False)
    return blocks.sft(it, examples, summary, init=it.self_train.init, dpo_dir=dpo_dir)


def _bulk(*args, **kwargs):
    from factory.bulk_pairs import dpo_st_table

    return dpo_st_table(*args, **kwargs)


def needs_correct_samples(signals, config: PreconditionsConfig) -> Check:
    """Gold-judged pairs and self-training need correct samples: pass@n over gold problems above the threshold."""
    return at_least(signals, "pass_at_n", config.min_pass_at_n, strict=True,
                    why="its pairs and its self-training data need problems the model solves at least once")


PAIRS = PairRule(make=dpo_st_pairs, settings=PairsConfig, gold_judged=True, bulk=_bulk)
RECIPE = register(Recipe(
    module=__name__, name="dpo_st", paper="Wang et al., ACL 2024", train=train, pairs=PAIRS, samples_again=True,
    precondition=needs_correct_samples,
    summary="DPO on gold-judged pairs, then the base retrained on gold + the DPO model's correct samples"))

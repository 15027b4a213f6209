"""ScPO (Prasad et al., 2024): self-consistency preference optimization, no gold; and its semi-supervised variant.

Paper: Archiki Prasad et al., "Self-Consistency Preference Optimization", 2024.

- Needs: `sample.split: unlabeled` (ScPO reads no gold; `scpo_semi`:
  `answers+unlabeled`, half with gold answers). Set-up: 8 samples per problem
  (`sample.n`), the budget of the other recipes in one round.
- Pairs: the vote labeler counts the votes per final answer (canonical:
  equivalent answers are one); a question makes pairs only if its top answer
  is unique and holds at least `pairs.scpo.min_vote_share` (tau, 0.5) of the
  votes; chosen = a sample with the top answer, rejected = one with the fewest
  votes (no answer counts 0), weight w = (V(chosen) - V(rejected)) / k. Judged
  without gold. `scpo_semi`: gold pairs (the `dpo_st` rule, weight 1) where a
  problem has a gold answer, vote pairs where not, in one file.
- Training: weighted DPO + NLL from the previous model (also the reference),
  sum w * (DPO loss + alpha * NLL(chosen) / |chosen|) / sum w; that model is
  the iteration's model (no second round, no SFT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from factory.pairs import (NO_NEGATIVE, NO_POSITIVE, PairsConfig, StepData, check_inputs, group_by_problem,
                           least_similar, pair_row, summarize)
from factory.preconditions import Check, PreconditionsConfig, at_least
from factory.recipes.base import PairRule, Recipe, register
from factory.recipes.baselines import train_dpo
from factory.recipes.dpo_st import dpo_st_pairs

TIED_VOTE = "tied_vote"  # two answers share the most votes, so there is no majority
LOW_CONSISTENCY = "low_consistency"  # the top answer's vote share is below min_vote_share
VOTE_SKIP_REASONS = (NO_POSITIVE, NO_NEGATIVE, TIED_VOTE, LOW_CONSISTENCY)


@dataclass(frozen=True, kw_only=True)
class ScPOPairs(PairsConfig):
    """params `pairs` plus `pairs.scpo`."""

    rule: ClassVar[str] = "scpo"
    section: ClassVar[str | None] = "scpo"
    # tau: a problem makes vote pairs only if its top answer has at least this share of the k votes.
    min_vote_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.min_vote_share <= 1.0:
            raise ValueError(f"min_vote_share must be in [0, 1], got {self.min_vote_share!r}")


@dataclass(frozen=True, kw_only=True)
class ScPOSemiPairs(ScPOPairs):
    """The same settings; rows named `scpo_semi`."""

    rule: ClassVar[str] = "scpo_semi"


def _voting_answer(label: dict) -> str | None:
    """The answer a label voted with (`factory.labelers.vote.voting_answers`): canonical, else as extracted."""
    canonical = label.get("answer_canonical")
    return canonical if canonical is not None else label["answer"]


def scpo_pairs(problems: list[dict], samples: list[dict], labels: list[dict], *, prompt_for: Callable[[str], str],
               iteration: int, config: ScPOPairs, steps: StepData | None = None) -> tuple[list[dict], dict]:
    """ScPO pairs (Prasad et al., 2024): the most-voted answer over the least-voted one, weighted by the margin.

    Reads no gold: only each sample's answer (canonical: equivalent answers
    are one) and vote count (the `vote` labeler's columns of `labels`, computed
    over all k samples of a problem before filtering). A problem is kept if its
    top answer is unique and has at least `config.min_vote_share` of the k
    votes. Chosen: a kept sample with the top answer; rejected: a kept sample
    with the fewest votes among the other answers (no answer counts 0 votes). Weight
    w = (V(chosen) - V(rejected)) / k. Up to `config.pairs_per_problem` least
    similar chosen x rejected pairs per problem.

    >>> samples = [{"sample_id": f"s-{i}", "problem_id": "p-1", "text": t}
    ...            for i, t in enumerate(["5\\n#### 5", "2+3=5\\n#### 5", "6\\n#### 6", "no idea"])]
    >>> labels = [{"sample_id": s["sample_id"], "problem_id": "p-1", "answer": a, "vote_count": v}
    ...           for s, a, v in zip(samples, ["5", "5", "6", None], [2, 2, 1, 0])]
    >>> rows, summary = scpo_pairs([{"problem_id": "p-1", "question": "2+3?"}], samples, labels,
    ...                            prompt_for=lambda q: q, iteration=1, config=ScPOPairs())
    >>> [(r["chosen_sample_id"], r["rejected_sample_id"], r["weight"]) for r in rows]
    [('s-0', 's-3', 0.5), ('s-1', 's-3', 0.5)]
    """
    label_by_id = check_inputs(problems, samples, labels)
    question = {p["problem_id"]: p["question"] for p in problems}
    votes: dict[str, list[tuple[str | None, int]]] = {}
    for label in labels:
        if label.get("vote_count") is None:
            raise ValueError(f"labels of sample {label['sample_id']!r} have no vote_count: "
                             "label with the vote labeler (factory label --labelers vote)")
        votes.setdefault(label["problem_id"], []).append((_voting_answer(label), label["vote_count"]))

    rows: list[dict] = []
    skipped = dict.fromkeys(VOTE_SKIP_REASONS, 0)
    for problem_id, group in group_by_problem(samples).items():
        k = len(votes[problem_id])
        top_votes = max(count for _, count in votes[problem_id])
        leaders = {answer for answer, count in votes[problem_id] if answer is not None and count == top_votes}
        if len(leaders) != 1:
            skipped[TIED_VOTE if len(leaders) > 1 else NO_POSITIVE] += 1
            continue
        if top_votes / k < config.min_vote_share:
            skipped[LOW_CONSISTENCY] += 1
            continue
        (top,) = leaders
        answered = [(s, label_by_id[s["sample_id"]]) for s in group]
        positives = [(s["sample_id"], s["text"]) for s, label in answered if _voting_answer(label) == top]
        others = [(s, label["vote_count"]) for s, label in answered if _voting_answer(label) != top]
        if not positives or not others:
            skipped[NO_POSITIVE if not positives else NO_NEGATIVE] += 1
            continue
        fewest = min(count for _, count in others)
        negatives = [(s["sample_id"], s["text"]) for s, count in others if count == fewest]
        prompt = prompt_for(question[problem_id])
        weight = (top_votes - fewest) / k
        for _, chosen_id, chosen, rejected_id, rejected in least_similar(positives, negatives,
                                                                          config.pairs_per_problem):
            rows.append(pair_row(config, iteration, problem_id, prompt, chosen_id, chosen, rejected_id, rejected,
                                  weight))
    summary = summarize(config, iteration, samples, rows, skipped)
    return rows, summary


def scpo_semi_pairs(problems: list[dict], samples: list[dict], labels: list[dict], *, prompt_for: Callable[[str], str],
                    iteration: int, config: ScPOPairs, steps: StepData | None = None) -> tuple[list[dict], dict]:
    """ScPO semi-supervised: gold pairs (the `dpo_st` rule) where a problem has a gold answer, vote pairs where not.

    One pairs file; gold pairs weigh 1.0, vote pairs their vote margin.
    """
    gold = {p["problem_id"] for p in problems if p.get("gold_answer") is not None}
    labelled = [s for s in samples if s["problem_id"] in gold]
    unlabelled = [s for s in samples if s["problem_id"] not in gold]
    parts = [
        dpo_st_pairs(problems, labelled, labels, prompt_for=prompt_for, iteration=iteration, config=config),
        scpo_pairs(problems, unlabelled, labels, prompt_for=prompt_for, iteration=iteration, config=config),
    ]
    rows = sorted(parts[0][0] + parts[1][0], key=lambda r: r["problem_id"])
    skipped = dict.fromkeys(VOTE_SKIP_REASONS, 0)
    for _, part in parts:
        for reason, count in part["skipped"].items():
            skipped[reason] += count
    summary = summarize(config, iteration, samples, rows, skipped)
    summary["gold_problems_seen"], summary["vote_problems_seen"] = parts[0][1]["problems_seen"], \
        parts[1][1]["problems_seen"]
    summary["gold_pairs"], summary["vote_pairs"] = parts[0][1]["pairs"], parts[1][1]["pairs"]
    return rows, summary

def majority_mostly_right(signals, config: PreconditionsConfig) -> Check:
    """ScPO trains toward the majority answer: on problems with a gold answer, the majority must be mostly right.

    On a split without gold (ScPO's own, `unlabeled`) this cannot be measured, and says so."""
    return at_least(signals, "majority_accuracy_gold", config.min_majority_accuracy,
                    why="the vote's top answer is the chosen side, so it must be right on most gold problems")


SCPO = register(Recipe(
    module=__name__, name="scpo", paper="Prasad et al., 2024", train=train_dpo,
    pairs=PairRule(make=scpo_pairs, settings=ScPOPairs, gold_judged=False),
    needs={"sample.split": "unlabeled"}, setup={"sample.n": 8}, precondition=majority_mostly_right,
    summary="no gold: the most-voted answer over the least-voted, weighted DPO + NLL by the vote margin"))
SCPO_SEMI = register(Recipe(
    module=__name__, name="scpo_semi", paper="Prasad et al., 2024 (semi-supervised)", train=train_dpo,
    pairs=PairRule(make=scpo_semi_pairs, settings=ScPOSemiPairs, gold_judged=True),
    needs={"sample.split": "answers+unlabeled"}, setup={"sample.limit": 250, "sample.n": 8},
    precondition=majority_mostly_right,
    summary="gold pairs where a problem has a gold answer, vote pairs where not; weighted DPO + NLL"))

"""Preference pairs: pure functions from problems, samples and labels to `pairs` rows.

Rows are TRL's explicit-prompt preference format (`prompt`, `chosen`,
`rejected` strings) plus our id columns, so a pairs file trains as it is.
Each recipe is one function with the same signature, registered in `RECIPES`:

    rows, summary = RECIPES[name](problems, samples, labels,
                                  prompt_for=..., iteration=..., config=...)

`make_pairs` picks the function by `config.recipe`. Skipped problems are never
silent: the summary counts them by reason.

`pairs_table` is the same for Arrow tables, Arrow out: the DPO-ST rule
vectorised (similarities in bulk, `factory.filters.similarity`), the other
recipes through their functions above.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.filters.json_rows import json_strings
from factory.filters.similarity import jaccard as bulk_jaccard
from factory.filters.similarity import word_bitsets
from factory.labelers.columnar import as_array, threads
from factory.problems.files import unknown_problem
from factory.ids import ID_PREFIXES, canonical_json, content_id
from factory.schema import PAIRS, from_rows
from factory.steps import prefix_text, split_steps
from factory.text import jaccard, word_set

NO_POSITIVE = "no_positive"  # no correct (or majority) sample and no gold rationale to prefer
NO_NEGATIVE = "no_negative"  # every judged sample is correct (or agrees): nothing to reject
TIED_VOTE = "tied_vote"  # ScPO: two answers share the most votes, so there is no majority
LOW_CONSISTENCY = "low_consistency"  # ScPO: the top answer's vote share is below min_vote_share
NO_MARGIN = "no_margin"  # SIPF: no sample's path reward is eta below a correct sample's
NO_PROCESS_SCORE = "no_process_score"  # SIPF: the PRM scored none of the problem's samples
NO_SIBLINGS = "no_siblings"  # MCTS-DPO: a committed node with fewer than two distinct children
NO_Q_MARGIN = "no_q_margin"  # MCTS-DPO: its best and worst children's Q differ by less than min_q_margin
UNGROUNDED = "ungrounded"  # MCTS-DPO: fewer than two children with min_terminals terminal nodes in their subtree
SKIP_REASONS = (NO_POSITIVE, NO_NEGATIVE)
VOTE_SKIP_REASONS = (NO_POSITIVE, NO_NEGATIVE, TIED_VOTE, LOW_CONSISTENCY)
GOLD = "gold"  # stands for the gold rationale in pair ids (its chosen_sample_id is None)


@dataclass(frozen=True, kw_only=True)
class PairsConfig:
    """How pairs are made; params.yaml `pairs`."""

    # Which pairing rule: a key of RECIPES.
    recipe: str = "dpo_st"
    # Pairs kept per problem. DPO-ST keeps the 3 least similar positive × negative
    # pairs per question (Wang et al., ACL 2024, §3.2).
    pairs_per_problem: int = 3
    # The gold rationale joins the positives when the problem has one (DPO-ST does).
    include_gold: bool = True
    # ScPO's tau: a problem makes vote pairs only if its top answer has at least this share of the k votes.
    min_vote_share: float = 0.5
    # SIPF's eta: chosen's path reward must exceed rejected's by at least this much.
    eta: float = 0.1
    # MCTS-DPO: the best sibling's Q must exceed the worst's by at least this much.
    min_q_margin: float = 0.2
    # MCTS-DPO: siblings whose subtree holds fewer terminal nodes (judged against gold) than this are not paired;
    # 0 is the paper's rule, for a policy whose self-evaluation is informative.
    min_terminals: int = 1

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown pairs recipe {self.recipe!r}; known: {sorted(RECIPES)}")
        if isinstance(self.pairs_per_problem, bool) or not isinstance(self.pairs_per_problem, int) \
                or self.pairs_per_problem < 1:
            raise ValueError(f"pairs_per_problem must be a positive integer, got {self.pairs_per_problem!r}")
        if not 0.0 <= self.min_vote_share <= 1.0:
            raise ValueError(f"min_vote_share must be in [0, 1], got {self.min_vote_share!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if not self.min_q_margin >= 0.0:
            raise ValueError(f"min_q_margin must be >= 0, got {self.min_q_margin!r}")
        if isinstance(self.min_terminals, bool) or not isinstance(self.min_terminals, int) or self.min_terminals < 0:
            raise ValueError(f"min_terminals must be an integer >= 0, got {self.min_terminals!r}")


@dataclass(frozen=True)
class StepData:
    """What the `steps` stage made for an iteration (`factory steps`): the step-level recipes' extra input.

    `samples` are generated continuations (scdpo) or rollouts (sipf_orpo),
    `labels` their labels, `process` the step scores (`factory.labelers.process`),
    `nodes` the search trees (mcts_dpo, `factory.generators.tree`);
    `recipe` is the recipe the stage ran for, when read from its files, and
    `delimiter` the step delimiter it cut steps with (params `steps.delimiter`).
    """

    samples: list[dict] = dataclasses.field(default_factory=list)
    labels: list[dict] = dataclasses.field(default_factory=list)
    process: list[dict] = dataclasses.field(default_factory=list)
    nodes: list[dict] = dataclasses.field(default_factory=list)
    recipe: str | None = None
    delimiter: str = "\n"

    def check_made_for(self, recipe: str) -> None:
        """Refuse step data the `steps` stage made for another recipe (e.g. empty tables for dpo_st)."""
        if self.recipe is not None and self.recipe != recipe:
            raise ValueError(f"pairs recipe {recipe!r} needs step data made for it, but the steps folder was made "
                             f"for recipe {self.recipe!r}: set params recipe: {recipe} (and pairs.recipe: {recipe})")


def check_inputs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    sources: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """The label of each sample, by sample_id, after checking that the three inputs join.

    Every sample needs a known problem and exactly one label; errors name the
    sample and the file (`sources` maps "samples"/"labels"/"problems" to file
    names; an unknown problem is `factory.problems.files.unknown_problem`).
    """
    names = {"samples": "<samples>", "labels": "<labels>", **(sources or {})}
    problem_ids = {p["problem_id"] for p in problems}
    label_by_id: dict[str, dict] = {}
    for label in labels:
        if label["sample_id"] in label_by_id:
            raise ValueError(f"{names['labels']}: sample {label['sample_id']!r} is labelled twice")
        label_by_id[label["sample_id"]] = label
    seen: set[str] = set()
    for index, sample in enumerate(samples):
        sample_id = sample["sample_id"]
        if sample_id in seen:
            raise ValueError(f"{names['samples']}: row {index}: sample {sample_id!r} appears twice")
        seen.add(sample_id)
        if sample["problem_id"] not in problem_ids:
            raise unknown_problem(names["samples"], index, sample["problem_id"], names.get("problems"))
        if sample_id not in label_by_id:
            raise ValueError(f"{names['labels']}: no label for sample {sample_id!r} "
                             f"(row {index} of {names['samples']})")
    return label_by_id


def _least_similar(
    positives: list[tuple[str | None, str]], negatives: list[tuple[str, str]], k: int
) -> list[tuple[float, str | None, str, str, str]]:
    """The k (similarity, chosen_id, chosen, rejected_id, rejected) with the lowest token-set Jaccard.

    Ties fall to the chosen id (gold sorts first, as ""), then the rejected id.
    """
    words = {text: word_set(text) for _, text in positives + negatives}
    scored = [
        (jaccard(words[chosen], words[rejected]), chosen_id, chosen, rejected_id, rejected)
        for (chosen_id, chosen), (rejected_id, rejected) in itertools.product(positives, negatives)
    ]
    scored.sort(key=lambda s: (s[0], s[1] or "", s[3]))
    return scored[:k]


def _pair_row(config: PairsConfig, iteration: int, problem_id: str, prompt: str, chosen_id: str | None,
              chosen: str, rejected_id: str, rejected: str, weight: float) -> dict:
    return {
        "pair_id": content_id("pair", config.recipe, iteration, problem_id, chosen_id or GOLD, rejected_id),
        "problem_id": problem_id,
        "iteration": iteration,
        "recipe": config.recipe,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_sample_id": chosen_id,
        "rejected_sample_id": rejected_id,
        "weight": weight,
        "prefix_steps": None,
        "chosen_node_id": None,
        "rejected_node_id": None,
    }


def _step_pair_row(config: PairsConfig, iteration: int, problem_id: str, prompt: str, chosen: dict, rejected: dict,
                   prefix_steps: int, delimiter: str) -> dict:
    """A pair that shares its first `prefix_steps` steps: they end the prompt, so the loss falls on the rest."""
    chosen_prefix = prefix_text(chosen["text"], prefix_steps, delimiter)
    rejected_prefix = prefix_text(rejected["text"], prefix_steps, delimiter)
    return {
        "pair_id": content_id("pair", config.recipe, iteration, problem_id, chosen["sample_id"],
                              rejected["sample_id"], prefix_steps),
        "problem_id": problem_id,
        "iteration": iteration,
        "recipe": config.recipe,
        "prompt": prompt + chosen_prefix,
        "chosen": chosen["text"][len(chosen_prefix):],
        "rejected": rejected["text"][len(rejected_prefix):],
        "chosen_sample_id": chosen["sample_id"],
        "rejected_sample_id": rejected["sample_id"],
        "weight": 1.0,
        "prefix_steps": prefix_steps,
        "chosen_node_id": None,
        "rejected_node_id": None,
    }


def _summary(config: PairsConfig, iteration: int, samples: list[dict], rows: list[dict],
             skipped: dict[str, int]) -> dict:
    weights = [r["weight"] for r in rows]
    return {
        "recipe": config.recipe,
        "iteration": iteration,
        "problems_seen": len({s["problem_id"] for s in samples}),
        "problems_with_pairs": len({r["problem_id"] for r in rows}),
        "pairs": len(rows),
        "pairs_with_gold": sum(r["chosen_sample_id"] is None and r["chosen_node_id"] is None for r in rows),
        "mean_weight": round(sum(weights) / len(weights), 4) if weights else None,
        "skipped": skipped,
    }


def dpo_st_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
) -> tuple[list[dict], dict]:
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
    for problem_id, group in _group_by_problem(samples).items():
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
        kept = _least_similar(positives, negatives, config.pairs_per_problem)
        for _, chosen_id, chosen, rejected_id, rejected in kept:
            rows.append(_pair_row(config, iteration, problem_id, prompt, chosen_id, chosen, rejected_id, rejected,
                                  1.0))
    summary = _summary(config, iteration, samples, rows, skipped) | {"unjudged_samples": unjudged}
    return rows, summary


def _group_by_problem(samples: list[dict]) -> dict[str, list[dict]]:
    by_problem: dict[str, list[dict]] = {}
    for sample in samples:
        by_problem.setdefault(sample["problem_id"], []).append(sample)
    return {p: sorted(group, key=lambda s: s["sample_id"]) for p, group in sorted(by_problem.items())}


def _voting_answer(label: dict) -> str | None:
    """The answer a label voted with (`factory.labelers.vote.voting_answers`): canonical, else as extracted."""
    canonical = label.get("answer_canonical")
    return canonical if canonical is not None else label["answer"]


def scpo_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
) -> tuple[list[dict], dict]:
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
    ...                            prompt_for=lambda q: q, iteration=1, config=PairsConfig(recipe="scpo"))
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
    for problem_id, group in _group_by_problem(samples).items():
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
        for _, chosen_id, chosen, rejected_id, rejected in _least_similar(positives, negatives,
                                                                          config.pairs_per_problem):
            rows.append(_pair_row(config, iteration, problem_id, prompt, chosen_id, chosen, rejected_id, rejected,
                                  weight))
    summary = _summary(config, iteration, samples, rows, skipped)
    return rows, summary


def scpo_semi_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
) -> tuple[list[dict], dict]:
    """ScPO's semi-supervised setting: gold pairs (the `dpo_st` rule) where a problem has a gold answer, vote pairs where not.

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
    summary = _summary(config, iteration, samples, rows, skipped)
    summary["gold_problems_seen"], summary["vote_problems_seen"] = parts[0][1]["problems_seen"], \
        parts[1][1]["problems_seen"]
    summary["gold_pairs"], summary["vote_pairs"] = parts[0][1]["pairs"], parts[1][1]["pairs"]
    return rows, summary


STEP_CONTROLLED = "step_controlled"  # the generator of SCDPO's continuations (factory.generators.steps)


def _labels_by_id(labels: list[dict], source: str) -> dict[str, dict]:
    by_id = {}
    for index, label in enumerate(labels):
        if label["sample_id"] in by_id:
            raise ValueError(f"{source}: row {index}: sample {label['sample_id']!r} is labelled twice")
        by_id[label["sample_id"]] = label
    return by_id


def scdpo_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
    steps: StepData | None = None,
) -> tuple[list[dict], dict]:
    """Step-controlled DPO pairs (Lu et al., 2024): the naive pairs plus pairs that differ only after step j.

    - naive: the `dpo_st` rule on whole rationales;
    - step-controlled: each wrong continuation in `steps` (generator
      `step_controlled`) against its correct parent; prompt = question + the
      parent's first j steps (`prefix_steps`), chosen = the parent's rest,
      rejected = the continuation's rest;
    - calculator-located: a wrong sample whose calculator check finds its
      first wrong step at j >= 1 against a correct sample of the same problem
      with the same first j steps (no generation needed).

    Identical (prompt, chosen, rejected) step pairs are made once.
    """
    steps = steps or StepData()
    steps.check_made_for(config.recipe)
    delimiter = steps.delimiter
    naive, naive_summary = dpo_st_pairs(problems, samples, labels, prompt_for=prompt_for, iteration=iteration,
                                        config=config)
    label_by_id = _labels_by_id(labels, "labels")
    continuation_labels = _labels_by_id(steps.labels, "step labels")
    sample_by_id = {s["sample_id"]: s for s in samples}
    question = {p["problem_id"]: p["question"] for p in problems}
    counts = {"step_controlled": 0, "calculator_located": 0, "continuations": 0, "continuations_correct": 0,
              "continuations_unjudged": 0, "parent_not_kept": 0, "duplicate": 0}
    rows: list[dict] = []
    seen: set[tuple[str, str, str]] = set()

    def add(row: dict, kind: str) -> None:
        key = (row["prompt"], row["chosen"], row["rejected"])
        if key in seen:
            counts["duplicate"] += 1
            return
        seen.add(key)
        rows.append(row)
        counts[kind] += 1

    for continuation in sorted(steps.samples, key=lambda s: s["sample_id"]):
        if continuation["generator"] != STEP_CONTROLLED:
            continue
        counts["continuations"] += 1
        label = continuation_labels.get(continuation["sample_id"])
        if label is None:
            raise ValueError(f"step labels: no label for continuation {continuation['sample_id']!r}")
        if label["correct"] is not False:
            counts["continuations_correct" if label["correct"] else "continuations_unjudged"] += 1
            continue
        parent = sample_by_id.get(continuation["parent_sample_id"])
        if parent is None or label_by_id[parent["sample_id"]]["correct"] is not True:
            counts["parent_not_kept"] += 1
            continue
        j = continuation["prefix_steps"]
        if split_steps(continuation["text"], delimiter)[:j] != split_steps(parent["text"], delimiter)[:j]:
            raise ValueError(f"step samples: continuation {continuation['sample_id']!r} does not keep the first "
                             f"{j} steps of its parent {parent['sample_id']!r}")
        add(_step_pair_row(config, iteration, parent["problem_id"], prompt_for(question[parent["problem_id"]]),
                           parent, continuation, j, delimiter), "step_controlled")

    # The calculator labeler counts steps as lines, so its first_error_step cuts lines whatever the delimiter.
    for problem_id, group in _group_by_problem(samples).items():
        correct = [(s, split_steps(s["text"])) for s in group if label_by_id[s["sample_id"]]["correct"]]
        for sample in group:
            label = label_by_id[sample["sample_id"]]
            j = label.get("first_error_step")
            if label["correct"] is not False or not j:
                continue
            own = split_steps(sample["text"])[:j]
            match = next((s for s, s_steps in correct if s_steps[:j] == own and len(s_steps) > j), None)
            if match is not None:
                add(_step_pair_row(config, iteration, problem_id, prompt_for(question[problem_id]), match, sample, j,
                                   "\n"), "calculator_located")

    rows = naive + sorted(rows, key=lambda r: (r["problem_id"], r["pair_id"]))
    summary = _summary(config, iteration, samples, rows, naive_summary["skipped"])
    summary |= {"naive_pairs": naive_summary["pairs"], "step_pairs": counts,
                "unjudged_samples": naive_summary["unjudged_samples"]}
    return rows, summary


def sipf_orpo_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
    steps: StepData | None = None,
) -> tuple[list[dict], dict]:
    """Self-iterative process feedback pairs (Chen et al., COLING 2025): a reward margin of at least eta.

    Path rewards are the process reward model's (`steps.process` rows with
    source "prm"). Per problem, chosen is a sample labelled correct, rejected
    any other sample whose path reward is at least `config.eta` lower: a
    wrong one, or a correct one whose steps the PRM finds worse. The
    `config.pairs_per_problem` pairs with the largest margins are kept (ties:
    chosen id, rejected id). The samples are the filtered ones, so the
    calculator-consistency filter has already run when params ask for it.
    """
    steps = steps or StepData()
    steps.check_made_for(config.recipe)
    label_by_id = check_inputs(problems, samples, labels)
    reward = {row["sample_id"]: row["path_reward"] for row in steps.process if row["source"] == "prm"}
    question = {p["problem_id"]: p["question"] for p in problems}
    rows: list[dict] = []
    skipped = dict.fromkeys((NO_POSITIVE, NO_MARGIN, NO_PROCESS_SCORE), 0)
    margins: list[float] = []
    for problem_id, group in _group_by_problem(samples).items():
        scored = [s for s in group if s["sample_id"] in reward and label_by_id[s["sample_id"]]["correct"] is not None]
        if not scored:
            skipped[NO_PROCESS_SCORE] += 1
            continue
        positives = [s for s in scored if label_by_id[s["sample_id"]]["correct"]]
        if not positives:
            skipped[NO_POSITIVE] += 1
            continue
        candidates = sorted(
            ((reward[c["sample_id"]] - reward[r["sample_id"]], c, r) for c in positives for r in scored
             if r is not c and reward[c["sample_id"]] - reward[r["sample_id"]] >= config.eta),
            key=lambda m: (-m[0], m[1]["sample_id"], m[2]["sample_id"]))[: config.pairs_per_problem]
        if not candidates:
            skipped[NO_MARGIN] += 1
            continue
        prompt = prompt_for(question[problem_id])
        for margin, chosen, rejected in candidates:
            margins.append(margin)
            rows.append(_pair_row(config, iteration, problem_id, prompt, chosen["sample_id"], chosen["text"],
                                  rejected["sample_id"], rejected["text"], 1.0))
    summary = _summary(config, iteration, samples, rows, skipped)
    summary["mean_margin"] = round(sum(margins) / len(margins), 4) if margins else None
    summary["rejected_correct"] = sum(label_by_id[r["rejected_sample_id"]]["correct"] is True for r in rows)
    return rows, summary


def mcts_dpo_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
    steps: StepData | None = None,
) -> tuple[list[dict], dict]:
    """Tree-search step pairs (MCTS-DPO, Xie et al., 2024): at each depth, the best and worst sibling.

    For every node on the path each search committed to (`committed`, the
    question included) with two or more visited children whose subtrees hold
    at least `config.min_terminals` terminal nodes (so their Q rests on gold
    outcomes, not on self-evaluation alone): chosen = the child with the
    highest Q, rejected = the one with the lowest (ties: earlier child), kept
    when their Q differs by at least `config.min_q_margin`.
    prompt = question + the node's steps (`prefix_steps` counts them), so the
    loss falls on the diverging step alone. `samples` and `labels` are not
    read: the trees are the data.
    """
    steps = steps or StepData()
    steps.check_made_for(config.recipe)
    question = {p["problem_id"]: p["question"] for p in problems}
    by_id = {node["node_id"]: node for node in steps.nodes}
    children: dict[str, list[dict]] = {}
    for node in steps.nodes:
        if node["parent_node_id"] is not None:
            if node["parent_node_id"] not in by_id:
                raise ValueError(f"step nodes: node {node['node_id']!r} has parent {node['parent_node_id']!r}, "
                                 "which is not in the file")
            children.setdefault(node["parent_node_id"], []).append(node)

    def path(node: dict) -> str:
        parts = []
        while node is not None:
            parts.append(node["step"])
            node = by_id.get(node["parent_node_id"]) if node["parent_node_id"] else None
        return "".join(reversed(parts))

    terminals: dict[str, int] = {}  # terminal nodes in each node's subtree, children before parents
    for node in sorted(steps.nodes, key=lambda n: -n["depth"]):
        terminals[node["node_id"]] = int(node["terminal"]) + sum(terminals[c["node_id"]]
                                                                 for c in children.get(node["node_id"], []))
    rows: list[dict] = []
    skipped = dict.fromkeys((NO_SIBLINGS, UNGROUNDED, NO_Q_MARGIN), 0)
    margins: list[float] = []
    for node in steps.nodes:
        if not node["committed"] or node["terminal"]:
            continue
        visited = sorted((c for c in children.get(node["node_id"], []) if c["q"] is not None),
                         key=lambda c: c["child_index"])
        if len(visited) < 2:
            skipped[NO_SIBLINGS] += 1
            continue
        visited = [c for c in visited if terminals[c["node_id"]] >= config.min_terminals]
        if len(visited) < 2:
            skipped[UNGROUNDED] += 1
            continue
        best = max(visited, key=lambda c: (c["q"], -c["child_index"]))
        worst = min(visited, key=lambda c: (c["q"], c["child_index"]))
        margin = best["q"] - worst["q"]
        if margin < config.min_q_margin or best is worst:
            skipped[NO_Q_MARGIN] += 1
            continue
        if node["problem_id"] not in question:
            raise ValueError(f"step nodes: node {node['node_id']!r} has problem {node['problem_id']!r}, "
                             "which is not in the problems file")
        prefix = path(node)
        margins.append(margin)
        rows.append({
            "pair_id": content_id("pair", config.recipe, iteration, node["problem_id"], best["node_id"],
                                  worst["node_id"]),
            "problem_id": node["problem_id"],
            "iteration": iteration,
            "recipe": config.recipe,
            "prompt": prompt_for(question[node["problem_id"]]) + prefix,
            "chosen": best["step"],
            "rejected": worst["step"],
            "chosen_sample_id": None,
            "rejected_sample_id": None,
            "weight": 1.0,
            "prefix_steps": len(split_steps(prefix)),
            "chosen_node_id": best["node_id"],
            "rejected_node_id": worst["node_id"],
        })
    summary = _summary(config, iteration, samples, rows, skipped)
    summary |= {"trees": len({n["problem_id"] for n in steps.nodes}),
                "mean_q_margin": round(sum(margins) / len(margins), 4) if margins else None,
                "pairs_by_prefix_steps": {str(steps): count for steps, count
                                          in sorted(Counter(r["prefix_steps"] for r in rows).items())},
                "terminal_chosen": sum(by_id[r["chosen_node_id"]]["terminal"] for r in rows),
                "correct_chosen": sum(by_id[r["chosen_node_id"]]["outcome"] == 1 for r in rows),
                "wrong_rejected": sum(by_id[r["rejected_node_id"]]["outcome"] == -1 for r in rows)}
    return rows, summary


Recipe = Callable[..., tuple[list[dict], dict]]
RECIPES: dict[str, Recipe] = {"dpo_st": dpo_st_pairs, "scpo": scpo_pairs, "scpo_semi": scpo_semi_pairs,
                              "scdpo": scdpo_pairs, "sipf_orpo": sipf_orpo_pairs, "mcts_dpo": mcts_dpo_pairs}
# Recipes whose rule reads the `steps` stage's rows.
STEP_RECIPES = ("scdpo", "sipf_orpo", "mcts_dpo")


def recipe_function(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown pairs recipe {name!r}; known: {sorted(RECIPES)}") from None


def make_pairs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
    steps: StepData | None = None,
) -> tuple[list[dict], dict]:
    """Run the recipe `config.recipe` names; see its function for the rule (step recipes also read `steps`)."""
    extra = {"steps": steps} if config.recipe in STEP_RECIPES else {}
    return recipe_function(config.recipe)(
        problems, samples, labels, prompt_for=prompt_for, iteration=iteration, config=config, **extra
    )


def with_recipe(config: PairsConfig, recipe: str | None) -> PairsConfig:
    """`config` with its recipe overridden (a CLI flag), validated."""
    return config if recipe is None else dataclasses.replace(config, recipe=recipe)


def pairs_table(
    problems: pa.Table,
    samples: pa.Table,
    labels: pa.Table,
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
    steps: StepData | None = None,
) -> tuple[pa.Table, dict]:
    """`make_pairs` for Arrow tables: the `pairs` table and the summary, the same rows the recipe gives."""
    if config.recipe == "dpo_st":
        result = _dpo_st_table(problems, samples, labels, prompt_for=prompt_for, iteration=iteration, config=config)
        if result is not None:
            return result
    rows, summary = make_pairs(problems.to_pylist(), samples.to_pylist(), labels.to_pylist(), prompt_for=prompt_for,
                               iteration=iteration, config=config, steps=steps)
    return from_rows(rows, "pairs"), summary


def _dpo_st_table(problems: pa.Table, samples: pa.Table, labels: pa.Table, *, prompt_for: Callable[[str], str],
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
    table = _pair_rows(joined.problem_column(problems, "question"), joined.problem_ids, owner, chosen, rejected,
                       joined.ids, texts, prompt_for=prompt_for, iteration=iteration, config=config)
    weights = table.column("weight").to_pylist()
    summary = {
        "recipe": config.recipe, "iteration": iteration, "problems_seen": joined.n_problems,
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


def _pair_rows(questions: pa.Array, problem_ids: pa.Array, owner: np.ndarray, chosen: np.ndarray,
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
            f"[{canonical_json(config.recipe)},{canonical_json(iteration)},", json_strings(problem_id), ",",
            json_strings(chosen_id.fill_null(GOLD)), ",", json_strings(rejected_id), "]", "")
        pair_id = [ID_PREFIXES["pair"] + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
                   for text in hashed.to_pylist()]
        return pa.table({
            "pair_id": pa.array(pair_id, pa.string()),
            "problem_id": problem_id,
            "iteration": pa.array(np.full(n, iteration), pa.int32()),
            "recipe": pa.array([config.recipe] * n, pa.string()),
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

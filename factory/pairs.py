"""Preference pairs: pure functions from problems, samples and labels to `pairs` rows.

Rows are TRL's explicit-prompt preference format (`prompt`, `chosen`,
`rejected` strings) plus our id columns, so a pairs file trains as it is.
Each recipe is one function with the same signature, registered in `RECIPES`:

    rows, summary = RECIPES[name](problems, samples, labels,
                                  prompt_for=..., iteration=..., config=...)

`make_pairs` picks the function by `config.recipe`. Skipped problems are never
silent: the summary counts them by reason.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from factory.ids import content_id
from factory.text import jaccard, word_set

NO_POSITIVE = "no_positive"  # no correct sample and no gold rationale to prefer
NO_NEGATIVE = "no_negative"  # every judged sample is correct: nothing to reject
SKIP_REASONS = (NO_POSITIVE, NO_NEGATIVE)
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

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown pairs recipe {self.recipe!r}; known: {sorted(RECIPES)}")
        if isinstance(self.pairs_per_problem, bool) or not isinstance(self.pairs_per_problem, int) \
                or self.pairs_per_problem < 1:
            raise ValueError(f"pairs_per_problem must be a positive integer, got {self.pairs_per_problem!r}")


def check_inputs(
    problems: list[dict],
    samples: list[dict],
    labels: list[dict],
    *,
    sources: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """The label of each sample, by sample_id, after checking that the three inputs join.

    Every sample needs a known problem and exactly one label; errors name the
    sample and the file (`sources` maps "samples"/"labels" to file names).
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
            raise ValueError(f"{names['samples']}: row {index}: sample {sample_id!r} has problem "
                             f"{sample['problem_id']!r}, which is not in the problems file")
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
    by_problem: dict[str, list[dict]] = {}
    for sample in samples:
        by_problem.setdefault(sample["problem_id"], []).append(sample)

    rows: list[dict] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    unjudged = 0
    for problem_id in sorted(by_problem):
        problem = problem_by_id[problem_id]
        group = sorted(by_problem[problem_id], key=lambda s: s["sample_id"])
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
            rows.append({
                "pair_id": content_id("pair", config.recipe, iteration, problem_id, chosen_id or GOLD, rejected_id),
                "problem_id": problem_id,
                "iteration": iteration,
                "recipe": config.recipe,
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_sample_id": chosen_id,
                "rejected_sample_id": rejected_id,
                "weight": 1.0,
            })
    summary = {
        "recipe": config.recipe,
        "iteration": iteration,
        "problems_seen": len(by_problem),
        "problems_with_pairs": len({r["problem_id"] for r in rows}),
        "pairs": len(rows),
        "pairs_with_gold": sum(r["chosen_sample_id"] is None for r in rows),
        "unjudged_samples": unjudged,
        "skipped": skipped,
    }
    return rows, summary


Recipe = Callable[..., tuple[list[dict], dict]]
RECIPES: dict[str, Recipe] = {"dpo_st": dpo_st_pairs}


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
) -> tuple[list[dict], dict]:
    """Run the recipe `config.recipe` names; see its function for the rule."""
    return recipe_function(config.recipe)(
        problems, samples, labels, prompt_for=prompt_for, iteration=iteration, config=config
    )


def with_recipe(config: PairsConfig, recipe: str | None) -> PairsConfig:
    """`config` with its recipe overridden (a CLI flag), validated."""
    return config if recipe is None else dataclasses.replace(config, recipe=recipe)

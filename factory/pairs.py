"""What every pair rule shares: the `pairs` row, its id, the inputs' checks, the summary and the stage's dispatch.

A pair rule is a pure function from problems, samples and labels to `pairs`
rows in TRL's explicit-prompt preference format (`prompt`, `chosen`,
`rejected` strings) plus our id columns, so a pairs file trains as it is:

    rows, summary = rule.make(problems, samples, labels, prompt_for=..., iteration=..., config=..., steps=...)

Each rule lives with the recipe that introduced it (`factory.recipes`); its
settings extend `PairsConfig` with a params sub-section of their own
(`pairs.scpo`, ...). Skipped problems are never silent: the summary counts
them by reason.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from factory.ids import content_id
from factory.reasoning_steps import prefix_text
from factory.text import jaccard, word_set

if TYPE_CHECKING:  # pyarrow is imported where tables are made: the registry stays light for the CLI's fast paths
    import pyarrow as pa

    from factory.recipes import PairRule

NO_POSITIVE = "no_positive"  # no correct (or majority) sample and no gold rationale to prefer
NO_NEGATIVE = "no_negative"  # every judged sample is correct (or agrees): nothing to reject
SKIP_REASONS = (NO_POSITIVE, NO_NEGATIVE)
GOLD = "gold"  # stands for the gold rationale in pair ids (its chosen_sample_id is None)


@dataclass(frozen=True, kw_only=True)
class PairsConfig:
    """params.yaml `pairs`: the settings every rule shares. A rule's own settings subclass it.

    `rule` names the rule whose config this is: it is recorded in every row's
    `recipe` column and hashed into the pair ids. `section` is the params
    sub-section holding the rule's own keys (`pairs.<section>`), if it has any.
    """

    rule: ClassVar[str] = "dpo_st"
    section: ClassVar[str | None] = None
    # Pairs kept per problem. DPO-ST keeps the 3 least similar positive × negative
    # pairs per question (Wang et al., ACL 2024, §3.2).
    pairs_per_problem: int = 3
    # The gold rationale joins the positives when the problem has one (DPO-ST does).
    include_gold: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pairs_per_problem, bool) or not isinstance(self.pairs_per_problem, int) \
                or self.pairs_per_problem < 1:
            raise ValueError(f"pairs_per_problem must be a positive integer, got {self.pairs_per_problem!r}")


def rule_settings(cls: type[PairsConfig], pairs_params: Mapping[str, Any] | None, sections: tuple[str, ...], *,
                  where: str) -> PairsConfig:
    """`cls` built from params `pairs`: its shared keys plus its own sub-section (others are left to their rules)."""
    from factory.params import build

    values = dict(pairs_params or {})
    own = {name: values.pop(name) for name in sections if name in values}
    if cls.section is not None:
        values |= own.get(cls.section) or {}
    return build(cls, values, where=where + (f" (with its {cls.section!r} keys)" if cls.section else ""))


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
        """Refuse step data the `steps` stage made for another recipe (a folder passed by hand)."""
        if self.recipe is not None and self.recipe != recipe:
            raise ValueError(f"recipe {recipe!r} needs step data made for it, but the steps folder was made "
                             f"for recipe {self.recipe!r}: re-run `factory steps` with recipe {recipe}")


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
    from factory.problems.files import unknown_problem

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
            raise ValueError(f"{names['samples']}: row {index + 1}: sample {sample_id!r} appears twice")
        seen.add(sample_id)
        if sample["problem_id"] not in problem_ids:
            raise unknown_problem(names["samples"], index, sample["problem_id"], names.get("problems"))
        if sample_id not in label_by_id:
            raise ValueError(f"{names['labels']}: no label for sample {sample_id!r} "
                             f"(row {index + 1} of {names['samples']})")
    return label_by_id


def least_similar(
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


def pair_row(config: PairsConfig, iteration: int, problem_id: str, prompt: str, chosen_id: str | None,
              chosen: str, rejected_id: str, rejected: str, weight: float) -> dict:
    return {
        "pair_id": content_id("pair", config.rule, iteration, problem_id, chosen_id or GOLD, rejected_id),
        "problem_id": problem_id,
        "iteration": iteration,
        "recipe": config.rule,
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


def step_pair_row(config: PairsConfig, iteration: int, problem_id: str, prompt: str, chosen: dict, rejected: dict,
                   prefix_steps: int, delimiter: str) -> dict:
    """A pair that shares its first `prefix_steps` steps: they end the prompt, so the loss falls on the rest."""
    chosen_prefix = prefix_text(chosen["text"], prefix_steps, delimiter)
    rejected_prefix = prefix_text(rejected["text"], prefix_steps, delimiter)
    return {
        "pair_id": content_id("pair", config.rule, iteration, problem_id, chosen["sample_id"],
                              rejected["sample_id"], prefix_steps),
        "problem_id": problem_id,
        "iteration": iteration,
        "recipe": config.rule,
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


def summarize(config: PairsConfig, iteration: int, samples: list[dict], rows: list[dict],
             skipped: dict[str, int]) -> dict:
    weights = [r["weight"] for r in rows]
    return {
        "recipe": config.rule,
        "iteration": iteration,
        "problems_seen": len({s["problem_id"] for s in samples}),
        "problems_with_pairs": len({r["problem_id"] for r in rows}),
        "pairs": len(rows),
        "pairs_with_gold": sum(r["chosen_sample_id"] is None and r["chosen_node_id"] is None for r in rows),
        "mean_weight": round(sum(weights) / len(weights), 4) if weights else None,
        "skipped": skipped,
    }


def group_by_problem(samples: list[dict]) -> dict[str, list[dict]]:
    by_problem: dict[str, list[dict]] = {}
    for sample in samples:
        by_problem.setdefault(sample["problem_id"], []).append(sample)
    return {p: sorted(group, key=lambda s: s["sample_id"]) for p, group in sorted(by_problem.items())}


def no_pairs(recipe: str, iteration: int, samples: list[dict]) -> tuple[pa.Table, dict]:
    """The pairs stage of a recipe that trains on no pairs: an empty table, and a summary that says so."""
    from factory.schema import from_rows

    summary = {"recipe": recipe, "iteration": iteration, "problems_seen": len({s["problem_id"] for s in samples}),
               "problems_with_pairs": 0, "pairs": 0, "pairs_with_gold": 0, "mean_weight": None, "skipped": {},
               "no_pair_rule": True}
    return from_rows([], "pairs"), summary


def pairs_table(
    rule: PairRule,
    problems: pa.Table,
    samples: pa.Table,
    labels: pa.Table,
    *,
    prompt_for: Callable[[str], str],
    iteration: int,
    config: PairsConfig,
    steps: StepData | None = None,
) -> tuple[pa.Table, dict]:
    """The `pairs` table and the summary of `rule` on Arrow tables: its bulk version when it has one."""
    from factory.schema import from_rows

    if rule.bulk is not None:
        result = rule.bulk(problems, samples, labels, prompt_for=prompt_for, iteration=iteration, config=config)
        if result is not None:
            return result
    rows, summary = rule.make(problems.to_pylist(), samples.to_pylist(), labels.to_pylist(), prompt_for=prompt_for,
                              iteration=iteration, config=config, steps=steps or StepData())
    return from_rows(rows, "pairs"), summary

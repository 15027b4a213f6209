"""Step-controlled DPO (Lu et al., 2024): pairs that differ only after step j.

Paper: Zimu Lu et al., "Step-Controlled DPO: Leveraging Stepwise Error for
Enhanced Mathematical Reasoning", 2024.

- Needs: the defaults; the rest of its sampling budget goes to continuations.
- Step data (`steps@k`, `make_steps`): up to `steps.parents_per_problem` (2)
  correct kept samples per problem keep their first j steps (j random in
  [1, n-1] per attempt, or every cut with `steps.cut: each`) and are continued
  at a temperature that rises per generated step, min(1.1 + 0.1 i, 1.4),
  retrying up to `steps.attempts` (4) times until the final answer is wrong
  (at most `steps.negatives_per_problem` per problem). Each continuation is a
  `samples` row with `parent_sample_id`, `prefix_steps`, `step_temperatures`
  (`factory.generators.continuations.step_controlled_negatives`).
- Pairs: the `dpo_st` pairs, plus each wrong continuation against its parent
  with prompt = question + the shared j steps (DPO's loss falls on the steps
  after them), plus, for free, each wrong sample whose calculator check puts
  its first wrong step at j >= 1 against a correct sample with the same first
  j steps. Gold-judged.
- Training: weighted DPO + NLL from the previous model, as `dpo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from factory.pairs import PairsConfig, StepData, group_by_problem, step_pair_row, summarize
from factory.preconditions import Check, PreconditionsConfig, at_least
from factory.recipes.base import PairRule, Recipe, register
from factory.recipes.baselines import train_dpo
from factory.recipes.dpo_st import dpo_st_pairs
from factory.reasoning_steps import split_steps


@dataclass(frozen=True, kw_only=True)
class ScDPOPairs(PairsConfig):
    """params `pairs`, rows named `scdpo` (its naive pairs included)."""

    rule: ClassVar[str] = "scdpo"


def make_steps(inputs):
    """Step-controlled continuations of the correct kept samples, labelled against gold."""
    from factory.generators.continuations import StepsConfig, negatives_in_shards
    from factory.preconditions import step_negative_yield
    from factory.step_stage import generate_and_label

    tables = generate_and_label(inputs, negatives_in_shards, inputs.section("steps", StepsConfig)).tables
    # The precondition: how many wrong continuations (negatives) the parents yielded.
    tables.summary["step_negatives"] = step_negative_yield(tables.samples, tables.labels.column("correct").to_pylist())
    return tables


STEP_CONTROLLED = "step_controlled"  # the generator of SCDPO's continuations (factory.generators.continuations)


def _labels_by_id(labels: list[dict], source: str) -> dict[str, dict]:
    by_id = {}
    for index, label in enumerate(labels):
        if label["sample_id"] in by_id:
            raise ValueError(f"{source}: row {index}: sample {label['sample_id']!r} is labelled twice")
        by_id[label["sample_id"]] = label
    return by_id


def scdpo_pairs(problems: list[dict], samples: list[dict], labels: list[dict], *, prompt_for: Callable[[str], str],
                iteration: int, config: ScDPOPairs, steps: StepData | None = None) -> tuple[list[dict], dict]:
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
    steps.check_made_for(config.rule)
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
        add(step_pair_row(config, iteration, parent["problem_id"], prompt_for(question[parent["problem_id"]]),
                           parent, continuation, j, delimiter), "step_controlled")

    # The calculator labeler counts steps as lines, so its first_error_step cuts lines whatever the delimiter.
    for problem_id, group in group_by_problem(samples).items():
        correct = [(s, split_steps(s["text"])) for s in group if label_by_id[s["sample_id"]]["correct"]]
        for sample in group:
            label = label_by_id[sample["sample_id"]]
            j = label.get("first_error_step")
            if label["correct"] is not False or not j:
                continue
            own = split_steps(sample["text"])[:j]
            match = next((s for s, s_steps in correct if s_steps[:j] == own and len(s_steps) > j), None)
            if match is not None:
                add(step_pair_row(config, iteration, problem_id, prompt_for(question[problem_id]), match, sample, j,
                                   "\n"), "calculator_located")

    rows = naive + sorted(rows, key=lambda r: (r["problem_id"], r["pair_id"]))
    summary = summarize(config, iteration, samples, rows, naive_summary["skipped"])
    summary |= {"naive_pairs": naive_summary["pairs"], "step_pairs": counts,
                "unjudged_samples": naive_summary["unjudged_samples"]}
    return rows, summary

def negatives_found(signals, config: PreconditionsConfig) -> Check:
    """Step-controlled pairs exist only where a continuation of a correct sample goes wrong."""
    return at_least(signals, "step_negative_yield", config.min_negatives_per_parent,
                    why="wrong continuations per parent: too few, and its pairs are DPO-ST's naive ones")


RECIPE = register(Recipe(
    module=__name__, name="scdpo", paper="Lu et al., 2024", train=train_dpo, make_steps=make_steps,
    pairs=PairRule(make=scdpo_pairs, settings=ScDPOPairs, gold_judged=True), precondition=negatives_found,
    summary="DPO on the naive pairs plus step-controlled ones: a correct sample over its continuation "
            "that went wrong after step j"))

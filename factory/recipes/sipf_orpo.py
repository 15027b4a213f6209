"""Self-iterative process feedback with ORPO (Chen et al., COLING 2025): pairs ranked by a process reward model.

Paper: Kai Chen et al., "Self-Iterative Process Feedback for Small Language
Models' Reasoning", COLING 2025.

- Set-up: the filter keeps only calculator-consistent samples
  (`filter.calculator_consistent: true`).
- Step data (`steps@k`, `make_steps`): M = `steps.rollouts` (4) Monte Carlo
  rollouts from every step prefix of up to `steps.rollout_samples` (300) kept
  samples; a step's score is the share of its rollouts that reach the gold
  answer, its label good when above `steps.good_threshold` (0: some rollout
  succeeds). A process reward model (`train/prm.py`: the policy's backbone
  with a token-classification head on each step's delimiter) learns those
  labels, then scores every kept sample's steps; path reward = mean (or min)
  step score. Rollouts, step scores (`process.parquet`) and the PRM (`prm/`)
  are in `data/iter_k/steps/`.
- Pairs: a correct sample over any other whose path reward is at least
  `pairs.sipf_orpo.eta` lower, widest margins first. Gold-judged chosen side,
  but the ranking is the PRM's, so the gold audits do not apply.
- Training: ORPO (`trl.experimental.orpo`, lambda = `orpo.beta` 0.1) from the
  previous model on this iteration's pairs and every earlier iteration's: the
  dataset grows, the earlier files found through the previous model's lineage
  and checked by fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from factory.pairs import NO_POSITIVE, PairsConfig, StepData, check_inputs, group_by_problem, pair_row, summarize
from factory.preconditions import Check, PreconditionsConfig, at_least
from factory.recipes.base import PairRule, Recipe, register

NO_MARGIN = "no_margin"  # no sample's path reward is eta below a correct sample's
NO_PROCESS_SCORE = "no_process_score"  # the PRM scored none of the problem's samples
PRM_DIR = "prm"  # the process reward model, inside the steps folder


@dataclass(frozen=True, kw_only=True)
class SIPFPairs(PairsConfig):
    """params `pairs` plus `pairs.sipf_orpo`."""

    rule: ClassVar[str] = "sipf_orpo"
    section: ClassVar[str | None] = "sipf_orpo"
    # eta: chosen's path reward must exceed rejected's by at least this much.
    eta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")


def make_steps(inputs):
    """Rollouts from every step prefix, their step scores, a PRM trained on them and its scores of every sample."""
    from factory.generators.continuations import StepsConfig, rollouts_in_shards
    from factory.params import as_dict
    from factory.step_stage import generate_and_label, write_generated
    from train.prm import PRMConfig

    steps_config, prm_config = inputs.section("steps", StepsConfig), inputs.section("prm", PRMConfig)
    made = generate_and_label(inputs, rollouts_in_shards, steps_config)
    tables = made.tables
    tables.params["prm"] = as_dict(prm_config)
    # The PRM's lineage fingerprints the rollouts it learns from: they are written before it trains.
    write_generated(RECIPE.name, inputs.out_dir, tables, problems_path=inputs.problems_path,
                    samples_path=inputs.samples_path, labels_path=inputs.labels_path, model_id=inputs.policy_id)
    tables.process, tables.summary["process"] = process_rewards(
        model_dir=inputs.model_dir, problems=made.problems, kept=made.kept, labels=made.labels,
        rollouts=tables.samples, rollout_labels=tables.labels.to_pylist(), steps_config=steps_config,
        prm_config=prm_config, out_dir=inputs.out_dir, policy_id=inputs.policy_id, tokenizer=made.tokenizer)
    return tables


def sipf_orpo_pairs(problems: list[dict], samples: list[dict], labels: list[dict], *, prompt_for: Callable[[str], str],
                    iteration: int, config: SIPFPairs, steps: StepData | None = None) -> tuple[list[dict], dict]:
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
    steps.check_made_for(config.rule)
    label_by_id = check_inputs(problems, samples, labels)
    reward = {row["sample_id"]: row["path_reward"] for row in steps.process if row["source"] == "prm"}
    question = {p["problem_id"]: p["question"] for p in problems}
    rows: list[dict] = []
    skipped = dict.fromkeys((NO_POSITIVE, NO_MARGIN, NO_PROCESS_SCORE), 0)
    margins: list[float] = []
    for problem_id, group in group_by_problem(samples).items():
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
            rows.append(pair_row(config, iteration, problem_id, prompt, chosen["sample_id"], chosen["text"],
                                  rejected["sample_id"], rejected["text"], 1.0))
    summary = summarize(config, iteration, samples, rows, skipped)
    summary["mean_margin"] = round(sum(margins) / len(margins), 4) if margins else None
    summary["rejected_correct"] = sum(label_by_id[r["rejected_sample_id"]]["correct"] is True for r in rows)
    return rows, summary


def process_rewards(*, model_dir, problems, kept, labels, rollouts, rollout_labels, steps_config, prm_config,
                     out_dir: Path, policy_id: str, tokenizer) -> tuple[list, dict]:
    """SIPF's process feedback: rollout step scores, a PRM trained on them, the PRM's scores of every kept sample."""
    import pyarrow as pa

    from factory.labelers.process import error_drop_rate, rollout_scores
    from factory.lineage import model_id, write_model_lineage
    from factory.modeling import format_prompt
    from factory.params import as_dict
    from factory.reasoning_steps import split_steps
    from train.common import outcome
    from train.prm import path_reward, score_steps, train_prm

    scored = rollout_scores(kept, labels, rollouts, rollout_labels, steps_config, model_id=policy_id)
    question = {p["problem_id"]: p["question"] for p in problems}
    text = {s["sample_id"]: s["text"] for s in kept}
    examples = [{"problem_id": row["problem_id"], "prompt": format_prompt(tokenizer, question[row["problem_id"]]),
                 "steps": split_steps(text[row["sample_id"]], steps_config.delimiter),
                 "labels": row["step_labels"], "scores": row["step_scores"]} for row in scored.to_pylist()]
    summary: dict = {"rollout_scored_samples": scored.num_rows,
                     "step_labels": sum(len(e["labels"]) for e in examples),
                     "good_step_share": _share(label for e in examples for label in e["labels"]),
                     "calculator_located_errors": error_drop_rate(scored, pa.Table.from_pylist(labels))}
    if not examples:
        print("steps: no sample could be rolled out; no process reward model", flush=True)
        return [scored], summary
    from factory.step_stage import SAMPLES_FILE

    prm_dir = out_dir / PRM_DIR
    metrics = outcome(train_prm(examples=examples, model_dir=model_dir, out_dir=prm_dir, config=prm_config))
    record = write_model_lineage(prm_dir, stage="prm", parent=policy_id,
                                 data={"rollouts": out_dir / SAMPLES_FILE}, params={"prm": as_dict(prm_config)},
                                 metrics=metrics)
    summary["prm"] = {**metrics, "model_id": record["model_id"]}
    steps = [split_steps(s["text"], steps_config.delimiter) for s in kept]
    judged = [(s, st) for s, st in zip(kept, steps) if st]
    scores = score_steps(str(prm_dir), [format_prompt(tokenizer, question[s["problem_id"]]) for s, _ in judged],
                         [st for _, st in judged])
    from factory.schema import from_rows

    prm_rows = [{"sample_id": s["sample_id"], "problem_id": s["problem_id"], "source": "prm",
                 "step_scores": step_scores, "step_labels": None,
                 "path_reward": path_reward(step_scores, prm_config.aggregate), "n_rollouts": None,
                 "model_id": model_id(prm_dir)} for (s, _), step_scores in zip(judged, scores)]
    summary["prm_scored_samples"] = len(prm_rows)
    return [scored, from_rows(sorted(prm_rows, key=lambda r: r["sample_id"]), "process")], summary


def _share(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None

def earlier_pairs(prev_dir: str) -> list[str]:
    """The pair files the previous model's ORPO steps trained on (the growing dataset), fingerprint-checked."""
    from factory.ids import file_fingerprint
    from factory.lineage import read_model_lineage

    lineage = read_model_lineage(prev_dir) or {}
    if lineage.get("stage") != f"train:{RECIPE.name}":
        return []  # the warm-up, or another recipe's model: the dataset starts here
    files = lineage["params"]["pairs_files"]
    for index, path in enumerate(files):
        if not Path(path).exists():
            raise ValueError(f"{prev_dir}/lineage.json: pairs file {path!r} it trained on is missing")
        if file_fingerprint(path) != lineage["data"][f"pairs_{index}"]:
            raise ValueError(f"{prev_dir}/lineage.json: pairs file {path!r} changed since the model trained on it: "
                             "re-run its iteration (dvc repro)")
    return files


def train(it) -> dict:
    """ORPO from the previous model on this iteration's pairs and every earlier iteration's."""
    from train import iteration as blocks

    return blocks.orpo_model(it, [*earlier_pairs(it.prev_dir), it.pairs_path], it.start())


def prm_beats_majority_class(signals, config: PreconditionsConfig) -> Check:
    """The PRM ranks the pairs: on held-out problems it must beat always guessing the commoner step label."""
    return at_least(signals, "prm_heldout_accuracy", "prm_heldout_baseline", strict=True,
                    why="the threshold is the held-out labels' majority-class share; "
                        "a PRM at or below it ranks pairs by noise")


RECIPE = register(Recipe(
    module=__name__, name="sipf_orpo", paper="Chen et al., COLING 2025", train=train, make_steps=make_steps,
    pairs=PairRule(make=sipf_orpo_pairs, settings=SIPFPairs, gold_judged=False),
    setup={"filter.calculator_consistent": True}, precondition=prm_beats_majority_class,
    summary="ORPO on pairs ranked by a process reward model trained on Monte Carlo rollouts; the data grows"))

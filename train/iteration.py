"""One iteration's training step (`factory train`, the `train@k` stage), for each recipe.

    factory train --recipe dpo_st --iteration 1 --problems data/problems.parquet \
        --prev models/iter_0 --base models/base --pairs data/iter_1/pairs.parquet \
        --samples data/iter_1/samples.parquet --labels data/iter_1/labels.parquet \
        --work data/iter_1/self_train --out models/iter_1

Recipes (params.yaml `recipe`):
- `dpo_st` (Wang et al., ACL 2024): DPO from the previous model on the
  iteration's pairs (`models/iter_k/dpo`), then the self-training step: sample
  `self_train.n` rationales per problem from the DPO model, keep the correct
  ones that survive the filters (near-duplicates included), and SFT the
  **base** model on gold plus those samples.
- `self_train` (the baseline): no DPO. It draws the same second round of
  samples from the previous model, so both recipes spend the same sampling
  budget, and SFTs the base on gold plus the correct filtered samples of both
  rounds.
- `sft` (the gold-only control): more SFT on gold from the previous model, for
  the same number of optimizer steps. A recipe's gain counts only beyond it.
- `scpo` (Prasad et al., 2024): weighted DPO + NLL from the previous model
  (also the reference) on vote pairs; that model is the iteration's model.
  No gold is read and there is no SFT step.
- `scpo_semi`: the same training on ScPO's semi-supervised pairs (gold pairs
  where a problem has a gold answer, vote pairs where not).
- `dpo`: the same training on gold pairs (the `dpo_st` rule): ScPO's supervised
  counterpart (IRPO-style), which tells what the votes cost against gold labels.
- `scdpo` (Lu et al., 2024): the same DPO from the previous model on the naive
  pairs plus the step-controlled ones (`factory steps`, the `scdpo` pair rule).
- `sipf_orpo` (Chen et al., COLING 2025): ORPO from the previous model on the
  PRM-ranked pairs of this iteration and of every earlier one: the dataset
  grows across iterations. Earlier pair files are found through the previous
  model's lineage, and their fingerprints are checked before use.
- `mcts_dpo` (Xie et al., 2024): the same DPO from the previous model on the
  step-level pairs of its search trees (`factory steps`, the `mcts_dpo` pair
  rule): on-policy, iterated.

A recipe that trains on pairs checks that the pairs file was made by its pair
rule (the rows' `recipe`), so `recipe: scpo` on DPO-ST pairs is an error that
says which params to set, not a silent mix.

Every table the step makes (second-round samples, labels, kept, dropped) is
written under `--work`, so each training example traces to its sample row.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from train.sft import SFTRunConfig, dev_problems, gold_examples, train_sft

RECIPES = ("dpo_st", "self_train", "sft", "scpo", "scpo_semi", "dpo", "scdpo", "sipf_orpo", "mcts_dpo")
# The pair rule (params `pairs.recipe`) each pair-trained recipe needs.
PAIR_RULES = {"dpo_st": "dpo_st", "scpo": "scpo", "scpo_semi": "scpo_semi", "dpo": "dpo_st", "scdpo": "scdpo",
              "sipf_orpo": "sipf_orpo", "mcts_dpo": "mcts_dpo"}
# Recipes whose model is the preference-trained model itself: no second round of sampling, no SFT.
DPO_ONLY = ("scpo", "scpo_semi", "dpo", "scdpo", "mcts_dpo")
PREFERENCE_ONLY = (*DPO_ONLY, "sipf_orpo")
# The second round of sampling draws its noise from another stream than `sample@k`
# (otherwise, from the same model, `self_train` would redraw the very same samples).
SECOND_ROUND_SEED_OFFSET = 1_000_003


@dataclass(frozen=True, kw_only=True)
class SelfTrainConfig(SFTRunConfig):
    """params.yaml `self_train`: the second round of sampling and the SFT step of every iteration."""

    n: int = 4  # rationales per problem drawn for the self-training set
    init: str = "base"  # SFT from "base" (DPO-ST: avoids overfitting across iterations) or from "prev"
    steps: int = 800  # optimizer steps of the SFT step, the same for every recipe (equal compute)
    score_every: int = 100  # score dev accuracy every this many steps and keep the best

    def __post_init__(self):
        if self.init not in ("base", "prev"):
            raise ValueError(f"init must be 'base' or 'prev', got {self.init!r}")
        if self.steps < 1 or self.score_every < 1 or self.n < 1:
            raise ValueError("n, steps and score_every must be positive")


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return recipe


def read_pairs_for(recipe: str, pairs_path: str) -> list[dict]:
    """The pairs `recipe` trains on, refusing a file made by another pair rule."""
    from factory.lineage import read_table

    if recipe not in PAIR_RULES:
        return []
    pairs = read_table(pairs_path, "pairs").to_pylist()
    rules = sorted({p["recipe"] for p in pairs})
    if rules and rules != [PAIR_RULES[recipe]]:
        raise ValueError(f"{pairs_path}: recipe {recipe!r} trains on {PAIR_RULES[recipe]!r} pairs, but the file holds "
                         f"{', '.join(repr(r) for r in rules)} pairs: set params pairs.recipe: {PAIR_RULES[recipe]}")
    return pairs


def self_training_examples(problems: list[dict], kept: list[dict], labels: list[dict]) -> list[dict]:
    """Gold rationales plus the kept samples labelled correct, as SFT examples traced to their sample_id."""
    correct = {label["sample_id"] for label in labels if label["correct"] is True}
    question = {p["problem_id"]: p["question"] for p in problems}
    pseudo = [
        {"problem_id": s["problem_id"], "question": question[s["problem_id"]], "rationale": s["text"],
         "sample_id": s["sample_id"]}
        for s in kept
        if s["sample_id"] in correct
    ]
    return [{**g, "sample_id": None} for g in gold_examples(problems)] + pseudo


def _second_round(*, model_dir: Path, problems_path: str, work: Path, sampling, self_train: SelfTrainConfig,
                  iteration: int, first_round: tuple[str, str] | None,
                  filter_config) -> tuple[dict, list[dict], list[dict]]:
    """Sample, label and filter the self-training round under `work`: (counts, kept rows, label rows).

    With `first_round` (samples, labels paths), those rows join the new ones
    before filtering, so near-duplicates are removed across both rounds.
    """
    from factory.filters import run_filters
    from factory.generators.sampling import sample_to_file
    from factory.labelers import label_samples
    from factory.lineage import read_table, write_table
    from factory.params import as_dict
    from factory.shards import shard_dir_for

    config = dataclasses.replace(sampling, n=self_train.n, seed=sampling.seed + SECOND_ROUND_SEED_OFFSET)
    samples_path, labels_path = work / "samples.parquet", work / "labels.parquet"
    # Shards live beside `work`, not in it: DVC clears a stage's outputs before re-running it.
    sample_to_file(model_dir=str(model_dir), problems_path=problems_path, out=str(samples_path), config=config,
                   iteration=iteration, shard_dir=shard_dir_for(work.with_name(work.name + "-samples")))
    problems = read_table(problems_path, "problems")
    samples = read_table(samples_path, "samples")
    labels = label_samples(samples, problems, samples_source=str(samples_path))
    write_table(labels, labels_path, kind="labels", stage="train",
                inputs={"samples": samples_path, "problems": problems_path})
    inputs = {"samples": samples_path, "labels": labels_path}
    if first_round:
        samples = pa.concat_tables([read_table(first_round[0], "samples"), samples])
        labels = pa.concat_tables([read_table(first_round[1], "labels"), labels])
        inputs |= {"first_round_samples": first_round[0], "first_round_labels": first_round[1]}
    kept, dropped, counts = run_filters(samples, labels, filter_config, samples_source=str(samples_path),
                                        labels_source=str(labels_path))
    record = {"filter": as_dict(filter_config), "sample": as_dict(config)}
    write_table(kept, work / "kept.parquet", kind="samples", stage="train", params=record, inputs=inputs)
    write_table(dropped, work / "dropped.parquet", kind="dropped", stage="train", params=record, inputs=inputs)
    return {"sampled": samples.num_rows, "kept": counts["kept"], "filter": counts}, kept.to_pylist(), \
        labels.to_pylist()


DPO_METRICS = ("train_loss", "reward_accuracy", "reward_margin", "pairs", "steps")


def _dpo_only(*, pairs: list[dict], pairs_path: str, prev_dir: str, out: Path, parent: str, recipe: str,
              dpo_config) -> dict:
    """ScPO's step: the weighted DPO + NLL model is the iteration's model (the previous one, unchanged, if no pairs)."""
    from factory.lineage import write_model_lineage
    from factory.params import as_dict

    metrics: dict = {"skipped": "no pairs", "pairs": 0}
    if pairs:
        from train.dpo import main as dpo_main

        dpo = dpo_main(pairs=pairs, model_dir=prev_dir, out_dir=out, config=dpo_config)
        metrics = {k: dpo[k] for k in DPO_METRICS} | {
            "mean_weight": round(sum(p["weight"] for p in pairs) / len(pairs), 4)}
    else:
        from factory.modeling import load_model
        from train.common import save_model_atomically

        save_model_atomically(*load_model(prev_dir), out)
    record = write_model_lineage(out, stage=f"train:{recipe}", parent=parent, data={"pairs": pairs_path},
                                 params={"recipe": recipe, "dpo": as_dict(dpo_config)}, metrics=metrics)
    return {"dpo": {**metrics, "model_id": record["model_id"]}, "model_id": record["model_id"]}


def earlier_pairs(prev_dir: str) -> list[str]:
    """The pair files the previous model's ORPO steps trained on (sipf_orpo's growing dataset), fingerprint-checked."""
    from factory.ids import file_fingerprint
    from factory.lineage import read_model_lineage

    lineage = read_model_lineage(prev_dir) or {}
    if not str(lineage.get("stage", "")).startswith("train:sipf_orpo"):
        return []  # the warm-up, or another recipe's model: the dataset starts here
    files = lineage["params"]["pairs_files"]
    for index, path in enumerate(files):
        if not Path(path).exists():
            raise ValueError(f"{prev_dir}/lineage.json: pairs file {path!r} it trained on is missing")
        if file_fingerprint(path) != lineage["data"][f"pairs_{index}"]:
            raise ValueError(f"{prev_dir}/lineage.json: pairs file {path!r} changed since the model trained on it: "
                             "re-run its iteration (dvc repro)")
    return files


def _orpo_only(*, pairs_path: str, prev_dir: str, out: Path, parent: str, orpo_config) -> dict:
    """SIPF's step: ORPO from the previous model on this iteration's pairs and every earlier iteration's."""
    from factory.lineage import read_table, write_model_lineage
    from factory.params import as_dict
    from train.orpo import main as orpo_main

    files = [*earlier_pairs(prev_dir), pairs_path]
    pairs = [row for path in files for row in read_table(path, "pairs").to_pylist()]
    counts = {"pairs": len(pairs), "pairs_this_iteration": read_table(pairs_path, "pairs").num_rows,
              "pairs_files": len(files)}
    if pairs:
        orpo = orpo_main(pairs=pairs, model_dir=prev_dir, out_dir=out, config=orpo_config)
        metrics = {k: v for k, v in orpo.items() if isinstance(v, (int, float, str)) or v is None} | counts
    else:  # a model too weak to make any pair: the previous model, unchanged, says so
        from factory.modeling import load_model
        from train.common import save_model_atomically

        print(f"train: no sipf_orpo pairs in {pairs_path} or earlier; ORPO skipped", flush=True)
        save_model_atomically(*load_model(prev_dir), out)
        metrics = {"skipped": "no pairs"} | counts
    record = write_model_lineage(out, stage="train:sipf_orpo", parent=parent,
                                 data={f"pairs_{i}": path for i, path in enumerate(files)},
                                 params={"recipe": "sipf_orpo", "orpo": as_dict(orpo_config), "pairs_files": files},
                                 metrics=metrics)
    return {"orpo": {**metrics, "model_id": record["model_id"]}, "model_id": record["model_id"]}


def train_iteration(
    *,
    recipe: str,
    iteration: int,
    problems_path: str,
    prev_dir: str,
    base_dir: str,
    pairs_path: str,
    samples_path: str,
    labels_path: str,
    work: str,
    out_dir: str,
    sampling,
    filter_config,
    dpo_config,
    self_train: SelfTrainConfig,
    orpo_config=None,
) -> dict:
    """Run `recipe`'s training step; the new model lands in `out_dir`. Returns the step's summary."""
    from factory.lineage import model_id, read_table, write_model_lineage
    from factory.params import as_dict

    check_recipe(recipe)
    work_dir, out = Path(work), Path(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)  # a stage output for every recipe, empty for DPO-only ones
    summary: dict = {"recipe": recipe, "iteration": iteration, "prev_model": model_id(prev_dir)}
    data = {"problems": problems_path}

    sample_from = Path(prev_dir)
    pairs = read_pairs_for(recipe, pairs_path)
    if recipe == "sipf_orpo":
        return summary | _orpo_only(pairs_path=pairs_path, prev_dir=prev_dir, out=out, parent=summary["prev_model"],
                                    orpo_config=orpo_config)
    if recipe in PAIR_RULES and not pairs:
        # A model too weak to get any problem right makes no pairs: say so rather than crash.
        print(f"train: {pairs_path} has no pairs; DPO skipped", flush=True)
        summary["dpo"] = {"skipped": "no pairs", "pairs": 0}
    if recipe in DPO_ONLY:
        return summary | _dpo_only(pairs=pairs, pairs_path=pairs_path, prev_dir=prev_dir, out=out,
                                   parent=summary["prev_model"], recipe=recipe, dpo_config=dpo_config)
    if pairs:
        from train.dpo import main as dpo_main

        # Trained beside `out` and moved into `out/dpo` at the end: saving the final model replaces `out`.
        dpo_dir = out.with_name(f".{out.name}.dpo")
        dpo = dpo_main(pairs=pairs, model_dir=prev_dir, out_dir=dpo_dir, config=dpo_config)
        dpo_metrics = {k: dpo[k] for k in DPO_METRICS}
        record = write_model_lineage(dpo_dir, stage="dpo", parent=summary["prev_model"], data={"pairs": pairs_path},
                                     params={"dpo": as_dict(dpo_config)}, metrics=dpo_metrics)
        summary["dpo"] = {**dpo_metrics, "model_id": record["model_id"]}
        data["pairs"] = pairs_path
        sample_from = dpo_dir

    problems = read_table(problems_path, "problems").to_pylist()
    if recipe == "sft":
        examples = gold_examples(problems)
        init = prev_dir
    else:
        first_round = (samples_path, labels_path) if recipe == "self_train" else None
        counts, kept, labels = _second_round(model_dir=sample_from, problems_path=problems_path, work=work_dir,
                                             sampling=sampling, self_train=self_train, iteration=iteration,
                                             first_round=first_round, filter_config=filter_config)
        examples = self_training_examples(problems, kept, labels)
        summary["second_round"] = {**counts, "sampled_from": model_id(sample_from),
                                   "correct_kept": sum(e["sample_id"] is not None for e in examples)}
        data["self_train_examples"] = str(work_dir / "kept.parquet")
        init = base_dir if self_train.init == "base" else prev_dir

    dev = dev_problems(problems, self_train.dev_split)
    sft = train_sft(model_dir=init, examples=examples, dev=dev, out_dir=out, config=self_train,
                    max_steps=self_train.steps, score_every_steps=self_train.score_every)
    if pairs:  # the DPO model stays with the final one, traceable from its lineage
        os.replace(sample_from, out / "dpo")
    summary["sft"] = {k: sft[k] for k in ("best_step", "dev_accuracy", "steps", "examples")} | {
        "init": model_id(init), "curve": sft["curve"]}
    record = write_model_lineage(
        out, stage=f"train:{recipe}", parent=summary["prev_model"], data=data,
        params={"recipe": recipe, "self_train": as_dict(self_train), "dpo": as_dict(dpo_config)},
        metrics={"dev_accuracy": sft["dev_accuracy"], "examples": sft["examples"], "steps": sft["steps"]},
    )
    summary["model_id"] = record["model_id"]
    return summary

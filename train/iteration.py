"""The training blocks recipes compose into one iteration's training step (`factory train`, the `train@k` stage).

    factory train --iteration 1 --problems data/problems.parquet \
        --prev models/iter_0 --base models/base --pairs data/iter_1/pairs.parquet \
        --samples data/iter_1/samples.parquet --labels data/iter_1/labels.parquet \
        --work data/iter_1/self_train --out models/iter_1

The recipe (params `recipe`) owns the composition (`factory.recipes`, its
`train` function); this module offers the blocks and knows no recipe names:

- `read_pairs`: the iteration's pairs, refusing a file another pair rule made;
- `dpo_model`: DPO (+ NLL on chosen) from the previous model, which is also
  the reference, as the iteration's model;
- `dpo_beside`: the same DPO model trained beside the output, to sample from;
- `second_round`: sample, label and filter a second round of rationales from
  a model (optionally pooled with the first round), as SFT examples;
- `sft`: SFT from the base or the previous model on those examples, or on gold;
- `orpo_model`: ORPO from the previous model on one or more pairs files.

Every table a block makes (second-round samples, labels, kept, dropped) is
written under `--work`, so each training example traces to its sample row;
every model gets its lineage record.

Under `accelerate launch` every process runs the recipe: the trainers train
together, and what writes files (lineage, the second round, moving the DPO
model) runs on the main process alone, handing its result to the others
(`train.common.on_main_process`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from factory.lineage import model_id, read_table, write_model_lineage, write_table
from factory.params import as_dict
from train.common import on_main_process, outcome
from train.sft import SFTRunConfig, dev_problems, gold_examples, train_sft

# The second round of sampling draws its noise from another stream than `sample@k`
# (otherwise, from the same model, `self_train` would redraw the very same samples).
SECOND_ROUND_SEED_OFFSET = 1_000_003


@dataclass(frozen=True, kw_only=True)
class SelfTrainConfig(SFTRunConfig):
    """params.yaml `self_train`: the second round of sampling and the SFT step of every iteration."""
    n: int = 4  # rationales per problem drawn for the self-training set
    init: str = "base"  # SFT from "base" (DPO-ST: avoids overfitting across iterations) or from "prev"
    max_steps: int = 1000  # optimizer steps of the SFT step, the same for every recipe (equal compute)
    score_every: int = 250  # score dev accuracy every this many steps and keep the best

    def __post_init__(self):
        if self.init not in ("base", "prev"):
            raise ValueError(f"init must be 'base' or 'prev', got {self.init!r}")
        if self.max_steps < 1 or self.score_every < 1 or self.n < 1:
            raise ValueError("n, max_steps and score_every must be positive")


DPO_METRICS = ("train_loss", "reward_accuracy", "reward_margin", "pairs", "steps")


@dataclass(frozen=True, kw_only=True)
class Iteration:
    """What one iteration's training step reads and writes, and the params sections it trains with."""
    recipe: str
    iteration: int
    problems_path: str
    prev_dir: str
    base_dir: str
    pairs_path: str
    samples_path: str
    labels_path: str
    work: Path
    out: Path
    sampling: Any
    filter_config: Any
    dpo_config: Any
    self_train: SelfTrainConfig
    orpo_config: Any
    pair_rule: str | None = None  # the rule whose pairs the recipe trains on
    executor: Any = None  # where the second round's shards run (params `executor`; None: this process)

    def start(self) -> dict:
        """The summary's head; the work folder is a stage output for every recipe (empty for most)."""
        self.work.mkdir(parents=True, exist_ok=True)
        return {"recipe": self.recipe, "iteration": self.iteration, "prev_model": model_id(self.prev_dir)}

    def problems(self) -> list[dict]:
        return read_table(self.problems_path, "problems").to_pylist()


def read_pairs(it: Iteration, path: str | None = None) -> list[dict]:
    """The pairs in `path` (default: the iteration's), refusing rows another pair rule made."""
    path = path or it.pairs_path
    pairs = read_table(path, "pairs").to_pylist()
    rules = sorted({p["recipe"] for p in pairs})
    if rules and rules != [it.pair_rule]:
        raise ValueError(f"{path}: recipe {it.recipe!r} trains on {it.pair_rule!r} pairs, but the file holds "
                         f"{', '.join(repr(r) for r in rules)} pairs: re-run its pairs stage with recipe: {it.recipe}")
    return pairs


def _keep_previous(it: Iteration, what: str) -> None:
    """A model too weak to make any pair: the previous model, unchanged, is the iteration's, and says so."""
    from factory.modeling import load_model
    from train.common import save_model_atomically

    def keep():
        print(f"train: no pairs in {what}; {it.recipe} keeps the previous model", flush=True)
        save_model_atomically(*load_model(it.prev_dir), it.out)

    on_main_process(keep)


def dpo_model(it: Iteration, pairs: list[dict], summary: dict) -> dict:
    """The weighted DPO + NLL model from the previous one is the iteration's model (ScPO's step)."""
    metrics: dict = {"skipped": "no pairs", "pairs": 0}
    if pairs:
        from train.dpo import main as dpo_main

        dpo = dpo_main(pairs=pairs, model_dir=it.prev_dir, out_dir=it.out, config=it.dpo_config)
        metrics = {k: dpo[k] for k in DPO_METRICS} | {
            "mean_weight": round(sum(p["weight"] for p in pairs) / len(pairs), 4)}
    else:
        _keep_previous(it, it.pairs_path)
    record = on_main_process(lambda: write_model_lineage(
        it.out, stage=f"train:{it.recipe}", parent=summary["prev_model"], data={"pairs": it.pairs_path},
        params={"recipe": it.recipe, "dpo": as_dict(it.dpo_config)}, metrics=metrics))
    return summary | {"dpo": {**metrics, "model_id": record["model_id"]}, "model_id": record["model_id"]}


def dpo_beside(it: Iteration, pairs: list[dict], summary: dict) -> Path | None:
    """DPO from the previous model, trained beside the output (it moves into `out/dpo` at the end); None without pairs."""
    if not pairs:
        print(f"train: {it.pairs_path} has no pairs; DPO skipped", flush=True)
        summary["dpo"] = {"skipped": "no pairs", "pairs": 0}
        return None
    from train.dpo import main as dpo_main

    dpo_dir = it.out.with_name(f".{it.out.name}.dpo")
    # keep_finished: a rerun of the stage killed after this DPO (second round, SFT) does not train it again.
    dpo = dpo_main(pairs=pairs, model_dir=it.prev_dir, out_dir=dpo_dir, config=it.dpo_config, keep_finished=True)
    metrics = {k: dpo[k] for k in DPO_METRICS}
    record = on_main_process(lambda: write_model_lineage(
        dpo_dir, stage="dpo", parent=summary["prev_model"], data={"pairs": it.pairs_path},
        params={"dpo": as_dict(it.dpo_config)}, metrics=metrics))
    summary["dpo"] = {**metrics, "model_id": record["model_id"]}
    return dpo_dir


def second_round(it: Iteration, model_dir: str | Path, summary: dict, *, pool_first_round: bool) -> list[dict]:
    """Gold plus the correct filtered rationales of a second round sampled from `model_dir`, as SFT examples.

    With `pool_first_round`, the iteration's first-round samples join before
    filtering, so near-duplicates are removed across both rounds.
    """
    first_round = (it.samples_path, it.labels_path) if pool_first_round else None
    # Under `accelerate launch`, sampled by the main process (or its executor's workers) while the others wait.
    counts, kept, labels = on_main_process(lambda: _second_round(
        model_dir=Path(model_dir), problems_path=it.problems_path, work=it.work, sampling=it.sampling,
        self_train=it.self_train, iteration=it.iteration, first_round=first_round, filter_config=it.filter_config,
        executor=it.executor))
    examples = self_training_examples(it.problems(), kept, labels)
    summary["second_round"] = {**counts, "sampled_from": model_id(model_dir),
                               "correct_kept": sum(e["sample_id"] is not None for e in examples)}
    return examples


def gold(it: Iteration) -> list[dict]:
    """The gold rationales as SFT examples (the gold-only control's data)."""
    return gold_examples(it.problems())


def sft(it: Iteration, examples: list[dict], summary: dict, *, init: str, dpo_dir: Path | None = None) -> dict:
    """SFT from `init` ("base", "prev" or a folder) on `examples`: the iteration's model, with its lineage.

    A DPO model trained beside the output (`dpo_beside`) moves into `out/dpo`, traceable from the lineage.
    """
    init_dir = {"base": it.base_dir, "prev": it.prev_dir}.get(init, init)
    config = it.self_train
    dev = dev_problems(it.problems(), config.dev_split)
    result = train_sft(model_dir=init_dir, examples=examples, dev=dev, out_dir=it.out, config=config,
                       max_steps=config.max_steps, score_every_steps=config.score_every)
    data = {"problems": it.problems_path}
    if dpo_dir is not None:
        data["pairs"] = it.pairs_path
    if "second_round" in summary:
        data["self_train_examples"] = str(it.work / "kept.parquet")
    summary["sft"] = {k: result[k] for k in ("best_step", "dev_accuracy", "steps", "examples")} | {
        "init": model_id(init_dir), "curve": result["curve"]}

    def record_model() -> dict:
        if dpo_dir is not None:
            os.replace(dpo_dir, it.out / "dpo")
            from train.common import checkpoint_root

            shutil.rmtree(checkpoint_root(dpo_dir), ignore_errors=True)  # dpo_beside's record of its finished model
        return write_model_lineage(
            it.out, stage=f"train:{it.recipe}", parent=summary["prev_model"], data=data,
            params={"recipe": it.recipe, "self_train": as_dict(config), "dpo": as_dict(it.dpo_config)},
            metrics={"dev_accuracy": result["dev_accuracy"], "examples": result["examples"],
                     "steps": result["steps"]})

    record = on_main_process(record_model)
    return summary | {"model_id": record["model_id"]}


def orpo_model(it: Iteration, pairs_files: list[str], summary: dict) -> dict:
    """ORPO from the previous model on the pairs of every file in `pairs_files` (the last: this iteration's)."""
    pairs = [row for path in pairs_files for row in read_pairs(it, path)]
    counts = {"pairs": len(pairs), "pairs_this_iteration": read_table(it.pairs_path, "pairs").num_rows,
              "pairs_files": len(pairs_files)}
    if pairs:
        from train.orpo import main as orpo_main

        orpo = orpo_main(pairs=pairs, model_dir=it.prev_dir, out_dir=it.out, config=it.orpo_config)
        metrics = {k: v for k, v in outcome(orpo).items() if isinstance(v, (int, float, str)) or v is None} | counts
    else:
        _keep_previous(it, f"{it.pairs_path} or earlier")
        metrics = {"skipped": "no pairs"} | counts
    record = on_main_process(lambda: write_model_lineage(
        it.out, stage=f"train:{it.recipe}", parent=summary["prev_model"],
        data={f"pairs_{i}": path for i, path in enumerate(pairs_files)},
        params={"recipe": it.recipe, "orpo": as_dict(it.orpo_config), "pairs_files": pairs_files}, metrics=metrics))
    return summary | {"orpo": {**metrics, "model_id": record["model_id"]}, "model_id": record["model_id"]}


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
                  iteration: int, first_round: tuple[str, str] | None, filter_config,
                  executor=None) -> tuple[dict, list[dict], list[dict]]:
    """Sample, label and filter the self-training round under `work`: (counts, kept rows, label rows).

    With `first_round` (samples, labels paths), those rows join the new ones
    before filtering, so near-duplicates are removed across both rounds.
    """
    from factory.filters import run_filters
    from factory.generators.sampling import sample_to_file
    from factory.labelers import label_samples
    from factory.shards import shard_dir_for

    config = dataclasses.replace(sampling, n=self_train.n, seed=sampling.seed + SECOND_ROUND_SEED_OFFSET)
    samples_path, labels_path = work / "samples.parquet", work / "labels.parquet"
    # Shards live beside `work`, not in it: DVC clears a stage's outputs before re-running it.
    sample_to_file(model_dir=str(model_dir), problems_path=problems_path, out=str(samples_path), config=config,
                   iteration=iteration, shard_dir=shard_dir_for(work.with_name(work.name + "-samples")),
                   executor=executor)
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

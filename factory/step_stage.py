"""The `steps` stage (`factory steps`): the step-level data a recipe needs, between filter and pairs.

    factory steps --model models/iter_0 --problems data/problems.parquet \
        --samples data/iter_1/kept.parquet --labels data/iter_1/labels.parquet --iteration 1 \
        --out data/iter_1/steps

The recipe (params `recipe`) makes the data with its `make_steps`
(`factory.recipes`); this module gives every maker its inputs and writes the
same four tables for every recipe, empty for those without step data, so the
pipeline has one shape:

- `samples.parquet`: generated rows (continuations, rollouts), ordinary
  `samples` rows with `parent_sample_id` and `prefix_steps`, so the audit's SQL
  sees them beside the samples they came from; `labels.parquet`: their labels;
- `process.parquet`: step scores; `nodes.parquet`: search-tree nodes;
- anything else the maker keeps in the folder (a process reward model in `prm/`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

SAMPLES_FILE, LABELS_FILE, PROCESS_FILE, NODES_FILE = "samples.parquet", "labels.parquet", "process.parquet", \
    "nodes.parquet"


@dataclass(frozen=True, kw_only=True)
class StepInputs:
    """What a recipe's step maker reads: the sampling model, the iteration's tables and the params."""

    model_dir: str
    policy_id: str  # the sampling model's id (hashed once)
    problems_path: str
    samples_path: str
    labels_path: str
    iteration: int
    out_dir: Path
    params: dict  # the iteration's view of params.yaml
    params_path: str

    def section(self, name: str, cls: type) -> Any:
        from factory.params import section

        return section(self.params, name, cls, path=self.params_path)


@dataclass(kw_only=True)
class StepTables:
    """What a step maker made: rows of the stage's tables, the params it used and its summary."""

    samples: list[dict] = dataclasses.field(default_factory=list)
    labels: pa.Table | None = None
    process: list[pa.Table] = dataclasses.field(default_factory=list)
    nodes: list[dict] = dataclasses.field(default_factory=list)
    params: dict = dataclasses.field(default_factory=dict)
    summary: dict = dataclasses.field(default_factory=dict)
    generated_written: bool = False  # `write_generated` already wrote samples and labels (once: their bytes stay)


@dataclass(frozen=True, kw_only=True)
class GeneratedRows:
    """Generated `samples` rows and their gold labels, with what made them (for makers that go on from there)."""

    tables: StepTables
    problems: list[dict]
    kept: list[dict]
    labels: list[dict]
    tokenizer: Any


@dataclass(frozen=True)
class StepShards:
    """How a step maker runs its generation: in checkpointed shards (a killed run resumes), where params
    `executor` says, each worker loading the sampling model once (`factory.shards.run_in_shards`)."""

    inputs: StepInputs

    def run(self, items: list, work: Callable, *, shard_size: int, key: Any, desc: str,
            kind: str | None = "samples") -> list[dict]:
        """Rows (a table of `kind`) of `work((model, tokenizer), shard)` over `items`; `key`: what else defines
        them."""
        from factory.executor import ExecutorConfig, worker_path
        from factory.ids import content_hash, file_fingerprint
        from factory.modeling import load_model
        from factory.shards import run_in_shards, shard_dir_for

        it = self.inputs
        tables = [file_fingerprint(path) for path in (it.problems_path, it.samples_path, it.labels_path)]
        return run_in_shards(items, work, load=partial(load_model, worker_path(it.model_dir)),
                             executor=it.section("executor", ExecutorConfig), shard_size=shard_size,
                             shard_dir=shard_dir_for(it.out_dir), kind=kind, desc=desc,
                             fingerprint=content_hash(it.policy_id, tables, it.iteration, key, shard_size))


def generate_and_label(inputs: StepInputs, make: Callable[..., list[dict]], config) -> GeneratedRows:
    """Run a generator over the iteration's kept samples (`make(shards, tokenizer, problems, kept, labels, config,
    model_id=, iteration=)`, its work in `StepShards`), then label what it made against gold."""
    from factory.labelers import label_samples
    from factory.lineage import read_table
    from factory.modeling import load_tokenizer
    from factory.params import as_dict
    from factory.schema import from_rows

    problems_table = read_table(inputs.problems_path, "problems")
    problems, kept = problems_table.to_pylist(), read_table(inputs.samples_path, "samples").to_pylist()
    labels = read_table(inputs.labels_path, "labels").to_pylist()
    tokenizer = load_tokenizer(inputs.model_dir)
    generated = make(StepShards(inputs), tokenizer, problems, kept, labels, config, model_id=inputs.policy_id,
                     iteration=inputs.iteration)
    generated_labels = label_samples(from_rows(generated, "samples"), problems_table,
                                     samples_source=str(inputs.out_dir / SAMPLES_FILE), labelers=("gold",))
    summary = {"generated": {"rows": len(generated), "tokens": sum(row["n_tokens"] for row in generated),
                             "correct": sum(c is True for c in generated_labels.column("correct").to_pylist()),
                             "parents": len({row["parent_sample_id"] for row in generated})}}
    tables = StepTables(samples=generated, labels=generated_labels, params={"steps": as_dict(config)},
                        summary=summary)
    return GeneratedRows(tables=tables, problems=problems, kept=kept, labels=labels, tokenizer=tokenizer)


def write_generated(recipe: str, out_dir: Path, made: StepTables, *, problems_path: str, samples_path: str,
                    labels_path: str, model_id: str | None) -> None:
    """Write the generated rows and their labels (a maker that goes on to train on them writes them first: once,
    so the file a lineage fingerprints is the file that stays)."""
    from factory.lineage import write_table
    from factory.schema import from_rows

    params = {"recipe": recipe} | made.params
    write_table(from_rows(made.samples, "samples"), out_dir / SAMPLES_FILE, kind="samples", stage="steps",
                params=params, inputs={"problems": problems_path, "samples": samples_path, "labels": labels_path},
                model_id=model_id)
    labels_table = made.labels if made.samples else from_rows([], "labels")
    write_table(labels_table, out_dir / LABELS_FILE, kind="labels", stage="steps", params=params,
                inputs={"samples": out_dir / SAMPLES_FILE, "problems": problems_path})
    made.generated_written = True


def run_steps(*, recipe, model_dir: str, problems_path: str, samples_path: str, labels_path: str, iteration: int,
              out: str, params: dict, params_path: str) -> dict:
    """Write `recipe`'s step-level tables into `out` (empty ones when it has no maker); returns the summary."""
    from factory.lineage import model_id, write_table
    from factory.schema import from_rows
    from factory.shards import clear_shards, shard_dir_for

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"problems": problems_path, "samples": samples_path, "labels": labels_path}
    made, mid = StepTables(), None
    if recipe.make_steps is not None:
        mid = model_id(model_dir)  # hashes the weights: once
        made = recipe.make_steps(StepInputs(model_dir=model_dir, policy_id=mid, problems_path=problems_path,
                                            samples_path=samples_path, labels_path=labels_path, iteration=iteration,
                                            out_dir=out_dir, params=params, params_path=params_path))
    params_record = {"recipe": recipe.name} | made.params
    if not made.generated_written:
        write_generated(recipe.name, out_dir, made, problems_path=problems_path, samples_path=samples_path,
                        labels_path=labels_path, model_id=mid)
    process_table = pa.concat_tables(made.process) if made.process else from_rows([], "process")
    write_table(process_table, out_dir / PROCESS_FILE, kind="process", stage="steps", params=params_record,
                inputs=inputs | {"rollouts": out_dir / SAMPLES_FILE})
    write_table(from_rows(made.nodes, "nodes"), out_dir / NODES_FILE, kind="nodes", stage="steps",
                params=params_record, inputs={"problems": problems_path, "labels": labels_path}, model_id=mid)
    clear_shards(shard_dir_for(out_dir))
    return {"recipe": recipe.name, "iteration": iteration} | made.summary


def read_step_data(steps_dir: str | None):
    """The `steps` stage's tables as `factory.pairs.StepData` (empty when no folder is given)."""
    from factory.lineage import read_provenance, read_table
    from factory.pairs import StepData

    if not steps_dir:
        return StepData()
    folder = Path(steps_dir)
    params = read_provenance(folder / SAMPLES_FILE)["params"]
    nodes = read_table(folder / NODES_FILE, "nodes").to_pylist() if (folder / NODES_FILE).exists() else []
    return StepData(samples=read_table(folder / SAMPLES_FILE, "samples").to_pylist(),
                    labels=read_table(folder / LABELS_FILE, "labels").to_pylist(),
                    process=read_table(folder / PROCESS_FILE, "process").to_pylist(), nodes=nodes,
                    recipe=params["recipe"], delimiter=params.get("steps", {}).get("delimiter", "\n"))

"""Where a generating stage's shards run (params.yaml `executor`): this process, or actors of Ray Data.

Every generating stage cuts its work into the same fixed shards either way
(`factory.shards.run_in_shards`), and a shard's rows depend only on its own
items (per-row seeds, `factory.generators.decoding`), so where a shard runs
changes no byte of the output. With `kind: ray`, each shard is one batch of a
Ray Data `map_batches` over an actor pool: every actor loads the model once and
makes the rows of the shards it is given; the rows come back to this process,
which checkpoints each shard as it arrives and writes the table in shard order
with the one lineage writer. The settings are kept out of every provenance
record and out of the params DVC tracks per stage, as batch sizes are.

Ray is imported only when a stage runs with `kind: ray` (pip install 'factory[ray]').
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.lineage import CODE_PACKAGES

KINDS = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class ExecutorConfig:
    """Where the shards of `sample`, `steps`, `eval` and the second round of `train` run (params.yaml `executor`)."""

    kind: str = "local"  # local: this process | ray: Ray Data actors, one model each
    workers: int = 2  # actors; a local Ray (no address) gets this many CPUs
    address: str = ""  # a Ray cluster to join ("": $RAY_ADDRESS if set, else start a local Ray)
    gpus_per_worker: float = 0.0  # GPUs Ray gives each actor (1 on a GPU machine; 0 on CPU)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"executor.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"executor.workers must be an integer >= 1, got {self.workers!r}")
        if not self.gpus_per_worker >= 0:
            raise ValueError(f"executor.gpus_per_worker must be >= 0, got {self.gpus_per_worker!r}")


Load = Callable[[], Any]
Work = Callable[[Any, Sequence], list[dict]]


def map_shards(pending: list[tuple[int, Sequence]], load: Load, work: Work,
               config: ExecutorConfig) -> Iterator[tuple[int, list[dict]]]:
    """(index, rows) of every pending (index, items) shard, as each is done: `work(load(), items)`.

    `load` (the model) runs once per worker, and only when a shard is left to make.
    """
    if not pending:
        return
    if config.kind == "local":
        loaded = load()
        for index, items in pending:
            yield index, work(loaded, items)
        return
    yield from _on_ray(pending, load, work, config)


def worker_path(path: str | Path) -> str:
    """`path` as a worker on another node finds it on a shared filesystem: absolute when it is a local file or
    folder (a model folder), as given otherwise (a Hub id)."""
    return str(Path(path).absolute()) if Path(path).exists() else str(path)


def connect(config: ExecutorConfig) -> None:
    """Join the cluster at `executor.address` or $RAY_ADDRESS, else start a local Ray with `workers` CPUs.

    The workers import this process's own factory and train packages (shipped as `py_modules`), so a
    cluster's nodes run the code the stage records in its outputs. A Ray this process already started
    (a test's, a notebook's) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return
    root = Path(__file__).resolve().parent.parent
    code = {"py_modules": [str(root / package) for package in CODE_PACKAGES]}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=code)
    else:
        ray.init(num_cpus=config.workers, include_dashboard=False, runtime_env=code)


class ShardWorker:
    """A Ray Data actor: loads the model once, then makes the rows of one shard per batch.

    Shards and rows travel pickled, so no value changes type on the way through Arrow blocks.
    """

    def __init__(self, load: Load, work: Work) -> None:
        self.loaded, self.work = load(), work

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [pickle.dumps(self.work(self.loaded, pickle.loads(items))) for items in batch["items"]]
        # What this worker imported: its code counts in the output's code version, as the driver's does.
        modules = sorted(name for name in sys.modules if name.split(".")[0] in CODE_PACKAGES)
        return {"index": batch["index"], "rows": np.array(rows, dtype=object),
                "modules": np.array([pickle.dumps(modules)] * len(rows), dtype=object)}


def _on_ray(pending: list[tuple[int, Sequence]], load: Load, work: Work,
            config: ExecutorConfig) -> Iterator[tuple[int, list[dict]]]:
    import ray

    connect(config)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage's own bar counts shards
    shards = ray.data.from_items([{"index": index, "items": pickle.dumps(list(items))} for index, items in pending],
                                 override_num_blocks=len(pending))
    # One shard in flight per actor: a free actor takes the next shard (no queue behind a slow one), and
    # each shard comes back, to be checkpointed, as soon as it is done.
    pool = ray.data.ActorPoolStrategy(size=min(config.workers, len(pending)), max_tasks_in_flight_per_actor=1)
    done = shards.map_batches(ShardWorker, fn_constructor_args=(load, work), batch_size=1, compute=pool,
                              num_cpus=1, num_gpus=config.gpus_per_worker or None)
    ran: set[str] = set()
    for batch in done.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):  # as they finish
        for index, rows, modules in zip(batch["index"], batch["rows"], batch["modules"]):
            ran.update(pickle.loads(modules))
            yield int(index), pickle.loads(rows)
    for name in sorted(ran - set(sys.modules)):  # so the output's code_version counts the code the workers ran
        importlib.import_module(name)

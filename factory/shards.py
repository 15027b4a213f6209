"""Long jobs in checkpointed shards: a crash loses at most one shard, and resuming adds no duplicates.

Work items are cut into fixed shards; each finished shard is written atomically
as `shard-NNNNN.parquet` under a shard folder that also holds the job's
fingerprint. A restarted job with the same fingerprint reads the finished
shards back and computes only the rest; a different fingerprint (other params,
other model) starts clean. Because shards are fixed and every row depends only
on its own request, the resumed result is identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from factory.io import atomic_path, write_text
from factory.schema import from_rows

T = TypeVar("T")
_MANIFEST = "manifest.json"


def shard_dir_for(out: str | Path) -> Path:
    """Where the shards of output `out` are kept while the job runs (`.NAME.shards` beside it)."""
    out = Path(out)
    return out.with_name(f".{out.name}.shards")


def _prepare(shard_dir: Path, fingerprint: str) -> None:
    manifest = shard_dir / _MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
        shutil.rmtree(shard_dir)  # shards of another job: never mix them in
    shard_dir.mkdir(parents=True, exist_ok=True)
    for leftover in shard_dir.glob(".*tmp-*"):  # a shard being written when the job was killed
        leftover.unlink()
    write_text(manifest, json.dumps({"fingerprint": fingerprint}) + "\n")


def run_in_shards(
    items: Sequence[T],
    work: Callable[[Sequence[T]], list[dict]],
    *,
    shard_size: int,
    shard_dir: Path,
    fingerprint: str,
    kind: str,
    desc: str = "shards",
) -> list[dict]:
    """Rows of `work` over `items`, shard by shard, resuming from finished shards in `shard_dir`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    _prepare(shard_dir, fingerprint)
    starts = range(0, len(items), shard_size)
    rows: list[dict] = []
    resumed = 0
    for index, start in enumerate(tqdm(starts, desc=desc, unit="shard")):
        path = shard_dir / f"shard-{index:05d}.parquet"
        if path.exists():
            rows.extend(pq.read_table(path).to_pylist())
            resumed += 1
            continue
        table = from_rows(work(items[start : start + shard_size]), kind, source=str(path))
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        rows.extend(table.to_pylist())  # the same rows a resumed run reads back
    if resumed:
        print(f"{desc}: resumed {resumed} of {len(starts)} shards from {shard_dir}", flush=True)
    return rows


def clear_shards(shard_dir: Path) -> None:
    """Remove a finished job's shards once its output is safely written."""
    if shard_dir.exists():
        shutil.rmtree(shard_dir)

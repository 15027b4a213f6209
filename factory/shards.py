"""Long jobs in checkpointed shards: a crash loses at most one shard, and resuming adds no duplicates.

Work items are cut into fixed shards; each finished shard is written atomically
as `shard-NNNNN.parquet` in the job's own folder, `job-<key>/` under the
output's shard folder (`shard_dir_for`), where `<key>` is derived from the
job's fingerprint (its output-relevant params and model). A restarted job with
the same fingerprint reads the finished shards back and computes only the
rest; a job with another fingerprint (other params, other model) writing the
same output has another folder, so two jobs never mix their shards, even when
they run at once. Because shards are fixed and every row depends only on its
own request, the resumed result is identical to an uninterrupted one, and so is
a result whose shards ran on Ray workers (`factory.executor`).

Two runs of one job (same fingerprint) take turns: the job folder is locked
(fcntl.flock on `job-<key>/lock`) while a run computes or reads its shards and
while `clear_shards` removes them, so the second run waits (saying so in one
line) and then resumes from the first's shards, or starts afresh if the first
already finished and removed them.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from factory.executor import ExecutorConfig, map_shards
from factory.io import atomic_path, remove_stale, tmp_prefix, write_text
from factory.schema import from_rows

T = TypeVar("T")
_MANIFEST = "manifest.json"
_LOCK = "lock"
_SUFFIX = ".shards"
# Job folders this process holds the lock of: folder -> open lock file (released by clear_shards or at exit).
_held: dict[Path, int] = {}


def shard_dir_for(out: str | Path) -> Path:
    """Where the shards of output `out` are kept while jobs run (`.NAME.shards` beside it, a folder per job)."""
    out = Path(out)
    return out.with_name(f".{out.name}{_SUFFIX}")


def job_dir(shard_dir: Path, fingerprint: str) -> Path:
    """The folder of the job with `fingerprint` under `shard_dir`."""
    return Path(shard_dir) / f"job-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"


def _output_of(shard_dir: Path) -> str:
    """The output a shard folder belongs to (for messages): `.NAME.shards` -> NAME beside it."""
    name = shard_dir.name
    if name.startswith(".") and name.endswith(_SUFFIX):
        return str(shard_dir.with_name(name[1:-len(_SUFFIX)]))
    return str(shard_dir)


def _lock(folder: Path, shard_dir: Path, *, wait: bool = True) -> int | None:
    """Lock job folder `folder` for this process (created if missing); the open lock file's descriptor.

    Waits for another process's run of the same job, saying so once; without `wait`, returns None
    instead. A lock file removed by the holder while this one waited is not a lock: then it retries.
    """
    if folder in _held:
        return _held[folder]
    told = False
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its holder removed the folder just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return None
            if not told:
                print(f"waiting for another run writing {_output_of(shard_dir)} with the same params "
                      f"(it holds {folder / _LOCK})", file=sys.stderr, flush=True)
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            raise
        try:
            current = os.stat(folder / _LOCK)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            _held[folder] = fd
            return fd
        os.close(fd)  # the holder removed the folder while we waited: lock the new one


def _unlock(folder: Path) -> None:
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _prepare(folder: Path, fingerprint: str) -> None:
    manifest = folder / _MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
        for stale in folder.iterdir():  # another job's shards (a key collision): never mix them in
            if stale.name != _LOCK:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for leftover in folder.glob(".*tmp-*"):  # a shard being written when a run of this job was killed
        leftover.unlink()
    write_text(manifest, json.dumps({"fingerprint": fingerprint}) + "\n")


def run_in_shards(
    items: Sequence[T],
    work: Callable,
    *,
    shard_size: int,
    shard_dir: Path,
    fingerprint: str,
    kind: str | None,
    desc: str = "shards",
    load: Callable[[], Any] | None = None,
    executor: ExecutorConfig | None = None,
) -> list[dict]:
    """Rows of `work` over `items`, shard by shard, resuming from finished shards of this job in `shard_dir`.

    `work(shard)` makes a shard's rows, a table of `kind` (None: of the rows' own columns); with `load`,
    `work(load(), shard)`: the model is loaded once per worker of `executor` (default: this process), and
    only if a shard is left to make. Each shard is checkpointed as it comes back, whatever order the
    workers finish in; the rows come in shard order.

    The job's folder stays locked by this process until `clear_shards(shard_dir)` (or the process ends),
    so no other run of the job writes or removes its shards meanwhile.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if load is None:
        load, work = _nothing, functools.partial(_without_model, work)
    shard_dir = Path(shard_dir).absolute()
    folder = job_dir(shard_dir, fingerprint)
    _lock(folder, shard_dir)
    try:
        _prepare(folder, fingerprint)
        starts = range(0, len(items), shard_size)
        paths = [folder / f"shard-{index:05d}.parquet" for index in range(len(starts))]
        tables = {index: pq.read_table(path) for index, path in enumerate(paths) if path.exists()}
        pending = [(index, items[start : start + shard_size]) for index, start in enumerate(starts)
                   if index not in tables]
        with tqdm(total=len(starts), initial=len(tables), desc=desc, unit="shard") as bar:
            for index, rows in map_shards(pending, load, work, executor or ExecutorConfig()):
                table = from_rows(rows, kind, source=str(paths[index])) if kind else pa.Table.from_pylist(rows)
                with atomic_path(paths[index]) as tmp:
                    pq.write_table(table, tmp)
                tables[index] = pq.read_table(paths[index])  # the same rows a resumed run reads back
                bar.update(1)
    except BaseException:
        _unlock(folder)  # the finished shards stay for the next run of the job
        raise
    resumed = len(starts) - len(pending)
    if resumed:
        print(f"{desc}: resumed {resumed} of {len(starts)} shards from {folder}", flush=True)
    return [row for index in range(len(starts)) for row in tables[index].to_pylist()]


def _nothing() -> None:
    return None


def _without_model(work: Callable[[Sequence[T]], list[dict]], _loaded: None, shard: Sequence[T]) -> list[dict]:
    return work(shard)


def clear_shards(shard_dir: Path) -> None:
    """Remove a finished job's shards once its output is safely written, and release its lock.

    The jobs of `shard_dir` this process ran are removed; so are other jobs' folders that no live run
    holds (a killed run with other params: the output they were for has just been replaced). A folder
    another run holds is left alone, and `shard_dir` goes once it is empty.
    """
    shard_dir = Path(shard_dir).absolute()
    for folder in [f for f in _held if f.parent == shard_dir]:
        shutil.rmtree(folder, ignore_errors=True)
        _unlock(folder)  # a run waiting on the lock then finds its lock file gone and starts the job afresh
    if not shard_dir.is_dir():
        return
    for folder in sorted(shard_dir.glob("job-*")):
        if folder.is_dir() and _lock(folder, shard_dir, wait=False) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            _unlock(folder)
    for legacy in shard_dir.iterdir():  # shards and manifest of the layout before job folders
        if legacy.is_file():
            legacy.unlink(missing_ok=True)
    remove_stale(shard_dir.parent, tmp_prefix(shard_dir))
    try:
        shard_dir.rmdir()
    except OSError:  # another job's folder is still there (its run is live), or it is gone already
        pass

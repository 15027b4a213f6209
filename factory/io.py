"""Atomic writes: a file appears whole or not at all, and a killed writer's temp file is cleaned later.

Every output is written to a temporary file beside its target and renamed into
place, so a killed stage never leaves a half-written file that DVC or a later
stage could mistake for a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine's PID namespace); a process of another user counts."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove the entries `<prefix><PID>` in `folder` whose PID is no longer alive (a killed writer's leftovers);
    a live process's, and names whose tail is not a PID, are left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        tail = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if not tail.isdigit() or pid_alive(int(tail)):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another run cleaned it first
            continue
        removed.append(entry)
    return removed


def tmp_prefix(path: Path) -> str:
    """The name of `path`'s temporary siblings, up to the writer's PID (see `atomic_path`)."""
    return f".{path.name}.tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    The temporary name carries the writer's PID (`.NAME.tmp-PID`); those of writers that are no
    longer alive (killed mid-write) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, tmp_prefix(path))
    tmp = path.with_name(f"{tmp_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, value: object) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

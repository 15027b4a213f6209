"""Atomic writes and tolerant reads of user files (Parquet or JSONL).

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


class InputError(ValueError):
    """A user-supplied file cannot be read; the message names the file, line and field."""


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


def read_jsonl(path: str | Path) -> list[dict]:
    """Objects of a JSONL file; blank lines skipped; a bad line is an InputError naming it."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _column(path: Path, name: str, values: list) -> pa.Array:
    """One JSONL field as an Arrow column; a value whose type disagrees with the rest is named."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        first = next(v for v in values if v is not None)
        for row, value in enumerate(values):
            if value is not None and type(value) is not type(first):
                raise InputError(
                    f"{path}: row {row} field {name!r}: got {value!r} ({type(value).__name__}), "
                    f"but earlier rows have {type(first).__name__}"
                ) from None
        raise InputError(f"{path}: field {name!r}: values cannot form one column") from None


def read_rows_table(path: str | Path) -> pa.Table:
    """A Parquet file, or a JSONL file as a table (columns from the union of keys)."""
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.suffix in {".jsonl", ".json", ".ndjson"}:
        rows = read_jsonl(path)
        names = list(dict.fromkeys(key for row in rows for key in row))
        return pa.table({name: _column(path, name, [row.get(name) for row in rows]) for name in names})
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None

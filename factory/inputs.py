"""User input tables and output paths, checked before any work, each failure one line naming the file.

`read_rows` reads a table a command takes as Parquet or JSONL (`factory label`'s and `factory filter`'s
samples): a missing file, a folder, an empty file, a truncated Parquet file, a table factory wrote as
another kind, a line that is not UTF-8 or not JSON, a field of mixed types, a repeated id or a number that
is NaN or infinite is a ValueError (FileNotFoundError when missing) naming the file, the 1-based line
(JSONL) or row (Parquet) and the field. `check_outputs` refuses an output path that is a folder, or whose
folder is a file, before anything is computed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class Rows:
    """A table read from a user file and how its rows are numbered for users (1-based)."""

    def __init__(self, table: pa.Table, path: Path, lines: list[int] | None = None):
        self.table, self.path, self.lines = table, path, lines

    def where(self, index: int) -> str:
        """'line 7' (JSONL: the file's line) or 'row 7' (Parquet) for the 0-based row `index`."""
        return f"line {self.lines[index]}" if self.lines is not None else f"row {index + 1}"

    @property
    def unit(self) -> str:
        return "line" if self.lines is not None else "row"


def check_file(path: str | Path, kind: str, formats: str = "Parquet") -> Path:
    """The path of an input file that exists, is a file and is not empty."""
    path = Path(path)
    what = f"{kind} file" + (f" ({formats})" if formats != kind else "")
    if not path.exists():
        raise FileNotFoundError(f"no such {kind} file: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a {what}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, expected a {what}")
    return path


def _jsonl(path: Path, kind: str) -> Rows:
    import pyarrow as pa

    rows, lines = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {number}: not UTF-8 ({error.reason} at byte {error.start + 1} "
                                 "of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            lines.append(number)
    if not rows:
        raise ValueError(f"{path}: no rows (only blank lines), expected a {kind} file")
    columns = {}
    for name in dict.fromkeys(key for row in rows for key in row):
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            first = next(v for v in values if v is not None)
            for index, value in enumerate(values):
                if value is not None and type(value) is not type(first):
                    raise ValueError(f"{path}: line {lines[index]} field {name!r}: got {value!r} "
                                     f"({type(value).__name__}), but earlier lines have {type(first).__name__}"
                                     ) from None
            raise ValueError(f"{path}: field {name!r}: values cannot form one column") from None
    return Rows(pa.table(columns), path, lines)


def _parquet(path: Path, kind: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from factory.lineage import _written_kind

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({' '.join(str(error).split())})") from None
    written = _written_kind(table)
    if written and written != kind:
        raise ValueError(f"{path}: a {written} table, expected a {kind} table")
    return Rows(table, path)


def read_rows(path: str | Path, kind: str) -> Rows:
    """A Parquet or JSONL input table of `kind`, checked (module docstring); its columns as they are."""
    from factory.schema import check_input

    path = check_file(path, kind, "Parquet or JSONL")
    rows = _jsonl(path, kind) if path.suffix in JSONL_SUFFIXES else _parquet(path, kind)
    check_input(rows.table, kind, source=str(path), unit=rows.unit, numbers=rows.lines)
    return rows


def check_outputs(**paths: str | Path | None) -> None:
    """Refuse output files that cannot be written, before any work: `check_outputs(out=..., votes=...)`
    (the keyword is the flag, `--out`)."""
    seen: dict[Path, str] = {}
    for name, value in paths.items():
        if value is None:
            continue
        flag, path = "--" + name.replace("_", "-"), Path(value)
        if path.is_dir():
            raise ValueError(f"{flag} {path}: is a folder, expected a file to write")
        parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: folder {parent} is not writable")
        resolved = path.resolve()
        if resolved in seen:
            raise ValueError(f"{flag} {path}: the same file as {seen[resolved]}")
        seen[resolved] = flag

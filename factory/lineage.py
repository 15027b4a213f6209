"""Provenance: written with every Parquet file and model, read back by `factory lineage`.

A Parquet file carries one key-value entry, `factory`, holding JSON with the
producing stage, its params, the fingerprints of its inputs, the model that
generated its rows (if any), the code version and the library versions. A model
directory carries `lineage.json`: its model_id (a hash of its weights), parent
model, training data fingerprints, params, metrics, code and library versions.
Nothing time-dependent is recorded, so the same params and seed give the same
bytes and DVC's cache hits. DVC's own record of each output (`dvc.lock`: stage,
command, md5) is read here too.

The code version hashes only the factory/train modules loaded when the output is
written (the code the stage ran), so an edit to a module a stage never imports
leaves its outputs' bytes alone. The library versions explain a difference
between two runs of the same code (issue 21); none of this enters an id.

pyarrow is imported only by the functions that write or read tables, so the
fast commands (audit, lineage) read provenance through DuckDB without it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from factory import __version__
from factory.ids import canonical_json, content_id, file_fingerprint
from factory.io import atomic_path, write_json

if TYPE_CHECKING:
    import pyarrow as pa

METADATA_KEY = b"factory"
MODEL_LINEAGE_FILE = "lineage.json"
# What defines a model: its weights, architecture and tokenizer (not its lineage or run logs).
_MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


# The packages whose code `code_version` hashes (and a Ray cluster's workers are shipped).
CODE_PACKAGES = ("factory", "train")
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CODE_ROOTS = tuple(_PROJECT_ROOT / package for package in CODE_PACKAGES)
# The libraries whose versions shape the bytes of a table or model (besides python and factory itself).
VERSIONED_LIBRARIES = ("torch", "transformers", "trl", "datasets", "tokenizers", "duckdb", "pyarrow", "numpy")


def loaded_sources() -> list[Path]:
    """The source files of the factory and train modules this process has imported, sorted by path."""
    files = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py"):
            continue
        path = Path(file).resolve()
        if any(path.is_relative_to(root) for root in _CODE_ROOTS):
            files.add(path)
    return sorted(files, key=lambda path: path.relative_to(_PROJECT_ROOT).as_posix())


def code_version() -> str:
    """Package version plus a hash of the code that ran: the factory/train modules loaded now.

    Each file counts by its path relative to the project root and its bytes, so the value is the same on
    every machine for the same command and code, and an edit to a module the command never imported
    (tests, benchmarks, other stages) does not change it. Not cached: a stage may import more as it goes.
    """
    digest = hashlib.blake2b(digest_size=6)
    for file in loaded_sources():
        digest.update(file.relative_to(_PROJECT_ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    return f"{__version__}+{digest.hexdigest()}"


@functools.cache
def library_versions() -> dict[str, str | None]:
    """python, the libraries that shape outputs, and factory: name -> version (None: not installed).

    Read from the installed distributions' metadata (importlib.metadata), so torch is not imported for it.
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["factory"] = __version__  # the running source's, even from a checkout that is not installed
    return versions


def fingerprints(inputs: dict[str, str | Path] | None) -> dict[str, str]:
    return {name: file_fingerprint(path) for name, path in sorted((inputs or {}).items())}


def write_table(
    table: pa.Table,
    path: str | Path,
    *,
    kind: str,
    stage: str,
    params: dict | None = None,
    inputs: dict[str, str | Path] | None = None,
    model_id: str | None = None,
) -> Path:
    """Validate `table` as `kind`, attach provenance, write it atomically as Parquet."""
    import pyarrow.parquet as pq

    from factory.schema import validate

    path = Path(path)
    table = validate(table, kind, source=str(path))
    provenance = {
        "table": kind,
        "stage": stage,
        "params": params or {},
        "inputs": fingerprints(inputs),
        "model_id": model_id,
        "code_version": code_version(),
        "versions": library_versions(),
        "rows": table.num_rows,
    }
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = canonical_json(provenance).encode()
    table = table.replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_table(path: str | Path, kind: str | None = None) -> pa.Table:
    """A Parquet table; with `kind`, checked as an input of that kind (`factory.schema.validate`, `check_input`).

    Every failure is a one-line ValueError naming the file: missing, a folder, empty, not Parquet (truncated),
    a table factory wrote as another kind, a bad column, a repeated id, a number that is NaN or infinite.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from factory.inputs import check_file
    from factory.schema import check_input, validate

    path = check_file(path, kind or "Parquet")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{path}: not a readable Parquet file ({reason})") from None
    if not kind:
        return table
    written = _written_kind(table)
    if written and written != kind:
        raise ValueError(f"{path}: a {written} table, expected a {kind} table")
    table = validate(table, kind, source=str(path))
    check_input(table, kind, source=str(path))
    return table


def _written_kind(table: pa.Table) -> str | None:
    """The table kind factory recorded in a file's provenance (None: no provenance, or not readable)."""
    try:
        return json.loads((table.schema.metadata or {})[METADATA_KEY]).get("table")
    except (KeyError, ValueError, AttributeError):
        return None


def read_provenance(path: str | Path) -> dict | None:
    """The provenance written by `write_table`, or None for a file factory did not write."""
    return read_provenances([path])[str(path)]


def read_provenances(paths: list[str | Path]) -> dict[str, dict | None]:
    """Provenance of many Parquet files in one DuckDB scan of their footers (keyed by str(path))."""
    if not paths:
        return {}
    import duckdb

    rows = duckdb.connect().execute(
        "SELECT file_name, value FROM parquet_kv_metadata(?) WHERE key = ?",
        [[str(p) for p in paths], METADATA_KEY]).fetchall()
    found = {name: json.loads(value) for name, value in rows}
    return {str(p): found.get(str(p)) for p in paths}


def dvc_lock_outputs(root: str | Path = ".") -> dict[str, dict]:
    """Every output recorded in `root/dvc.lock`: path -> stage, md5, command and the stage's params.

    Empty when the project has no lock file (a table made outside DVC).
    """
    from factory.params import read_yaml

    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (read_yaml(lock.read_text()) or {}).get("stages", {})
    outputs = {}
    for stage, entry in stages.items():
        params = {key: value for file_params in (entry.get("params") or {}).values()
                  for key, value in file_params.items()}
        for out in entry.get("outs", []):
            outputs[out["path"]] = {"stage": stage, "md5": out.get("md5"), "cmd": entry.get("cmd"),
                                    "params": params}
    return outputs


def dvc_lock_entry(path: str, outputs: dict[str, dict]) -> dict | None:
    """The dvc.lock record of `path`, or of the output folder that contains it."""
    candidate = Path(path)
    for folder in (candidate, *candidate.parents):
        if folder.as_posix() in outputs:
            return {"out": folder.as_posix()} | outputs[folder.as_posix()]
    return None


def model_id(model: str | Path) -> str:
    """`m-…` hash of a local model's weights, config and tokenizer; `hub:NAME` for a Hub id."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    files = sorted({f for pattern in _MODEL_FILE_PATTERNS for f in path.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"{path}: no model weights (*.safetensors or *.bin) found")
    return content_id("model", [[f.name, file_fingerprint(f)] for f in files])


def write_model_lineage(
    model_dir: str | Path,
    *,
    stage: str,
    parent: str | None,
    data: dict[str, str | Path],
    params: dict,
    metrics: dict | None = None,
) -> dict:
    """Record where a freshly saved model came from; returns the record (with its model_id)."""
    record = {
        "model_id": model_id(model_dir),
        "stage": stage,
        "parent": parent,
        "data": fingerprints(data),
        "params": params,
        "metrics": metrics or {},
        "code_version": code_version(),
        "versions": library_versions(),
    }
    write_json(Path(model_dir) / MODEL_LINEAGE_FILE, record)
    return record


def read_model_lineage(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / MODEL_LINEAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None

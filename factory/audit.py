"""SQL over every table of every iteration, and the audit gates built on it.

`catalog` finds the project's Parquet files (under `data/`) and model folders
(under `models/`) and opens a DuckDB connection with one view per table:
`problems`, `samples`, `labels`, `kept`, `pairs`, `votes`, `dropped`, `eval`,
and any other table kind a stage writes (the view is named after the kind its
provenance declares), each with `iteration` (from the `iter_K` folder; null for
tables outside one) and `file` columns. Two more views describe the files
themselves: `models` (one row per model folder's lineage.json) and `files`
(one row per Parquet file with its provenance). Four macros help checks:
`words(text)`, `ngrams(text, n)`, `steps(text)` (`factory.steps.split_steps`
with its newline delimiter) and `gold_recipe(recipe)`.

Only DuckDB is imported here (not pyarrow, torch or transformers): `factory
audit` must start fast.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import duckdb

from factory.lineage import MODEL_LINEAGE_FILE, read_model_lineage, read_provenances

_ITERATION = re.compile(r"(?:^|/)iter_(\d+)(?:/|$)")
# Recipes whose pairs are judged against gold answers (scpo_semi: where the problem has one).
GOLD_RECIPES = ("dpo_st", "dpo", "scpo_semi", "scdpo")
FORMATS = ("table", "csv", "json")


class AuditError(ValueError):
    """An audit query or check cannot run; the message names the query or check file."""


class GateFailed(AuditError):
    """An audit check returned rows: the message names each failed check and its offending ids."""


@dataclass(frozen=True)
class TableFile:
    path: str  # relative to the project root, with forward slashes
    view: str | None  # None: not written by factory (no provenance)
    iteration: int | None
    provenance: dict | None


def iteration_of(path: str) -> int | None:
    match = _ITERATION.search(path)
    return int(match.group(1)) if match else None


def _view_for(path: str, provenance: dict | None) -> str | None:
    if not provenance:
        return None
    kind = provenance.get("table")
    if kind == "samples":
        if provenance.get("stage") == "eval":
            return "eval"
        if provenance.get("stage") == "filter" or Path(path).stem == "kept":  # self_train/kept: the train stage's filter
            return "kept"
    return kind


def _visible(path: Path, root: Path) -> bool:
    """Skip hidden files and folders: temporary writes and in-progress shards live there."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def discover(
    root: str | Path = ".",
    data_dir: str = "data",
    iterations: Iterable[int] | None = None,
    paths: Sequence[str | Path] | None = None,
) -> list[TableFile]:
    """Every visible Parquet file under `root/data_dir` (or just `paths`), with its provenance and view name.

    With `iterations`, only files of those iterations and files outside any iteration (problems).
    """
    root = Path(root)
    if paths is not None:
        missing = [str(p) for p in paths if not (root / p).is_file()]
        if missing:
            raise AuditError(f"no such table file(s): {', '.join(missing)}")
        paths = sorted(root / p for p in paths)
    else:
        paths = sorted(p for p in (root / data_dir).rglob("*.parquet") if _visible(p, root))
    if not paths:
        return []
    provenances = read_provenances(paths)
    wanted = None if iterations is None else set(iterations)
    found = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        iteration = iteration_of(relative)
        if wanted is not None and iteration is not None and iteration not in wanted:
            continue
        provenance = provenances[str(path)]
        found.append(TableFile(relative, _view_for(relative, provenance), iteration, provenance))
    return found


def model_records(root: str | Path = ".", models_dir: str = "models") -> list[dict]:
    """One row per model folder holding a lineage.json (nested parts as JSON text)."""
    root = Path(root)
    rows = []
    for path in sorted((root / models_dir).rglob(MODEL_LINEAGE_FILE)):
        if not _visible(path, root):
            continue
        record = read_model_lineage(path.parent)
        folder = path.parent.relative_to(root).as_posix()
        rows.append({
            "model_id": record.get("model_id"),
            "path": folder,
            "iteration": iteration_of(folder),
            "stage": record.get("stage"),
            "parent": record.get("parent"),
            "code_version": record.get("code_version"),
            "data": json.dumps(record.get("data", {}), sort_keys=True),
            "params": json.dumps(record.get("params", {}), sort_keys=True),
            "metrics": json.dumps(record.get("metrics", {}), sort_keys=True),
        })
    return rows


def sql_literal(text: str) -> str:
    """`text` as a SQL string literal (file paths and names go into DuckDB table functions)."""
    return "'" + text.replace("'", "''") + "'"


def _view_sql(root: Path, files: Sequence[TableFile]) -> str:
    """UNION ALL BY NAME of the files, each with `iteration` (unless it has one) and `file`."""
    con = duckdb.connect()
    parts = []
    for table_file in files:
        location = sql_literal(str(root / table_file.path))
        columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet({location})").fetchall()]
        extra = [f"{sql_literal(table_file.path)} AS file"]
        if "iteration" not in columns:
            extra.insert(0, f"CAST({table_file.iteration if table_file.iteration is not None else 'NULL'} AS INTEGER)"
                            " AS iteration")
        parts.append(f"SELECT *, {', '.join(extra)} FROM read_parquet({location})")
    return "\nUNION ALL BY NAME\n".join(parts)


_MACROS = f"""
CREATE MACRO words(text) AS
    list_filter(list_transform(string_split_regex(regexp_replace(lower(text), '[^a-z0-9$.%]+', ' ', 'g'), ' '),
                               lambda w: trim(w, '.')), lambda w: w <> '');
CREATE MACRO ngrams(text, n) AS  -- the one-element list binds words(text) once (a macro argument is re-evaluated per use)
    list_transform([words(text)], lambda ws: list_transform(range(1, greatest(len(ws) - n + 2, 1)),
                                                            lambda i: array_to_string(list_slice(ws, i, i + n - 1), ' ')))[1];
CREATE MACRO steps(text) AS  -- factory.steps.split_steps: non-empty stripped lines, the `####` line excluded
    list_filter(list_transform(string_split(text, chr(10)), lambda l: trim(l, ' ' || chr(9) || chr(11) || chr(12) || chr(13))),
                lambda l: l <> '' AND NOT starts_with(l, '####'));
CREATE MACRO gold_recipe(recipe) AS recipe IN ({", ".join(sql_literal(r) for r in GOLD_RECIPES)});
"""


def catalog(
    root: str | Path = ".",
    *,
    data_dir: str = "data",
    models_dir: str = "models",
    iterations: Iterable[int] | None = None,
    paths: Sequence[str | Path] | None = None,
    variables: dict[str, object] | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per table (see the module docstring).

    `paths` limits the tables to those files (a DVC stage sees only its deps).
    `variables` become DuckDB variables (`getvariable('name')`), so checks read
    their thresholds from params.
    """
    root = Path(root)
    files = discover(root, data_dir, iterations, paths)
    con = duckdb.connect()
    con.execute(_MACROS)
    by_view: dict[str, list[TableFile]] = {}
    for table_file in files:
        if table_file.view:
            by_view.setdefault(table_file.view, []).append(table_file)
    for view, members in sorted(by_view.items()):
        con.execute(f"CREATE VIEW {view} AS {_view_sql(root, members)}")
    wanted = None if iterations is None else set(iterations)
    models = [m for m in model_records(root, models_dir)
              if wanted is None or m["iteration"] is None or m["iteration"] in wanted]
    con.execute("CREATE TABLE models (model_id VARCHAR, path VARCHAR, iteration INTEGER, stage VARCHAR, "
                "parent VARCHAR, code_version VARCHAR, data JSON, params JSON, metrics JSON)")
    if models:
        con.executemany("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [list(m.values()) for m in models])
    con.execute("CREATE TABLE files (path VARCHAR, view VARCHAR, iteration INTEGER, \"table\" VARCHAR, "
                "stage VARCHAR, model_id VARCHAR, \"rows\" BIGINT, code_version VARCHAR, params JSON, inputs JSON)")
    if files:
        con.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            [f.path, f.view, f.iteration, (f.provenance or {}).get("table"), (f.provenance or {}).get("stage"),
             (f.provenance or {}).get("model_id"), (f.provenance or {}).get("rows"),
             (f.provenance or {}).get("code_version"),
             json.dumps((f.provenance or {}).get("params", {}), sort_keys=True),
             json.dumps((f.provenance or {}).get("inputs", {}), sort_keys=True)]
            for f in files])
    for name, value in sorted((variables or {}).items()):
        con.execute(f"SET VARIABLE {name} = ?", [value])
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in con.execute(
        "SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]


def query(con: duckdb.DuckDBPyConnection, sql: str, *, source: str = "query") -> tuple[list[str], list[tuple]]:
    """Run `sql`; the error names `source` and the views that exist (the usual mistake is a missing one)."""
    try:
        relation = con.sql(sql)
    except duckdb.Error as error:
        raise AuditError(f"{source}: {error}\n(views: {', '.join(views(con))})") from None
    if relation is None:  # a statement with no result (SET, CREATE)
        return [], []
    return relation.columns, relation.fetchall()


def _jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def records(columns: Sequence[str], rows: Sequence[tuple]) -> list[dict]:
    return [{c: _jsonable(v) for c, v in zip(columns, row)} for row in rows]


def format_rows(columns: Sequence[str], rows: Sequence[tuple], fmt: str = "table", *, max_width: int = 60) -> str:
    """Rows as an aligned text table, CSV or JSON (a list of objects)."""
    if fmt == "json":
        return json.dumps(records(columns, rows), indent=2, ensure_ascii=False)
    if fmt == "csv":
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(v, None) for v in row] for row in rows])
        return buffer.getvalue().rstrip("\n")
    if fmt != "table":
        raise AuditError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    body = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(body + [f"({len(rows)} row{'s' if len(rows) != 1 else ''})"])


def _cell(value: object, max_width: int | None) -> str:
    if value is None:
        return "" if max_width is None else "NULL"
    text = json.dumps(_jsonable(value)) if isinstance(value, (list, dict, tuple)) else str(value)
    text = text.replace("\n", "\\n")
    if max_width is not None and len(text) > max_width:
        text = text[: max_width - 1] + "…"
    return text


def write_rows(columns: Sequence[str], rows: Sequence[tuple], fmt: str = "table") -> None:
    sys.stdout.write(format_rows(columns, rows, fmt) + "\n")


@dataclass(frozen=True)
class AuditConfig:
    """params `audit`: where the checks are and the thresholds they read (as DuckDB variables)."""

    checks: str = "audits"
    ngram: int = 8  # decontamination: word n-grams compared
    max_ngram_overlap: float = 0.8  # share of a test question's n-grams found in a training problem
    max_length_ratio: float = 1.5  # length bias: mean words of one side over the other's
    max_longer_share: float = 0.9  # length bias: share of pairs in which the same side is longer
    min_pairs_for_bias: int = 20  # fewer pairs say nothing about bias
    variables: dict = field(default_factory=dict)  # thresholds of users' own checks

    def as_variables(self, test_splits: Sequence[str]) -> dict[str, object]:
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("checks", "variables")}
        return known | {"test_splits": list(test_splits)} | dict(self.variables)


@dataclass(frozen=True)
class Check:
    """One invariant: a SQL query that returns the rows violating it (none: it holds)."""

    name: str
    path: str
    description: str
    sql: str


@dataclass
class CheckResult:
    check: Check
    columns: list[str]
    rows: list[tuple]

    @property
    def passed(self) -> bool:
        return not self.rows

    def offending_ids(self) -> list[str]:
        """The distinct first-column values of the violating rows: checks put the offending id first."""
        return list(dict.fromkeys(str(row[0]) for row in self.rows))

    def summary(self, limit: int = 20) -> dict:
        """For the gate's report: the check, its count and its first rows."""
        return {"path": self.check.path, "description": self.check.description, "violations": len(self.rows),
                "rows": records(self.columns, self.rows[:limit])}


def load_checks(folder: str | Path) -> list[Check]:
    """Every `*.sql` file of `folder`, by name; the leading `--` comment lines are its description."""
    folder = Path(folder)
    files = sorted(folder.glob("*.sql"))
    if not files:
        raise AuditError(f"{folder}: no *.sql checks found")
    checks = []
    for path in files:
        sql = path.read_text(encoding="utf-8")
        description = " ".join(line.lstrip("-").strip() for line in sql.splitlines()
                               if line.startswith("--")).strip()
        checks.append(Check(path.stem, path.as_posix(), description, sql))
    return checks


def run_checks(con: duckdb.DuckDBPyConnection, checks: Sequence[Check]) -> list[CheckResult]:
    results = []
    for check in checks:
        columns, rows = query(con, check.sql, source=f"audit check {check.name!r} ({check.path})")
        results.append(CheckResult(check, list(columns), list(rows)))
    return results


def failure_message(results: Sequence[CheckResult]) -> str:
    """One paragraph per failed check: its name, file, what it guards, how many rows and which ids."""
    parts = []
    for result in results:
        if result.passed:
            continue
        offending = result.offending_ids()
        ids = ", ".join(offending[:10])
        more = f" (and {len(offending) - 10} more)" if len(offending) > 10 else ""
        parts.append(f"audit check {result.check.name!r} failed ({result.check.path}): {len(result.rows)} violating "
                     f"row(s); {result.columns[0] if result.columns else 'id'}: {ids}{more}\n"
                     f"  {result.check.description}\n"
                     + "\n".join("  " + line for line in format_rows(result.columns, result.rows[:10]).splitlines()))
    return "\n\n".join(parts)

"""SQL over every table of every iteration, and the audit gates built on it.

`catalog` finds the project's Parquet files (under `data/`) and model folders
(under `models/`) and opens a DuckDB connection with one view per table:
`problems`, `samples`, `labels`, `kept`, `pairs`, `votes`, `dropped`, `eval`,
and any other table kind a stage writes (the view is named after the kind its
provenance declares), each with `iteration` (from the `iter_K` folder; null for
tables outside one) and `file` columns. Two more views describe the files
themselves: `models` (one row per model folder's lineage.json) and `files`
(one row per Parquet file with its provenance). Four macros help checks:
`words(text)`, `ngrams(text, n)`, `steps(text)` (`factory.reasoning_steps.split_steps`
with its newline delimiter) and `gold_recipe(recipe)`.

`catalog` is writable and unconfined (export, lineage and the report build on
it). Audit checks, and `factory audit` unless `--unconfined`, run on a
`ConfinedCatalog`: the catalog in a database file that each check opens afresh,
read-only, with no file access but to the tables' own files, so a check can
neither change what a later one sees nor write or read anything else.

Only DuckDB is imported here (not pyarrow, torch or transformers): `factory
audit` must start fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import duckdb

from factory.lineage import MODEL_LINEAGE_FILE, read_model_lineage, read_provenances
from factory.recipes import gold_judged_rules

_ITERATION = re.compile(r"(?:^|/)iter_(\d+)(?:/|$)")
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


_MACROS = """
CREATE MACRO words(text) AS
    list_filter(list_transform(string_split_regex(regexp_replace(lower(text), '[^a-z0-9$.%]+', ' ', 'g'), ' '),
                               lambda w: trim(w, '.')), lambda w: w <> '');
CREATE MACRO ngrams(text, n) AS  -- the one-element list binds words(text) once (a macro argument is re-evaluated per use)
    list_transform([words(text)], lambda ws: list_transform(range(1, greatest(len(ws) - n + 2, 1)),
                                                            lambda i: array_to_string(list_slice(ws, i, i + n - 1), ' ')))[1];
CREATE MACRO steps(text) AS  -- factory.reasoning_steps.split_steps: non-empty stripped lines, the `####` line excluded
    list_filter(list_transform(string_split(text, chr(10)), lambda l: trim(l, ' ' || chr(9) || chr(11) || chr(12) || chr(13))),
                lambda l: l <> '' AND NOT starts_with(l, '####'));
"""


def _macros() -> str:
    """The SQL macros; `gold_recipe` holds the pair rules the registry marks gold-judged (rows' `recipe` = rule)."""
    rules = ", ".join(sql_literal(rule) for rule in gold_judged_rules())
    return _MACROS + f"CREATE MACRO gold_recipe(recipe) AS recipe IN ({rules});\n"


def catalog(
    root: str | Path = ".",
    *,
    data_dir: str = "data",
    models_dir: str = "models",
    iterations: Iterable[int] | None = None,
    paths: Sequence[str | Path] | None = None,
    variables: dict[str, object] | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory, writable and unconfined DuckDB connection with a view per table (see the module docstring).

    `paths` limits the tables to those files (a DVC stage sees only its deps).
    `variables` become DuckDB variables (`getvariable('name')`), so checks read
    their thresholds from params. For SQL that must not write or read other
    files (audit checks, `factory audit`), use `ConfinedCatalog`.
    """
    root = Path(root)
    con = duckdb.connect()
    _fill(con, root, discover(root, data_dir, iterations, paths), _models(root, models_dir, iterations))
    _set_variables(con, variables)
    return con


def _models(root: Path, models_dir: str, iterations: Iterable[int] | None) -> list[dict]:
    wanted = None if iterations is None else set(iterations)
    return [m for m in model_records(root, models_dir)
            if wanted is None or m["iteration"] is None or m["iteration"] in wanted]


def _fill(con: duckdb.DuckDBPyConnection, root: Path, files: Sequence[TableFile], models: Sequence[dict]) -> None:
    """The macros, a view per table kind over its files, and the `models` and `files` tables."""
    con.execute(_macros())
    by_view: dict[str, list[TableFile]] = {}
    for table_file in files:
        if table_file.view:
            by_view.setdefault(table_file.view, []).append(table_file)
    for view, members in sorted(by_view.items()):
        con.execute(f"CREATE VIEW {view} AS {_view_sql(root, members)}")
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


def _set_variables(con: duckdb.DuckDBPyConnection, variables: dict[str, object] | None) -> None:
    for name, value in sorted((variables or {}).items()):
        con.execute(f"SET VARIABLE {_identifier(str(name))} = ?", [value])


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ConfinedCatalog:
    """The catalog built once into a database file; `connect()` opens a fresh read-only, confined connection.

    A confined connection cannot change the views or tables (the database is opened read-only, and each
    connection's temporary objects die with it), and cannot reach any file but the catalog's tables: DuckDB's
    `enable_external_access` is off, `allowed_paths` lists exactly the table files (the views read them anew
    on every query, so they must be allowed), and `lock_configuration` keeps SQL from changing either. So no
    COPY ... TO, ATTACH, INSTALL or LOAD, EXPORT DATABASE, read_csv('/etc/passwd'), glob('/*') or SET.
    The views' file paths are absolute, so the connection reads the same files from any working directory.
    Use as a context manager (or call `close()`): it removes the database file.
    """

    def __init__(self, root: str | Path = ".", *, data_dir: str = "data", models_dir: str = "models",
                 iterations: Iterable[int] | None = None, paths: Sequence[str | Path] | None = None,
                 variables: dict[str, object] | None = None) -> None:
        """The arguments of `catalog`."""
        root = Path(root).absolute()
        files = discover(root, data_dir, iterations, paths)
        self.variables = dict(variables or {})
        located = [root / f.path for f in files]
        self.allowed_paths = sorted({str(p) for p in located} | {str(p.resolve()) for p in located})
        self._folder = tempfile.mkdtemp(prefix="factory-audit-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        self.path = str(Path(self._folder) / "catalog.duckdb")
        con = duckdb.connect(self.path)
        try:
            _fill(con, root, files, _models(root, models_dir, iterations))
        finally:
            con.close()

    def connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(self.path, read_only=True, config={
            "autoinstall_known_extensions": False, "allow_community_extensions": False})
        try:
            # allowed_paths can only be set once the database is started, so here rather than in `config`.
            con.execute(f"SET allowed_paths = [{', '.join(sql_literal(p) for p in self.allowed_paths)}]")
            con.execute("SET allowed_directories = []")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except duckdb.Error as error:  # an older DuckDB without these settings: refuse to run unconfined
            con.close()
            raise AuditError(f"cannot confine the audit connection (DuckDB {duckdb.__version__}): "
                             f"{str(error).splitlines()[0]}") from None
        try:
            _set_variables(con, self.variables)  # variables stay settable once the configuration is locked
        except BaseException:
            con.close()
            raise
        return con

    def close(self) -> None:
        self._cleanup()

    def __enter__(self) -> ConfinedCatalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in con.execute(
        "SELECT table_name FROM information_schema.tables ORDER BY table_name").fetchall()]


def refusal(error: duckdb.Error) -> str | None:
    """The first line of `error` when a confined connection refused it (a write, a file outside, SET); else None."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, duckdb.PermissionException) or any(
            marker in text for marker in ("read-only mode", "configuration has been locked")):
        return first
    return None


def query(con: duckdb.DuckDBPyConnection, sql: str, *, source: str = "query") -> tuple[list[str], list[tuple]]:
    """Run `sql`; the error names `source` and the views that exist (the usual mistake is a missing one).

    On a confined connection (`ConfinedCatalog.connect`), what it refuses is one line: `source: refused: ...`.
    """
    try:
        relation = con.sql(sql)
        if relation is None:  # a statement with no result (SET, CREATE)
            return [], []
        return relation.columns, relation.fetchall()
    except duckdb.Error as error:
        refused = refusal(error)
        if refused:
            raise AuditError(f"{source}: refused: {refused} (the connection is read-only and reads only the "
                             "project's tables)") from None
        raise AuditError(f"{source}: {error}\n(views: {', '.join(views(con))})") from None


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity
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
    """Rows as an aligned text table, CSV or JSON (a list of objects).

    JSON is strict: NaN and Infinity become null. CSV follows RFC 4180 with PostgreSQL's (and DuckDB's COPY)
    convention for NULL: a NULL is an empty unquoted field, an empty string is a quoted empty field (`""`);
    text keeps its newlines (inside quotes), lists and structs are JSON text. `csv.reader` reads every value
    back (NULL and "" both as ''; with Python 3.12's `quoting=csv.QUOTE_NOTNULL`, NULL as None), and so does
    DuckDB: `read_csv(path, all_varchar = true, allow_quoted_nulls = false)`.
    """
    if fmt == "json":
        return json.dumps(records(columns, rows), indent=2, ensure_ascii=False, allow_nan=False)
    if fmt == "csv":
        lines = [",".join(_csv_field(c) for c in columns)]
        lines += [",".join(_csv_field(v) for v in row) for row in rows]
        return "\n".join(lines)
    if fmt != "table":
        raise AuditError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    body = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(body + [f"({len(rows)} row{'s' if len(rows) != 1 else ''})"])


def _text(value: object) -> str:
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False)
    return str(value)


def _csv_field(value: object) -> str:
    """One CSV field: NULL unquoted and empty, an empty string `""`, text quoted by the csv module's rules."""
    if value is None:
        return ""
    text = _text(value)
    if text == "":
        return '""'
    buffer = io.StringIO()
    # QUOTE_MINIMAL quotes a field holding the delimiter, the quote or a character of the line terminator.
    csv.writer(buffer, lineterminator="\r\n").writerow([text])
    return buffer.getvalue()[:-2]


def _cell(value: object, max_width: int | None) -> str:
    if value is None:
        return "NULL"
    text = _text(value).replace("\n", "\\n")
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
    error: str | None = None  # the check could not run, or was refused (it wrote, or read outside the tables)

    @property
    def passed(self) -> bool:
        return self.error is None and not self.rows

    def offending_ids(self) -> list[str]:
        """The distinct first-column values of the violating rows: checks put the offending id first."""
        return list(dict.fromkeys(str(row[0]) for row in self.rows))

    def summary(self, limit: int = 20) -> dict:
        """For the gate's report: the check, its count and its first rows."""
        summary = {"path": self.check.path, "description": self.check.description, "violations": len(self.rows),
                   "rows": records(self.columns, self.rows[:limit])}
        return summary | ({"error": self.error} if self.error is not None else {})


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


def run_checks(source: ConfinedCatalog | duckdb.DuckDBPyConnection, checks: Sequence[Check]) -> list[CheckResult]:
    """Run every check; one that cannot run or is refused fails with its `error` (one line naming its file).

    On a `ConfinedCatalog` (the gate) each check gets a fresh read-only, confined connection, so no check can
    change what a later one reads, write a file or read one outside the tables. A plain connection (tests,
    scripts) gives each check a cursor of it: unconfined, but SELECT-only all the same.
    """
    results = []
    for check in checks:
        con = source.connect() if isinstance(source, ConfinedCatalog) else source.cursor()
        try:
            results.append(_run_check(con, check))
        finally:
            con.close()
    return results


def _run_check(con: duckdb.DuckDBPyConnection, check: Check) -> CheckResult:
    """A check is SELECT statements only (the last one's rows are its violations)."""
    def refused(reason: str) -> CheckResult:
        return CheckResult(check, [], [], f"audit check {check.name!r} refused ({check.path}): {reason}")

    try:
        statements = con.extract_statements(check.sql)
    except duckdb.Error as error:
        return CheckResult(check, [], [], f"audit check {check.name!r} could not run ({check.path}): {error}")
    if not statements:
        return CheckResult(check, [], [], f"audit check {check.name!r} could not run ({check.path}): no statement")
    for statement in statements:
        if statement.type != duckdb.StatementType.SELECT:
            return refused(f"a check may run only SELECT statements, not {statement.type.name} "
                           f"({' '.join(statement.query.split())[:80]})")
    try:
        relation = None
        for statement in statements:
            relation = con.sql(statement)
        return CheckResult(check, list(relation.columns), list(relation.fetchall()))
    except duckdb.Error as error:
        reason = refusal(error)
        if reason:
            return refused(f"{reason} (a check reads only the tables it is given)")
        return CheckResult(check, [], [], f"audit check {check.name!r} could not run ({check.path}): {error}\n"
                                          f"(views: {', '.join(views(con))})")


def failure_message(results: Sequence[CheckResult]) -> str:
    """One paragraph per failed check: its name, file, what it guards, how many rows and which ids."""
    parts = []
    for result in results:
        if result.passed:
            continue
        if result.error is not None:
            parts.append(result.error)
            continue
        offending = result.offending_ids()
        ids = ", ".join(offending[:10])
        more = f" (and {len(offending) - 10} more)" if len(offending) > 10 else ""
        parts.append(f"audit check {result.check.name!r} failed ({result.check.path}): {len(result.rows)} violating "
                     f"row(s); {result.columns[0] if result.columns else 'id'}: {ids}{more}\n"
                     f"  {result.check.description}\n"
                     + "\n".join("  " + line for line in format_rows(result.columns, result.rows[:10]).splitlines()))
    return "\n\n".join(parts)

r"""Problem sources from files and the Hugging Face Hub.

Each loader returns ``(problems, dropped)``: `problems` are dicts with exactly
the columns of `factory.schema.PROBLEMS`, `dropped` dicts with the columns of
`factory.schema.DROPPED` (the original record as JSON, the filter and the
reason), so that ``len(problems) + len(dropped)`` is the number of records read.

How a record becomes a problem:

- ``question`` is required and must be a non-empty string; a record without one
  is an error (`ProblemSourceError`), as is a line that is not a JSON object:
  a broken source should stop the pipeline, not shrink it.
- ``answer`` is optional. Text containing ``####`` is GSM8K format: the gold
  answer is what follows the last ``####``, the gold rationale is the whole
  text as it is, and ``n_steps`` counts its steps (`factory.reasoning_steps.split_steps`;
  a text with no step before ``####`` is a bare answer: no rationale, no
  n_steps). Other text, or a number, is a bare final answer. Missing or null:
  an unlabeled problem (gold_answer None).
- A final answer that is a plain number is stored normalised
  (`factory.answers.number_value`: ``1,080`` -> ``1080``); one that looks like
  math (`factory.answers.looks_like_math`: ``\sqrt{51}``, ``(2,\infty)``,
  ``2k``) is stored as written; other text must hold exactly one number, which
  is stored. A gold answer is never rewritten into a different value.
- MATH format (Hendrycks et al.): a record with a ``solution`` field, or with
  ``problem`` and no ``question`` while the question field is the default, on
  any source (``jsonl:``, ``hf:``; ``level``, ``type`` and other fields are
  ignored). The question is ``problem`` (or ``question``), the gold rationale
  is the ``solution`` as it is, and the gold answer is the ``answer`` field,
  read as LaTeX (`factory.answers.read_answer`: any non-empty answer is kept),
  or else the last non-empty ``\boxed{}`` of the solution, read as extraction
  reads it; a solution without one drops the record.
- An answer that is present but unusable (no number, several numbers, neither
  text nor a number, a MATH solution without a box) drops the record with
  filter ``answer``; a problem_id seen before drops it with filter
  ``duplicate``, naming the line (or row) it repeats.
- problem_id is the record's id field as a string when it has one, else
  ``factory.ids.content_id("problem", question)`` of the question exactly as
  stored (not stripped), so the same question gets the same id everywhere.
- `source` never holds a machine path: ``gsm8k:test.jsonl``, ``jsonl:mine.jsonl``,
  ``gsm8k:openai/gsm8k``, ``hf:<name>[:<config>]`` (a local dataset folder: its
  folder name).

`factory problems` writes the dropped records next to the problems file
(`dropped_path`), so a later command that meets a sample of an unknown
problem can say that the problem was dropped, and why (`unknown_problem`:
one error, the same for `factory label` and `factory pairs`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from factory.answers import extract_answer, find_numbers, looks_like_math, normalize_number, number_value, read_answer
from factory.ids import content_id
from factory.reasoning_steps import FINAL_ANSWER_MARKER, split_steps

__all__ = ["ProblemSourceError", "dropped_path", "load_gsm8k", "load_hf", "load_jsonl", "unknown_problem"]

STAGE = "problems"
_GSM8K_SPLITS = ("train", "test")
_REPR_LIMIT = 200


class ProblemSourceError(ValueError):
    """A problem source cannot be read; the message names the file, the line and the field."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _gold_from_text(text: str) -> tuple[str | None, str | None]:
    """(answer, None) or (None, why it is unusable) for a bare answer text (module docstring)."""
    value = number_value(text)
    if value is not None:
        return normalize_number(value), None
    if looks_like_math(text.strip()):
        return read_answer(text), None
    numbers = find_numbers(text)
    if not numbers:
        return None, "has no number"
    if len(numbers) > 1:
        return None, "has several numbers"
    return normalize_number(numbers[0]), None


def _read_answer(value: Any, field: str) -> tuple[dict, str | None]:
    """Columns gold_answer, gold_rationale, n_steps from an answer value, or a drop reason."""
    unlabeled = {"gold_answer": None, "gold_rationale": None, "n_steps": None}
    if value is None:
        return unlabeled, None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return unlabeled, f"field {field!r} is neither text nor a number: {_short(value)}"
    if not isinstance(value, str):  # a numeric answer column
        if isinstance(value, float) and not math.isfinite(value):
            return unlabeled, f"field {field!r} is not a finite number: {value!r}"
        number = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)  # 0.1 is 1/10
        return {"gold_answer": normalize_number(number), "gold_rationale": None, "n_steps": None}, None
    if FINAL_ANSWER_MARKER in value:
        tail = value.rsplit(FINAL_ANSWER_MARKER, 1)[1]
        gold, problem = _gold_from_text(tail)
        if problem:
            after = f"the text after {FINAL_ANSWER_MARKER!r}"
            return unlabeled, f"field {field!r}: {after} {problem}: {_short(tail.strip())}"
        n_steps = len(split_steps(value))
        if n_steps:
            return {"gold_answer": gold, "gold_rationale": value, "n_steps": n_steps}, None
        return {"gold_answer": gold, "gold_rationale": None, "n_steps": None}, None
    gold, problem = _gold_from_text(value)
    if problem:
        return unlabeled, f"field {field!r} {problem}: {_short(value)}"
    return {"gold_answer": gold, "gold_rationale": None, "n_steps": None}, None


def _is_math(record: Any, question_field: str) -> bool:
    return isinstance(record, dict) and ("solution" in record or (
        question_field == "question" and "question" not in record and "problem" in record))


def _read_math(record: dict, field: str) -> tuple[dict, str | None]:
    """Columns from a MATH record: the answer field read as LaTeX, else the solution's final box; the solution
    as the rationale."""
    unlabeled = {"gold_answer": None, "gold_rationale": None, "n_steps": None}
    solution, value = record.get("solution"), record.get(field)
    if solution is not None and not isinstance(solution, str):
        return unlabeled, f"field 'solution' is not text: {_short(solution)}"
    if isinstance(value, str):
        gold = read_answer(value)
    elif value is None:
        gold = None
    else:  # a number, or something that is not an answer
        columns, problem = _read_answer(value, field)
        if problem:
            return unlabeled, problem
        gold = columns["gold_answer"]
    if gold is None and solution:
        extraction = extract_answer(solution)
        if extraction.source not in ("hashes", "boxed"):
            return unlabeled, f"field 'solution' has no \\boxed{{}} answer: {_short(solution[-_REPR_LIMIT:])}"
        gold = extraction.answer
    n_steps = len(split_steps(solution)) if solution else 0
    return {"gold_answer": gold, "gold_rationale": solution or None, "n_steps": n_steps or None}, None


def dropped_path(problems_path: str | os.PathLike) -> Path:
    """Where `factory problems` writes a problems file's dropped records by default: ``NAME.dropped.parquet``."""
    path = Path(problems_path)
    return path.with_name(path.stem + ".dropped.parquet")


def unknown_problem(source: str, row: int, problem_id: str, problems_source: str | None = None) -> ValueError:
    """The error for a row whose problem_id is not in the problems file: file, row and field on one line,
    and, when `factory problems` dropped that problem (its dropped file next to the problems file), why.

    `row` is the 0-based index of the row; the message numbers rows from 1, as every message does."""
    message = f"{source}: row {row + 1} field 'problem_id': {problem_id!r} is not in the problems file"
    if problems_source is None:
        return ValueError(message)
    message += f" {problems_source}"
    dropped = dropped_path(problems_source)
    if dropped.is_file():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(dropped, columns=["row_id", "filter", "reason"])
        rows = table.filter(pc.equal(table.column("row_id"), problem_id)).to_pylist()
        if rows:
            message += f" (factory problems dropped it, filter {rows[0]['filter']}: {rows[0]['reason']})"
    return ValueError(message)


def _record_json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _map_records(
    records: Iterable[tuple[str, dict, str]],
    *,
    origin: str,
    label: str,
    source: str,
    question_field: str,
    answer_field: str,
    id_field: str | None,
) -> tuple[list[dict], list[dict]]:
    """Map `(where, record, split)` triples ("line 3", {...}, "train") to problems and drops.

    `origin` (the path as given) names the source in errors; `label` (a file
    name or dataset id, never a machine path) names it in drop reasons, which are data.
    """
    problems: list[dict] = []
    dropped: list[dict] = []
    first_seen: dict[str, str] = {}
    for where, record, split in records:
        if not isinstance(record, dict):
            raise ProblemSourceError(
                f"{origin}: {where}: expected a JSON object with field {question_field!r}, "
                f"got {type(record).__name__}"
            )
        math = _is_math(record, question_field)
        field = "problem" if math and question_field not in record else question_field
        question = record.get(field)
        if question is None:
            raise ProblemSourceError(f"{origin}: {where}: field {field!r} is missing or null")
        if not isinstance(question, str):
            raise ProblemSourceError(f"{origin}: {where}: field {field!r} must be a string, got {_short(question)}")
        if not question.strip():
            raise ProblemSourceError(f"{origin}: {where}: field {field!r} is empty")
        raw_id = record.get(id_field) if id_field else None
        if raw_id is not None:
            problem_id = str(raw_id)
            if not problem_id.strip():
                raise ProblemSourceError(f"{origin}: {where}: field {id_field!r} is empty")
        else:
            problem_id = content_id("problem", question)

        def drop(filter_name: str, reason: str) -> None:
            dropped.append(
                {
                    "row_id": problem_id,
                    "table": "problems",
                    "stage": STAGE,
                    "filter": filter_name,
                    "reason": f"{label} {where}: {reason}",
                    "row": _record_json(record),
                }
            )

        if problem_id in first_seen:
            drop("duplicate", f"duplicate of {first_seen[problem_id]} (problem_id {problem_id})")
            continue
        if math:
            gold, problem = _read_math(record, answer_field)
        else:
            gold, problem = _read_answer(record.get(answer_field), answer_field)
        if problem:
            drop("answer", problem)
            continue
        first_seen[problem_id] = where
        problems.append(
            {
                "problem_id": problem_id,
                "question": question,
                **gold,
                "source": source,
                "split": split,
            }
        )
    # the declared column order, exactly
    order = ("problem_id", "question", "gold_answer", "gold_rationale", "source", "split", "n_steps")
    return [{name: row[name] for name in order} for row in problems], dropped


# --- JSONL -------------------------------------------------------------------


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such problems file: {path}")


def _jsonl_records(path: Path, split: str) -> Iterator[tuple[str, Any, str]]:
    _check_exists(path)
    if path.is_dir():
        raise ProblemSourceError(f"{path}: is a folder, expected a JSONL file of problems")
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ProblemSourceError(f"{path}: line {lineno}: not UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProblemSourceError(
                    f"{path}: line {lineno}: malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            yield f"line {lineno}", record, split


def _read_json(path: Path) -> list | None:
    """The records of a JSON file (an array of them, or one); None if it holds one object per line instead."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ProblemSourceError(f"{path}: line {line}: not UTF-8 ({error.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON lines in a .json file
            return None
        raise ProblemSourceError(
            f"{path}: malformed JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    return data if isinstance(data, list) else [data]


def _json_records(path: Path, split: str) -> Iterator[tuple[str, Any, str]]:
    """Records of a `.json` file, or of every `.json` file under a folder (MATH as released: a problem per
    file), named by their file relative to the folder."""
    files = sorted(file for file in path.rglob("*.json") if file.is_file()) if path.is_dir() else [path]
    if not files:
        raise ProblemSourceError(f"{path}: no .json files in this folder")
    for file in files:
        name = f"{file.relative_to(path)} " if path.is_dir() else ""
        records = _read_json(file)
        if records is None:
            yield from ((name + where, record, split) for where, record, _ in _jsonl_records(file, split))
        elif len(records) == 1 and name:
            yield name.strip(), records[0], split
        else:
            yield from ((f"{name}record {index}", record, split) for index, record in enumerate(records, 1))


def _load_jsonl_file(
    path: str | os.PathLike,
    *,
    source: str,
    split: str,
    question_field: str,
    answer_field: str,
    id_field: str | None,
) -> tuple[list[dict], list[dict]]:
    path = Path(path)
    _check_exists(path)
    json_records = path.is_dir() or path.suffix == ".json"
    return _not_empty(path, _map_records(
        (_json_records if json_records else _jsonl_records)(path, split),
        origin=str(path),
        label=path.name,
        source=source,
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
    ))


def _not_empty(path: Path, loaded: tuple[list[dict], list[dict]]) -> tuple[list[dict], list[dict]]:
    """A file source with no records at all (empty, or only blank lines) is an error, not an empty table."""
    if not loaded[0] and not loaded[1]:
        raise ProblemSourceError(f"{path}: no problems in this file (it is empty)")
    return loaded


def load_jsonl(
    path: str,
    *,
    split: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = "id",
) -> tuple[list[dict], list[dict]]:
    """Problems from a JSON-lines file: one object per line, blank lines skipped.

    Also a ``.json`` file (an array of objects, or one object) and a folder of
    them, read recursively in name order: MATH as released (``MATH/test``, a
    problem per file; drop reasons name the file). `split` labels every row
    (default 'train'); source is ``jsonl:<file or folder name>``.
    """
    path = Path(path)
    return _load_jsonl_file(
        path,
        source=f"jsonl:{path.name}",
        split=split or "train",
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
    )


# --- datasets (Hub or a local save_to_disk folder) ------------------------------


def _split_label(split: str) -> str:
    """'train[:100]' -> 'train' (a slice of a split is still that split)."""
    return split.split("[", 1)[0].strip() or split


def _dataset_records(datasets_by_split: list[tuple[str, Any]]) -> Iterator[tuple[str, dict, str]]:
    for split, dataset in datasets_by_split:
        for index, record in enumerate(dataset, 1):
            yield f"split {split!r} row {index}", record, split


def _check_columns(datasets_by_split: list[tuple[str, Any]], origin: str, question_field: str) -> None:
    for split, dataset in datasets_by_split:
        columns = list(getattr(dataset, "column_names", None) or [])
        if columns and question_field not in columns and not _is_math(dict.fromkeys(columns), question_field):
            raise ProblemSourceError(
                f"{origin}: split {split!r}: no field {question_field!r} (has: {', '.join(columns)})"
            )


def _open_dataset(name: str, *, split: str | None, config: str | None, default_split: str | None):
    """[(split label, Dataset)] from a local save_to_disk folder or `datasets.load_dataset`."""
    from factory.modeling import looks_local

    if looks_local(name) and not Path(name).exists():
        raise FileNotFoundError(f"no such problems file or dataset folder: {name}")
    import datasets  # heavy: imported only when a dataset is loaded

    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split is None:
                return list(loaded.items())
            if split not in loaded:
                raise ProblemSourceError(f"{name}: no split {split!r} (has: {', '.join(loaded)})")
            return [(split, loaded[split])]
        return [(_split_label(split or default_split or "train"), loaded)]
    split = split or default_split
    loaded = datasets.load_dataset(name, config, split=split)
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        return list(loaded.items())
    return [(_split_label(split), loaded)]


def _load_dataset(
    name: str,
    *,
    split: str | None,
    config: str | None,
    default_split: str | None,
    source: str,
    question_field: str,
    answer_field: str,
    id_field: str | None,
) -> tuple[list[dict], list[dict]]:
    by_split = _open_dataset(name, split=split, config=config, default_split=default_split)
    _check_columns(by_split, name, question_field)
    return _map_records(
        _dataset_records(by_split),
        origin=name,
        label=_source_name(name),
        source=source,
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
    )


def _source_name(name: str) -> str:
    """A Hub id as it is; a local folder by its name only (no machine paths in data)."""
    return Path(name).resolve().name if Path(name).is_dir() else name


def load_hf(
    name: str,
    *,
    split: str | None = None,
    config: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """Problems from a Hugging Face dataset: a Hub id, or a folder saved with `save_to_disk`.

    `split=None` loads every split and labels each row with its own split
    name. `id_field` is off by default: a dataset's ids are often only unique
    within a split, and content ids are stable anyway.
    """
    source = f"hf:{_source_name(name)}" + (f":{config}" if config else "")
    return _load_dataset(
        name,
        split=split,
        config=config,
        default_split=None,
        source=source,
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
    )


# --- GSM8K -------------------------------------------------------------------


def _is_file_spec(spec: str) -> bool:
    path = Path(spec)
    return path.is_file() or (not path.is_dir() and path.suffix in (".jsonl", ".json"))


def load_gsm8k(
    spec: str, *, split: str | None = None, config: str | None = None
) -> tuple[list[dict], list[dict]]:
    """GSM8K from an original JSONL file (``test.jsonl``), a saved folder, or the Hub (``openai/gsm8k``).

    `split` labels the rows of a file (default: the file stem when it is
    'train' or 'test', else 'train') and selects the split on the Hub
    (default 'train'; `config` default 'main').
    """
    if _is_file_spec(spec):
        path = Path(spec)
        label = split or (path.stem if path.stem in _GSM8K_SPLITS else "train")
        return _load_jsonl_file(
            path,
            source=f"gsm8k:{path.name}",
            split=label,
            question_field="question",
            answer_field="answer",
            id_field=None,
        )
    return _load_dataset(
        spec,
        split=split,
        config=None if Path(spec).is_dir() else (config or "main"),
        default_split="train",
        source=f"gsm8k:{_source_name(spec)}",
        question_field="question",
        answer_field="answer",
        id_field=None,
    )

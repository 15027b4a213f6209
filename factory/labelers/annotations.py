"""Calculator labeler: check every `<<lhs=rhs>>` annotation after the fact, and count the steps.

`calculator_labels` is the reference, one text at a time
(`factory.calculator.check_annotations`, `factory.reasoning_steps.split_steps`).
`calculator_columns` gives the same values for a whole Arrow column:

- steps: lines are found in the text's bytes; a text with a control byte other
  than newline, a non-ASCII byte or a line that starts with a space (where
  `str.strip` has its own idea of whitespace) is counted by `split_steps`;
- annotations: the text is split at `<<`; an annotation `a op b = r` of plain
  decimals (no comma or leading zero, a sign only on r, op one of `+ - * / x`,
  spaces allowed around op and `=`) is checked in floating point when the
  verdict is clear by far more than the rounding error, and by
  `check_annotations` on that one annotation otherwise (a tie at a rounding
  boundary), as is every other annotation (cached: they repeat). A text with
  `<<<` is checked whole by `check_annotations`.

>>> calculator_labels(["a <<2+3=5>>5\\nb <<5*4=21>>21\\n#### 21"])["first_error_step"]
[1]
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.calculator import check_annotations
from factory.arrow import in_chunks, newlines_and_unusual_rows, utf8_buffers
from factory.reasoning_steps import split_steps, step_index_at

COLUMNS = ("n_steps", "calc_total", "calc_wrong", "calc_invalid", "first_error_step")

_NUMBER = r"(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,6})?"
_PLAIN_ANNOTATION = (rf"^ *(?P<a>{_NUMBER}) *(?P<op>[-+*/xX]) *(?P<b>{_NUMBER})"
                     r" *= *(?P<r>-?(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,6})?) *>>")
_ANY_ANNOTATION = r"^(?P<inner>[^<>]*?)>>"  # factory.calculator.ANNOTATION_PATTERN, after its `<<`
_HASH = ord("#")


def calculator_labels(texts: list[str]) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for text in texts:
        check = check_annotations(text)
        columns["n_steps"].append(len(split_steps(text)))
        columns["calc_total"].append(check.total)
        columns["calc_wrong"].append(check.wrong)
        columns["calc_invalid"].append(check.invalid)
        columns["first_error_step"].append(check.first_error_step)
    return columns


def calculator_columns(texts: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
    """`calculator_labels` of a string column, as Arrow arrays."""
    if texts.null_count:  # not text: the reference says what is wrong
        return {name: pa.array(values, pa.int32()) for name, values in calculator_labels(texts.to_pylist()).items()}
    columns = in_chunks(_chunk_columns, texts)
    error = columns.pop("first_error_step")
    result = {name: pa.array(values, pa.int32()) for name, values in columns.items()}
    result["first_error_step"] = pa.array(error, pa.int32(), mask=error < 0)
    return result


def _chunk_columns(texts: pa.Array) -> dict[str, np.ndarray]:
    if not len(texts):
        return {name: np.zeros(0, np.int64) for name in COLUMNS}
    lines = _Lines(texts)
    total, wrong, invalid, first_error_step, whole = _annotation_counts(texts, lines)
    for row in np.flatnonzero(whole):
        check = check_annotations(texts[int(row)].as_py())
        total[row], wrong[row], invalid[row] = check.total, check.wrong, check.invalid
        first_error_step[row] = -1 if check.first_error_step is None else check.first_error_step
    return {"n_steps": lines.n_steps, "calc_total": total, "calc_wrong": wrong, "calc_invalid": invalid,
            "first_error_step": first_error_step}


class _Lines:
    """The lines of each text (as `str.split("\\n")`), which are steps, and the step at a byte position."""

    def __init__(self, texts: pa.Array):
        self.texts = texts
        self.offsets, self.data = utf8_buffers(texts)
        n, data = len(texts), self.data
        newline, self.unusual = newlines_and_unusual_rows(texts)
        newlines_before = np.searchsorted(newline, self.offsets)
        # Line starts in text order: row r's first line, then one after each of its newlines.
        self.first_line = np.arange(n) + newlines_before[:-1]
        starts = np.empty(n + len(newline), np.int64)
        starts[self.first_line] = self.offsets[:-1]
        starts[np.arange(len(newline)) + np.repeat(np.arange(n), np.diff(newlines_before)) + 1] = newline + 1
        ends = np.r_[starts[1:] - 1, 0]
        ends[np.r_[self.first_line[1:], len(starts)] - 1] = self.offsets[1:]
        self.starts = starts
        nonempty = np.flatnonzero(starts < ends)
        first_byte = data[starts[nonempty]]
        hashes = nonempty[first_byte == _HASH]
        for k in (1, 2, 3):
            inside = hashes[starts[hashes] + k < ends[hashes]]
            hashes = inside[data[starts[inside] + k] == _HASH]
        self.is_step = np.zeros(len(starts), bool)
        self.is_step[nonempty] = True
        self.is_step[hashes] = False
        self.cumulative = np.r_[0, np.cumsum(self.is_step)]
        indented = nonempty[first_byte == ord(" ")]
        self.unusual[np.searchsorted(self.first_line, indented, side="right") - 1] = True
        self.n_steps = np.add.reduceat(self.is_step.astype(np.int64), self.first_line) if n else np.zeros(0, int)
        for row in np.flatnonzero(self.unusual):
            self.n_steps[row] = len(split_steps(texts[int(row)].as_py()))

    def step_at(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """`step_index_at(text, offset)` for byte `positions` (into the buffer) of texts `rows`."""
        line = np.searchsorted(self.starts, positions, side="right") - 1
        steps = self.cumulative[line] - self.cumulative[self.first_line[rows]]
        for index in np.flatnonzero(self.unusual[rows]):
            row, position = int(rows[index]), int(positions[index])
            offset = len(self.data[self.offsets[row]: position].tobytes().decode())
            steps[index] = step_index_at(self.texts[row].as_py(), offset)
        return steps


def _annotation_counts(texts: pa.Array, lines: _Lines) -> tuple[np.ndarray, ...]:
    """(total, wrong, invalid, first_error_step or -1, rows to check whole) per row."""
    n = len(texts)
    pieces = pc.split_pattern(texts, "<<")  # piece k >= 1 follows the k-th `<<`
    per_row = pc.list_value_length(pieces).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(pieces)
    row = np.repeat(np.arange(n), per_row)
    first_piece = np.r_[0, np.cumsum(per_row)[:-1]]
    index = np.arange(len(flat)) - first_piece[row]
    length = pc.binary_length(flat).to_numpy(zero_copy_only=False).astype(np.int64)
    before = np.cumsum(length) - length
    # Buffer position of the `<<` before piece k: the row start, the pieces before it, and k - 1 separators.
    position = lines.offsets[row] + before - before[first_piece[row]] + 2 * (index - 1)
    candidate = np.flatnonzero(index >= 1)
    after = flat.take(pa.array(candidate))
    whole = np.zeros(n, bool)
    whole[row[candidate[pc.starts_with(after, "<").to_numpy(zero_copy_only=False)]]] = True  # `<<<`: overlapping
    verdict = np.full(len(candidate), -2, np.int8)  # 1 ok, 0 wrong, -1 invalid, -2 not an annotation
    plain = pc.extract_regex(after, _PLAIN_ANNOTATION)
    is_plain = plain.is_valid().to_numpy(zero_copy_only=False)
    verdict[is_plain] = _plain_verdicts(plain.filter(plain.is_valid()), after.filter(plain.is_valid()))
    others = np.flatnonzero(~is_plain)
    inner = pc.extract_regex(after.take(pa.array(others)), _ANY_ANNOTATION)
    for k, value in zip(others, inner.to_pylist(), strict=True):
        if value is not None:
            verdict[k] = _VERDICT[_annotation_ok(value["inner"])]
    annotation = verdict > -2
    rows, verdict, position = row[candidate][annotation], verdict[annotation], position[candidate][annotation]
    total = np.bincount(rows, minlength=n)
    wrong = np.bincount(rows[verdict == 0], minlength=n)
    invalid = np.bincount(rows[verdict == -1], minlength=n)
    first_error_step = np.full(n, -1, np.int64)
    wrong_rows, first = np.unique(rows[verdict == 0], return_index=True)
    first_error_step[wrong_rows] = lines.step_at(wrong_rows, position[verdict == 0][first])
    return total, wrong, invalid, first_error_step, whole


_VERDICT = {True: 1, False: 0, None: -1}


@functools.lru_cache(maxsize=1 << 16)
def _annotation_ok(inner: str) -> bool | None:
    """`Annotation.ok` of `<<inner>>`, by the reference checker."""
    return check_annotations(f"<<{inner}>>").annotations[0].ok


def _plain_verdicts(plain: pa.StructArray, pieces: pa.Array) -> np.ndarray:
    """1 / 0 / -1 for `a op b = r` annotations: decided in floating point, or by the reference near a boundary.

    The reference accepts r when |lhs - r| is within the largest of 1e-6 relative, half a
    millionth (what the decoder writes, rounded to 6 decimals) and, for r with k decimals, half
    of 10^-k. Inputs have at most 15 significant digits, so the float error is bounded by E.
    """
    a, b, r = (pc.cast(plain.field(name), pa.float64()).to_numpy() for name in ("a", "b", "r"))
    plus, minus, divide = (pc.equal(plain.field("op"), op).to_numpy(zero_copy_only=False) for op in "+-/")
    r_text = plain.field("r")
    point = pc.find_substring(r_text, ".").to_numpy()
    decimals = np.where(point >= 0, pc.utf8_length(r_text).to_numpy() - point - 1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):  # x/0 is refused below
        value = np.select([plus, minus, divide], [a + b, a - b, a / b], a * b)  # * and x: times
        distance = np.abs(value - r)
        tolerance = np.maximum.reduce([1e-6 * np.maximum(np.abs(value), np.abs(r)), np.full(len(a), 5e-7),
                                       np.where(decimals > 0, 0.5 * 10.0 ** -decimals, 0.0)])
        error = 2.0**-50 * (np.abs(a) + np.abs(b) + np.abs(value) + np.abs(r)) + 1e-300
        verdict = np.where(distance + error < tolerance, 1,
                           np.where(distance - error > tolerance, 0, -2)).astype(np.int8)
    verdict[divide & (b == 0)] = -1  # division by zero: the lhs is refused
    for k in np.flatnonzero(verdict == -2):
        verdict[k] = _VERDICT[_annotation_ok(pieces[int(k)].as_py().split(">>", 1)[0])]
    return verdict

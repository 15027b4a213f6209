"""Generic Arrow helpers shared by the columnar fast paths: labelers, filters and the bulk pair rule.

- The UTF-8 bytes of a string array and work in threaded chunks: the fast
  labelers and the bulk word sets look at every byte of a million texts
  (which rows hold a byte only the Python reference reads right, where lines
  start); numpy over the array's own buffers does that without copying a
  string. Arrow's kernels and numpy release the GIL, so chunks run on threads.
- `canonical_json_rows`: `factory.ids.canonical_json` of every row, column by
  column. Dropped rows keep the whole row as canonical JSON (sorted keys, no
  spaces, non-ASCII as is). Encoding a hundred thousand rows one dict at a
  time takes seconds, so each column is encoded at once and the pieces are
  joined: strings escaped by Arrow's replace kernels (newlines; a string with
  a quote, a backslash or another control character by `json.dumps`; short
  strings once per distinct value), integers cast, booleans spelled, floats by
  `json.dumps` of each distinct value (by bit pattern, so -0.0 stays -0.0), and
  any other type by `json.dumps` of each value, as `canonical_json` would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.ids import canonical_json

CHUNK_ROWS = 65_536


def threads() -> int:
    """Worker threads: the CPUs this process may use (at most 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 8))


def in_chunks(function: Callable[..., dict], *columns: pa.Array | pa.ChunkedArray) -> dict:
    """`function(*slices)` over aligned slices of `columns` on threads; its columns (numpy or Arrow) concatenated.

    Slices follow the first column's chunks, so its texts are never copied.
    """
    first = columns[0]
    arrays = first.chunks if isinstance(first, pa.ChunkedArray) else [first]
    bounds, start = [], 0
    for array in arrays:
        bounds += [(start + lo, min(CHUNK_ROWS, len(array) - lo)) for lo in range(0, len(array), CHUNK_ROWS)]
        start += len(array)

    def run(bound: tuple[int, int]) -> dict:
        return function(*(as_array(column.slice(*bound)) for column in columns))

    with ThreadPoolExecutor(threads()) as pool:
        parts = list(pool.map(run, bounds or [(0, 0)]))
    concat = pa.concat_arrays if isinstance(next(iter(parts[0].values()), None), pa.Array) else np.concatenate
    return {name: concat([part[name] for part in parts]) for name in parts[0]}


def as_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array; copied only when the column has several chunks."""
    if isinstance(column, pa.Array):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def utf8_buffers(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data): text i is `data[offsets[i]:offsets[i + 1]]`; `offsets` has len(texts) + 1 entries.

    Zero-copy views of `texts` (a string or large_string array; a null reads as empty).
    """
    offset_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], offset_type)[texts.offset: texts.offset + len(texts) + 1]
    data = np.frombuffer(texts.buffers()[2] or b"", np.uint8)
    return offsets.astype(np.int64), data


def rows_of(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The row of each byte position (positions into `data`, as `utf8_buffers` gives it)."""
    return np.searchsorted(offsets, positions, side="right") - 1


def unusual_rows(texts: pa.Array) -> np.ndarray:
    """Boolean per row: does the text hold a non-ASCII byte, or a control byte other than newline?

    Such texts (tabs, CR, \\x1c-\\x1f, non-breaking spaces, ...) are where Python's notion of
    whitespace, word characters and case can differ from Arrow's ASCII kernels and RE2's.
    """
    return newlines_and_unusual_rows(texts)[1]


def newlines_and_unusual_rows(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(buffer positions of the newlines, `unusual_rows`), from one scan of the bytes."""
    offsets, data = utf8_buffers(texts)
    flags = np.zeros(len(texts), bool)
    if not len(texts):
        return np.zeros(0, np.int64), flags
    control = np.flatnonzero(data[offsets[0]: offsets[-1]].view(np.int8) < 0x20) + offsets[0]
    newline = data[control] == 0x0A
    flags[rows_of(control[~newline], offsets)] = True
    return control[newline], flags


# What json.dumps escapes besides newline: quote, backslash and the other control characters.
_RARE_ESCAPES = r'["\\\x00-\x09\x0b-\x1f]'


def canonical_json_rows(table: pa.Table) -> pa.Array:
    """One string per row: `canonical_json(row)` for each row of `table.to_pylist()`."""
    parts: list[pa.Array | str] = []
    for index, name in enumerate(sorted(table.column_names)):
        parts += [("{" if index == 0 else ",") + json.dumps(name, ensure_ascii=False) + ":",
                  _encode(table.column(name).combine_chunks())]
    if not parts:
        return pa.array(["{}"] * table.num_rows, pa.string())
    return pc.binary_join_element_wise(*parts, "}", "")


def _encode(column: pa.Array) -> pa.Array:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = column.cast(pa.string())
        if column.nbytes > 64 * len(column):  # long strings (texts): mostly distinct
            encoded = json_strings(column)
        else:  # ids of a model, statuses: each distinct value encoded once
            distinct = pc.dictionary_encode(column)
            encoded = json_strings(distinct.dictionary).take(distinct.indices)
    elif pa.types.is_integer(kind):
        encoded = column.cast(pa.string())
    elif pa.types.is_boolean(kind):
        encoded = pc.if_else(column, "true", "false")
    elif pa.types.is_floating(kind):
        encoded = _by_distinct_bits(column.cast(pa.float64()))
    else:
        encoded = pa.array([None if value is None else canonical_json(value) for value in column.to_pylist()],
                           pa.string())
    return encoded.fill_null("null")


def json_strings(column: pa.Array) -> pa.Array:
    """`json.dumps(value, ensure_ascii=False)` of each string (null stays null)."""
    escaped = column
    if pc.any(pc.match_substring(column, "\n")).as_py():
        escaped = pc.replace_substring(column, "\n", "\\n")
    escaped = pc.binary_join_element_wise('"', escaped, '"', "")
    rare = pc.fill_null(pc.match_substring_regex(column, _RARE_ESCAPES), False)
    if pc.any(rare).as_py():
        replacements = [json.dumps(value, ensure_ascii=False) for value in column.filter(rare).to_pylist()]
        escaped = pc.replace_with_mask(escaped, rare, pa.array(replacements, pa.string()))
    return escaped


def _by_distinct_bits(column: pa.Array) -> pa.Array:
    values = column.fill_null(0.0).to_numpy(zero_copy_only=False)
    bits, index = np.unique(values.view(np.int64), return_inverse=True)
    texts = pa.array([json.dumps(float(value)) for value in bits.view(np.float64)], pa.string())
    return pc.if_else(column.is_valid(), texts.take(pa.array(index.reshape(-1))), pa.scalar(None, pa.string()))

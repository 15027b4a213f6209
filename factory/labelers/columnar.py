"""Helpers of the columnar fast paths: the UTF-8 bytes of a string array, and work in threaded chunks.

The fast labelers and the bulk word sets look at every byte of a million texts
(which rows hold a byte only the Python reference reads right, where lines
start): numpy over the array's own buffers does that without copying a string.
Arrow's kernels and numpy release the GIL, so chunks of rows run on threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

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

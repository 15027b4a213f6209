"""Token-set Jaccard in bulk, for texts compared only within their group (a problem).

`word_bitsets(texts, groups)` writes each text's word set (`factory.text.word_set`)
as a bitset over the distinct words of its group, so that `jaccard(bitsets, i, j)`
for millions of pairs is a few vectorised operations. The values are exactly
`factory.text.jaccard(word_set(a), word_set(b))`: the same two integers divided
in floating point.

Words come from Arrow's ASCII kernels for texts of ASCII without control
characters but newlines, where lowercasing and splitting mean what `str.lower`
and `str.split` mean; calculator annotations are then removed from each
distinct word (an annotation lies inside one word unless it spans whitespace,
and then a word still holds `<<` after removal). Every other text (non-ASCII,
tabs, an annotation that spans whitespace) gets its words from `word_set`.
Within a chunk of whole groups, (group, word) keys numbered by first
occurrence give each group's words dense bit positions. Chunks run on a few
threads (Arrow and numpy release the GIL) and keep their hash tables small.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.arrow import as_array, threads, unusual_rows
from factory.text import word_set

CHUNK_ROWS = 8192  # rows per chunk (whole groups): small enough for cache-resident hash tables
_PAIRS_PER_BLOCK = 1 << 18
_ANNOTATION = r"<<.*?>>"  # factory.text's pattern, applied within one word (which holds no newline)


@dataclass(frozen=True)
class WordBitsets:
    """Text i's word set is bits `words[start[i] : start[i] + width[i]]`; `size[i]` words in it."""

    words: np.ndarray
    start: np.ndarray
    width: np.ndarray
    size: np.ndarray


def word_bitsets(texts: pa.Array | pa.ChunkedArray, groups: np.ndarray, only: np.ndarray | None = None) -> WordBitsets:
    """Bitsets of `texts` (no nulls); texts are only comparable with texts of the same `groups` value.

    With `only` (row numbers), the other texts are not read: they get empty sets, not to be compared.
    """
    n = len(texts)
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    if only is not None:
        wanted = np.zeros(n, bool)
        wanted[only] = True
        order = order[wanted[order]]
    ordered_groups = groups[order]
    group_starts = np.r_[np.flatnonzero(ordered_groups[1:] != ordered_groups[:-1]) + 1, len(order)]
    cuts = np.unique(np.r_[0, group_starts[np.searchsorted(group_starts, np.arange(0, len(order), CHUNK_ROWS))],
                           len(order)])
    # A chunk is whole groups; its rows in text order, which usually makes them a slice or two of `texts`.
    chunks = [np.sort(order[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    with ThreadPoolExecutor(threads()) as pool:
        parts = list(pool.map(lambda rows: _chunk_bitsets(_gather(texts, rows), groups[rows]), chunks))
    start = np.zeros(n, np.int64)
    width = np.zeros(n, np.int64)  # no words: an empty set
    size = np.zeros(n, np.int64)
    offset = 0
    for rows, (words, chunk_start, chunk_width, chunk_size) in zip(chunks, parts, strict=True):
        start[rows] = chunk_start + offset
        width[rows] = chunk_width
        size[rows] = chunk_size
        offset += len(words)
    words = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0, np.uint64)
    return WordBitsets(words, start, width, size)


def _gather(texts: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """`texts[rows]` as one array: slices where rows run consecutively (they usually do), else a take."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    if len(breaks) > 256:
        return as_array(texts.take(pa.array(rows)))
    pieces = [as_array(texts.slice(run[0], len(run))) for run in np.split(rows, breaks)]
    return pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)


def jaccard(bitsets: WordBitsets, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """`factory.text.jaccard` of texts i and j (same group), pair by pair, as float64."""
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    blocks = range(0, len(i), _PAIRS_PER_BLOCK)  # small blocks: temporaries reuse memory, and run on threads
    with ThreadPoolExecutor(threads()) as pool:
        parts = list(pool.map(lambda lo: _jaccard(bitsets, i[lo:lo + _PAIRS_PER_BLOCK], j[lo:lo + _PAIRS_PER_BLOCK]),
                              blocks))
    return np.concatenate(parts) if parts else np.zeros(0)


def _jaccard(bitsets: WordBitsets, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    width = bitsets.width[i]
    shared = np.zeros(len(i), np.int64)
    for w in range(int(width.max()) if len(i) else 0):
        wide = np.flatnonzero(width > w) if w else slice(None)
        both = bitsets.words[bitsets.start[i[wide]] + w] & bitsets.words[bitsets.start[j[wide]] + w]
        shared[wide] += np.bitwise_count(both)
    union = bitsets.size[i] + bitsets.size[j] - shared
    return np.where(union > 0, shared / np.maximum(union, 1), 1.0)  # two empty sets are identical


def _chunk_bitsets(texts: pa.Array, groups: np.ndarray) -> tuple[np.ndarray, ...]:
    """(words, start, width, size) of one chunk of texts and their groups."""
    n = len(texts)
    rows, words, vocabulary = _chunk_words(texts)
    group_ids, group_of_row = np.unique(groups, return_inverse=True)
    entry_group = group_of_row[rows]
    # Local word ids: keys (group, word) numbered in order of first occurrence are contiguous per group
    # when the entries come grouped, so a group's first key has its smallest id.
    by_group = None if np.all(entry_group[1:] >= entry_group[:-1]) else np.argsort(entry_group, kind="stable")
    grouped = entry_group if by_group is None else entry_group[by_group]
    keys = grouped * vocabulary + (words if by_group is None else words[by_group])
    encoded = pc.dictionary_encode(pa.array(keys))
    ids = encoded.indices.to_numpy()
    first_id = np.r_[ids, len(encoded.dictionary)][np.searchsorted(grouped, np.arange(len(group_ids) + 1))]
    local = (ids - first_id[grouped]).astype(np.uint64)
    if by_group is not None:
        local[by_group] = local.copy()
    group_width = np.maximum(1, (np.diff(first_id) + 63) // 64)
    width = group_width[group_of_row]
    start = np.r_[0, np.cumsum(width)[:-1]].astype(np.int64)
    bits = np.zeros(int(width.sum()), np.uint64)
    bit = np.left_shift(np.uint64(1), local & np.uint64(63))
    runs = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    run_rows = rows[runs]
    for w in range(int(group_width.max(initial=1)) if len(runs) else 0):  # bitset word w of each row
        values = bit if group_width.max() == 1 else np.where((local >> np.uint64(6)) == w, bit, np.uint64(0))
        wide = width[run_rows] > w
        bits[start[run_rows[wide]] + w] = np.bitwise_or.reduceat(values, runs)[wide]
    size = np.add.reduceat(np.bitwise_count(bits).astype(np.int64), start) if n else np.zeros(0, np.int64)
    return bits, start, width, size


def _chunk_words(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, word id) of every word occurrence, rows ascending, no empty word; and how many word ids."""
    plain = ~unusual_rows(texts)
    read = np.flatnonzero(plain).astype(np.int32)
    split = pc.ascii_split_whitespace(pc.ascii_lower(texts if plain.all() else texts.take(pa.array(read))))
    rows = np.repeat(read, pc.list_value_length(split).to_numpy(zero_copy_only=False))
    raw = pc.dictionary_encode(pc.list_flatten(split))
    raw_words, raw_ids = raw.dictionary, raw.indices.to_numpy()
    # Remove annotations word by word; a word still holding `<<` had one that spans whitespace.
    annotated = pc.match_substring(raw_words, "<<")
    if pc.any(annotated).as_py():
        removed = pc.replace_substring_regex(raw_words.filter(annotated), _ANNOTATION, "")
        raw_words = pc.replace_with_mask(raw_words, annotated, removed)
        spans = pc.match_substring(raw_words, "<<").to_numpy(zero_copy_only=False)
        if spans.any():
            plain[rows[spans[raw_ids]]] = False
            keep = plain[rows]
            rows, raw_ids = rows[keep], raw_ids[keep]
    others = np.flatnonzero(~plain)
    other_words = [sorted(word_set(texts[int(i)].as_py())) for i in others]
    vocabulary = pc.dictionary_encode(pa.concat_arrays(
        [raw_words, pa.array([w for ws in other_words for w in ws], pa.string())]))
    remap = vocabulary.indices.to_numpy()
    empty = pc.index(vocabulary.dictionary, "").as_py()
    ids = remap[: len(raw_words)][raw_ids]
    if len(others):
        rows = np.r_[rows, np.repeat(others, [len(w) for w in other_words]).astype(np.int32)]
        ids = np.r_[ids, remap[len(raw_words):]]
        order = np.argsort(rows, kind="stable")
        rows, ids = rows[order], ids[order]
    if empty >= 0:  # a word that was all annotation
        rows, ids = rows[ids != empty], ids[ids != empty]
    return rows, ids.astype(np.int64), len(vocabulary.dictionary)

"""`factory.ids.canonical_json` of every row of an Arrow table, column by column.

Dropped rows keep the whole row as canonical JSON (sorted keys, no spaces,
non-ASCII as is). Encoding a hundred thousand rows one dict at a time takes
seconds, so each column is encoded at once and the pieces are joined: strings
escaped by Arrow's replace kernels (newlines; a string with a quote, a
backslash or another control character by `json.dumps`; short strings once
per distinct value), integers cast, booleans spelled, floats by `json.dumps` of
each distinct value (by bit pattern, so -0.0 stays -0.0), and any other type
by `json.dumps` of each value, as `canonical_json` itself would.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.ids import canonical_json

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

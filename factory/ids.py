"""Stable content-hash ids and file fingerprints.

An id is a short prefix naming the kind of thing (so `factory lineage ID` knows
where to look) plus a hash of the canonical JSON of what defines it. Same
content, same id, on every machine and every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

ID_PREFIXES = {"problem": "p-", "sample": "s-", "pair": "pair-", "model": "m-", "node": "n-"}
_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the one text that is hashed."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_hash(*parts: Any, digest_size: int = 8) -> str:
    return hashlib.blake2b(canonical_json(parts).encode("utf-8"), digest_size=digest_size).hexdigest()


def content_id(kind: str, *parts: Any) -> str:
    """`content_id("problem", question)` -> 'p-3f2a…' (16 hex digits)."""
    try:
        prefix = ID_PREFIXES[kind]
    except KeyError:
        raise ValueError(f"unknown id kind {kind!r}; expected one of {sorted(ID_PREFIXES)}") from None
    return prefix + content_hash(*parts)


def file_fingerprint(path: str | Path) -> str:
    """blake2b of a file's bytes, or of a directory's files (names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()

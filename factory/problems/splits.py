"""Splits for the flywheel from the splits a dataset comes with.

The pipeline reads six splits (`train` gold rationales for the warm-up, `dev` for
model selection, `answers` final answers only as the sampling pool, `unlabeled`
questions only, `test`, `test_ood`). GSM8K and MATH come with `train` and `test`,
so `factory problems` carves the rest out of them: ``train:dev=200`` moves 200
problems of `train` to `dev`.

What a carved problem keeps follows the split's meaning: `answers` keeps the gold
answer but not the rationale, `unlabeled` keeps only the question; the gold that
a split must not see is dropped from its rows, not hidden, so no stage can read
it by accident. Which problems move is a seeded order of their problem ids, so
the same sources, carves and seed give the same table wherever they run, and a
problem never depends on where it stood in the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["Carve", "CarveError", "carve_splits", "parse_carve"]

_CARVE = re.compile(r"(?P<source>[\w.-]+):(?P<target>[\w.-]+)=(?P<count>\d+)")
# What each split may hold beyond the question (None: the column is cleared).
_STRIPPED = {
    "answers": ("gold_rationale", "n_steps"),
    "unlabeled": ("gold_answer", "gold_rationale", "n_steps"),
}


class CarveError(ValueError):
    """A carve cannot be done as asked (unknown split, too few problems, bad spelling)."""


@dataclass(frozen=True)
class Carve:
    """Move `count` problems from split `source` to split `target`."""

    source: str
    target: str
    count: int


def parse_carve(text: str) -> Carve:
    """``train:dev=200`` -> Carve('train', 'dev', 200)."""
    match = _CARVE.fullmatch(text.strip())
    if match is None:
        raise CarveError(f"--carve {text!r}: expected FROM:TO=N, e.g. train:dev=200")
    if match["source"] == match["target"]:
        raise CarveError(f"--carve {text!r}: a split cannot be carved into itself")
    return Carve(match["source"], match["target"], int(match["count"]))


def _order_key(problem_id: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}\0{problem_id}".encode(), digest_size=16).digest()


def carve_splits(problems: list[dict], carves: list[Carve], *, seed: int = 0) -> list[dict]:
    """The problems with each carve applied in order; the rows keep their original order.

    Raises CarveError, before anything moves, when a split holds fewer problems
    than a carve asks of it (counting what earlier carves moved).
    """
    split_of = [p["split"] for p in problems]
    for carve in carves:
        rows = [i for i, split in enumerate(split_of) if split == carve.source]
        if len(rows) < carve.count:
            have = sorted(set(split_of))
            raise CarveError(f"--carve {carve.source}:{carve.target}={carve.count}: split {carve.source!r} has "
                             f"{len(rows)} problems (splits: {', '.join(have) or 'none'})")
        rows.sort(key=lambda i: _order_key(problems[i]["problem_id"], seed))
        for i in rows[: carve.count]:
            split_of[i] = carve.target
    carved = []
    for problem, split in zip(problems, split_of, strict=True):
        row = dict(problem, split=split)
        if split != problem["split"]:
            for column in _STRIPPED.get(split, ()):
                row[column] = None
        carved.append(row)
    return carved

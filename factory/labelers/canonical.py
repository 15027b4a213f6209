r"""`answer_canonical`: one text per equivalent answer, so that votes, audits and pairs compare answers with `=`.

- A number keeps its normalised text (`normalize_number`), and so does a
  symbolic answer that math-verify reads as a rational number: ``\frac12``,
  ``1/2`` and ``0.5`` are all ``0.5``. These texts mean the same in every
  problem. Numbers compare exactly, as votes always did: ``1/3`` and
  ``0.333333`` stay two texts, although `correct` accepts either against the other.
- An answer judged equivalent to its problem's gold (`correct`) takes the
  gold's canonical text, unless it is a rational number and so is the gold
  (then its own exact text, as above).
- Any other answer is clustered within its problem: its distinct answers in
  sorted order, each compared by math-verify with the representatives found so
  far (they are not equivalent to the gold, or they would be `correct`); it
  takes the first equivalent one's text, else it becomes a representative with
  its own. A comparison that runs out of time counts as not equivalent.

So within a problem (where votes, audits and pairs compare answers) equal
`answer_canonical` means equivalent, as math-verify judges it (greedily: its
verdict need not be transitive); across problems it means equal only for
numbers. Numbers-only labels never start math-verify: their canonical text is
their answer, picked out with one regular expression over the column.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from factory.answers import normalize_number, number_value
from factory.arrow import as_array
from factory.labelers.symbolic import TIMEOUT, default_verifier

# What normalize_number writes: an integer, a terminating decimal, or p/q.
_NUMBER_TEXT = r"^-?[0-9]+(?:\.[0-9]+)?$|^-?[0-9]+/[0-9]+$"


def canonical_column(problem_ids: pa.Array | pa.ChunkedArray, answers: pa.Array, golds: pa.Array | pa.ChunkedArray,
                     correct: pa.Array, *, verifier=None) -> pa.Array:
    """`answer_canonical` of labels' columns (golds null where gold was not read)."""
    answers, golds = as_array(answers), as_array(golds)
    numeric = pc.match_substring_regex(answers, _NUMBER_TEXT).fill_null(False)
    plain_gold = pc.match_substring_regex(golds, _NUMBER_TEXT).fill_null(True)
    rows = pc.and_(answers.is_valid(), pc.or_(pc.invert(numeric), pc.and_(correct.fill_null(False),
                                                                          pc.invert(plain_gold))))
    canonical = pc.if_else(numeric, answers, pa.scalar(None, pa.string()))
    if not pc.any(rows).as_py():
        return canonical
    take = pc.indices_nonzero(rows)
    values = canonical_answers(as_array(problem_ids).take(take).to_pylist(), answers.take(take).to_pylist(),
                               golds.take(take).to_pylist(), correct.take(take).to_pylist(), verifier=verifier)
    return pc.replace_with_mask(canonical, rows, pa.array(values, pa.string()))


def canonical_answers(problem_ids: list[str], answers: list[str | None], golds: list[str | None],
                      correct: list[bool | None], *, verifier=None) -> list[str | None]:
    """The per-row rule (module docstring); every non-rational answer of a problem must be among the rows."""
    verifier = verifier or default_verifier()
    symbolic = sorted({text for text in answers + golds if text is not None and number_value(text) is None})
    rational = {text: key for text, key in zip(symbolic, verifier.rational(symbolic)) if key not in (None, TIMEOUT)}

    def number(text: str | None) -> str | None:
        if text is None:
            return None
        value = number_value(text)
        return normalize_number(value) if value is not None else rational.get(text)

    canonical: list[str | None] = [None] * len(answers)
    clustered: dict[str, set[str]] = {}
    for row, (problem_id, answer, gold, right) in enumerate(zip(problem_ids, answers, golds, correct, strict=True)):
        if answer is None:
            continue
        gold_number, answer_number = number(gold), number(answer)
        if right and gold_number is None:
            canonical[row] = gold.strip()
        elif answer_number is not None or right:
            canonical[row] = answer_number or gold_number
        else:
            clustered.setdefault(problem_id, set()).add(answer)
    representative = _clusters({problem: sorted(texts) for problem, texts in clustered.items()}, verifier)
    for row, (problem_id, answer) in enumerate(zip(problem_ids, answers)):
        if canonical[row] is None and answer is not None:
            canonical[row] = representative[problem_id, answer].strip()
    return canonical


def _clusters(texts: dict[str, list[str]], verifier) -> dict[tuple[str, str], str]:
    """(problem, answer) -> its representative: each problem's next answer against its representatives so far,
    all problems in one batch per round."""
    representatives: dict[str, list[str]] = {problem: [] for problem in texts}
    chosen: dict[tuple[str, str], str] = {}
    position = dict.fromkeys(texts, 0)
    while True:
        asked = []
        for problem, answers in texts.items():
            while position[problem] < len(answers) and not representatives[problem]:
                representatives[problem].append(answers[position[problem]])  # the first answer: nothing to compare
                chosen[problem, answers[position[problem]]] = answers[position[problem]]
                position[problem] += 1
            if position[problem] < len(answers):
                asked.append((problem, answers[position[problem]]))
        if not asked:
            return chosen
        pairs = [(representative, answer) for problem, answer in asked for representative in representatives[problem]]
        verdicts = iter(verifier.equivalent(pairs))
        for problem, answer in asked:
            same = [representative for representative in representatives[problem] if next(verdicts) is True]
            if not same:
                representatives[problem].append(answer)
            chosen[problem, answer] = same[0] if same else answer
            position[problem] += 1

"""Gold-answer labeler: extract each sample's final answer and judge it against gold.

Contract (as TRL's reward functions): columns in, one value per row out, and
`None` where there is nothing to judge against, never a silent False.
`gold_labels` is the reference, one row at a time; `gold_columns` gives the
same values for whole Arrow columns. A text that ends with a line `#### N`
(N a plain decimal, maybe with thousands commas, a `$`, or after it `%` or
a word of two letters or more, as GSM8K writes it) has answer N, source
`hashes`. A text of printable ASCII of more than one line with no marker of
the other rules (`####`, `boxed`, `fbox`, `answer is`, a line `Answer:`,
LaTeX) whose last number, annotations removed, is a plain decimal after a
space or `=` (a truncated sample) has that number, source `last_number`. The
answer is judged against a plain-decimal gold in floating point unless the two
are within a hair of the 1e-6 tolerance. Every other row goes through
`extract_answer` and `plain_status`; the rows where an answer or its gold is
not a plain number are judged together at the end by math-verify
(`factory.labelers.symbolic`, one batch, from the calling thread), so numbers
never wait for it. A judgement that runs out of time has status `timeout` and
`correct` null.

>>> gold_labels(["so 2+3=<<2+3=5>>5\\n#### 5", "I think it is 7", "no idea"], ["5", "8", None])["answer_status"]
['correct', 'wrong', 'unparseable']
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.answers import extract_answer, plain_status
from factory.arrow import as_array, in_chunks, unusual_rows
from factory.labelers.symbolic import judge
from factory.schema import ANSWER_STATUSES as STATUSES

_UNDECIDED = -1  # a status code: the reference decides
_SYMBOLIC = -2  # a status code: math-verify decides, after the chunks

_DECIMAL = r"(?P<sign>-?)(?P<whole>[0-9]{1,3}(?:,[0-9]{3}){1,5}|[0-9]{1,20})(?:\.(?P<fraction>[0-9]{1,20}))?"
# The last line `#### N`, `#### $N` or `#### N units.`: the last `####` marker, followed by its number
# (a one-letter word after it might be math, `#### 5 x + 3`: the reference reads those).
_HASHES_ENDING = (rf"(?:^|\n)#### \$?{_DECIMAL}\.?(?:[ \t]*%?[ \t]*[A-Za-z]{{2}}[^\n#<]*|[ \t]*%)?"
                  r"[ \t\r\n]*$")
_PLAIN_GOLD = rf"^{_DECIMAL}$"
# factory.answers: annotations (finished or not) are removed first; then what would make an earlier rule apply
# (a text of one line may be a `whole` answer).
_ANNOTATION = r"(?m)<<[^\n]*?(?:>>|$)"
_EARLIER_RULE = (r"(?im)####|boxed|fbox|\banswer\s+is\b|^[ \t>*_#-]*(?:final[ \t]+)?(?:answer|a)[ \t]*[*_]*[ \t]*:"
                 r"|\\|\{|\A[ \n]*[^\n]*[ \n]*\z")
# A number is not glued to a word or a point, and not the tail of a fraction `a / b` or of `1,080`.
_LAST_NUMBER = rf"(?:^|\n|[=:(\[{{\"'*#>!?;]|[^/$ \t\n][ \t]+|(?:^|\n)[ \t]+){_DECIMAL}[^0-9]*$"


def gold_labels(texts: list[str], gold_answers: list[str | None], *, verifier=None) -> dict[str, list]:
    answers, sources, statuses = _labels(texts, gold_answers)
    symbolic = [row for row, status in enumerate(statuses) if status is None]
    judged = judge([(gold_answers[row], answers[row]) for row in symbolic], verifier) if symbolic else []
    for row, status in zip(symbolic, judged):
        statuses[row] = status
    correct = [None if gold is None or status == "timeout" else status == "correct"
               for gold, status in zip(gold_answers, statuses, strict=True)]
    return {"answer": answers, "answer_source": sources, "answer_status": statuses, "correct": correct}


def _labels(texts: list[str], gold_answers: list[str | None]) -> tuple[list, list, list]:
    """(answers, sources, statuses) of the rows, a status None where math-verify must judge."""
    answers, sources, statuses = [], [], []
    for text, gold in zip(texts, gold_answers, strict=True):
        extraction = extract_answer(text)
        answers.append(extraction.answer)
        sources.append(extraction.source)
        statuses.append(plain_status(extraction.answer, gold))
    return answers, sources, statuses


def gold_columns(texts: pa.Array | pa.ChunkedArray, gold_answers: pa.Array | pa.ChunkedArray, *,
                 verifier=None) -> dict[str, pa.Array]:
    """`gold_labels` of a text column and its gold answers, as Arrow arrays."""
    columns = in_chunks(_chunk_columns, texts, gold_answers)
    status = columns.pop("status").to_numpy(zero_copy_only=False).copy()
    symbolic = np.flatnonzero(status == _SYMBOLIC)
    if symbolic.size:
        rows = pa.array(symbolic)
        pairs = zip(as_array(gold_answers).take(rows).to_pylist(), columns["answer"].take(rows).to_pylist())
        status[symbolic] = [STATUSES.index(value) for value in judge(list(pairs), verifier)]
    unjudged = ~as_array(gold_answers).is_valid().to_numpy(zero_copy_only=False) | (status == STATUSES.index("timeout"))
    correct = status == STATUSES.index("correct")
    return columns | {"answer_status": pa.array(STATUSES).take(pa.array(status)),
                      "correct": pa.array(correct, pa.bool_(), mask=unjudged)}


def _chunk_columns(texts: pa.Array, gold_answers: pa.Array) -> dict[str, pa.Array]:
    n = len(texts)
    has_gold = gold_answers.is_valid().to_numpy(zero_copy_only=False)
    status = np.full(n, _UNDECIDED, np.int8)
    if texts.null_count:  # not text: the reference says what is wrong
        answer, source = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    else:
        answer, source = _fast_extraction(texts)
        found = source.is_valid().to_numpy(zero_copy_only=False)
        gold, plain_gold = _canonical(pc.extract_regex(gold_answers.fill_null(""), _PLAIN_GOLD))
        status[found & ~has_gold] = STATUSES.index("no_gold")
        judge_rows = pa.array(np.flatnonzero(found & plain_gold))
        status[judge_rows.to_numpy()] = _judge(answer.take(judge_rows), gold.take(judge_rows))
    reference = status == _UNDECIDED
    if reference.any():
        rows = pa.array(np.flatnonzero(reference))
        answers, sources, statuses = _labels(texts.take(rows).to_pylist(), gold_answers.take(rows).to_pylist())
        mask = pa.array(reference)
        answer = pc.replace_with_mask(answer, mask, pa.array(answers, pa.string()))
        source = pc.replace_with_mask(source, mask, pa.array(sources, pa.string()))
        status[reference] = [_SYMBOLIC if value is None else STATUSES.index(value) for value in statuses]
    return {"answer": answer, "answer_source": source, "status": pa.array(status, pa.int8())}


def _fast_extraction(texts: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(answer, source) for the texts the fast rules cover; null elsewhere."""
    answer, hashes = _canonical(pc.extract_regex(texts, _HASHES_ENDING))
    source = np.where(hashes, 0, -1)
    rest = np.flatnonzero(~hashes)
    rest = rest[~unusual_rows(texts.take(pa.array(rest)))]
    visible = pc.replace_substring_regex(texts.take(pa.array(rest)), _ANNOTATION, "")
    no_earlier_rule = pc.invert(pc.match_substring_regex(visible, _EARLIER_RULE))
    rest, visible = rest[no_earlier_rule.to_numpy(zero_copy_only=False)], visible.filter(no_earlier_rule)
    last, matched = _canonical(pc.extract_regex(visible, _LAST_NUMBER))
    source[rest[matched]] = 1
    mask = np.zeros(len(texts), bool)
    mask[rest[matched]] = True
    answer = pc.replace_with_mask(answer, pa.array(mask), last.filter(matched))
    return answer, pa.array(["hashes", "last_number"]).take(pa.array(source, mask=source < 0))


def _canonical(parts: pa.StructArray) -> tuple[pa.Array, np.ndarray]:
    """`normalize_number` of matched decimals (sign, whole, fraction), and which rows matched."""
    whole = pc.utf8_ltrim(pc.replace_substring(parts.field("whole"), ",", ""), "0")
    whole = pc.if_else(pc.equal(whole, ""), "0", whole)
    fraction = pc.utf8_rtrim(parts.field("fraction"), "0")
    zero = pc.and_(pc.equal(whole, "0"), pc.equal(fraction, ""))
    sign = pc.if_else(pc.or_(zero, pc.equal(parts.field("sign"), "")), "", "-")
    point = pc.if_else(pc.equal(fraction, ""), "", ".")
    text = pc.binary_join_element_wise(sign, whole, point, fraction, "")
    matched = parts.is_valid()
    return pc.if_else(matched, text, pa.scalar(None, pa.string())), matched.to_numpy(zero_copy_only=False)


def _judge(answer: pa.Array, gold: pa.Array) -> np.ndarray:
    """Status codes for canonical decimals: correct, wrong, or undecided where float error could tip the 1e-6."""
    same = pc.equal(answer, gold).to_numpy(zero_copy_only=False)
    p, g = (pc.cast(column, pa.float64()).to_numpy() for column in (answer, gold))
    distance, tolerance = np.abs(p - g), 1e-6 * np.maximum(np.abs(p), np.abs(g))
    status = np.where(distance < tolerance * (1 - 1e-9), STATUSES.index("correct"),
                      np.where(distance > tolerance * (1 + 1e-9), STATUSES.index("wrong"), _UNDECIDED))
    return np.where(same, STATUSES.index("correct"), status).astype(np.int8)

"""Gold-answer labeler: extract each sample's final answer and judge it against gold.

Contract (as TRL's reward functions): columns in, one value per row out, and
`None` where there is nothing to judge against, never a silent False.
`gold_labels` is the reference, one row at a time; `gold_columns` gives the
same values for whole Arrow columns. A text that ends with a line `#### N`
(N a plain decimal, maybe with thousands commas, a `$` or words after it, as
GSM8K writes it) has answer N, source `hashes`. A text of printable ASCII
with no marker of the other rules (`####`, `boxed`, `fbox`, `answer is`, a
line `Answer:`, LaTeX) whose last number, annotations removed, is a plain
decimal after a space or `=` (a truncated sample) has that number, source
`last_number`. The answer is judged against a plain-decimal gold in floating
point unless the two are within a hair of the 1e-6 tolerance. Every other
row goes through `extract_answer` and `answer_status`.

>>> gold_labels(["so 2+3=<<2+3=5>>5\\n#### 5", "I think it is 7", "no idea"], ["5", "8", None])["answer_status"]
['correct', 'wrong', 'unparseable']
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.answers import answer_status, extract_answer
from factory.labelers.columnar import in_chunks, unusual_rows
from factory.schema import ANSWER_STATUSES as STATUSES

_UNDECIDED = -1  # a status code: the reference decides

_DECIMAL = r"(?P<sign>-?)(?P<whole>[0-9]{1,3}(?:,[0-9]{3}){1,5}|[0-9]{1,20})(?:\.(?P<fraction>[0-9]{1,20}))?"
# The last line `#### N`, `#### $N` or `#### N units.`: the last `####` marker, followed by its number.
_HASHES_ENDING = rf"(?:^|\n)#### \$?{_DECIMAL}\.?(?:[ \t]*[A-Za-z%][^\n#<]*)?[ \t\r\n]*$"
_PLAIN_GOLD = rf"^{_DECIMAL}$"
# factory.answers: annotations (finished or not) are removed first; then what would make an earlier rule apply.
_ANNOTATION = r"(?m)<<[^\n]*?(?:>>|$)"
_EARLIER_RULE = (r"(?im)####|boxed|fbox|\banswer\s+is\b|^[ \t>*_#-]*(?:final[ \t]+)?(?:answer|a)[ \t]*[*_]*[ \t]*:"
                 r"|\\|\{")
# A number is not glued to a word or a point, and not the tail of a fraction `a / b` or of `1,080`.
_LAST_NUMBER = rf"(?:^|\n|[=:(\[{{\"'*#>!?;]|[^/$ \t\n][ \t]+|(?:^|\n)[ \t]+){_DECIMAL}[^0-9]*$"


def gold_labels(texts: list[str], gold_answers: list[str | None]) -> dict[str, list]:
    answers, sources, statuses, correct = [], [], [], []
    for text, gold in zip(texts, gold_answers, strict=True):
        extraction = extract_answer(text)
        status = answer_status(extraction.answer, gold)
        answers.append(extraction.answer)
        sources.append(extraction.source)
        statuses.append(status)
        correct.append(None if gold is None else status == "correct")
    return {"answer": answers, "answer_source": sources, "answer_status": statuses, "correct": correct}


def gold_columns(texts: pa.Array | pa.ChunkedArray, gold_answers: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
    """`gold_labels` of a text column and its gold answers, as Arrow arrays."""
    return in_chunks(_chunk_columns, texts, gold_answers)


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
        judge = pa.array(np.flatnonzero(found & plain_gold))
        status[judge.to_numpy()] = _judge(answer.take(judge), gold.take(judge))
    reference = status == _UNDECIDED
    if reference.any():
        rows = pa.array(np.flatnonzero(reference))
        labels = gold_labels(texts.take(rows).to_pylist(), gold_answers.take(rows).to_pylist())
        mask = pa.array(reference)
        answer = pc.replace_with_mask(answer, mask, pa.array(labels["answer"], pa.string()))
        source = pc.replace_with_mask(source, mask, pa.array(labels["answer_source"], pa.string()))
        status[reference] = [STATUSES.index(value) for value in labels["answer_status"]]
    correct = status == STATUSES.index("correct")
    return {"answer": answer, "answer_source": source, "answer_status": pa.array(STATUSES).take(pa.array(status)),
            "correct": pa.array(correct, pa.bool_(), mask=~has_gold)}


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

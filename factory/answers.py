r"""Final answers: extraction from a rationale, and numeric comparison.

One definition of "the answer of a text" used by the problem loaders (gold
answers), the labelers (sampled answers) and evaluation, so that a gold answer
and a predicted one are always read the same way.

Extraction rules, first match wins (`Extraction.source` names the rule):

1. ``hashes``        the last ``#### N`` marker (GSM8K) that carries a number
2. ``boxed``         the last ``\boxed{N}`` (or ``\fbox{N}``) that holds a number;
                     ``\frac{a}{b}`` and ``\text{...}`` inside are understood
3. ``the_answer_is`` the last ``the (final) answer is N`` (case-insensitive)
4. ``answer_colon``  the last ``Answer: N`` / ``Final answer: N`` / ``A: N`` at a line start
5. ``last_number``   the last number in the text

Decisions worth knowing:

- Calculator annotations ``<<expr=result>>`` are removed before any rule runs,
  and so is an unfinished one (``<<3*4=`` up to the end of its line, as left by
  a truncated sample): the numbers inside them are the model's scratch work,
  the number after them is what it wrote.
- In rules 1, 3 and 4 the number must come first after the marker (spaces,
  ``:``, ``$``, ``*``, brackets and the like may come between), so a markdown
  header ``#### Step 1`` or ``The answer is obtained from 3 + 5`` is not
  mistaken for an answer. A marker with no number falls through to the next
  matches of the same rule, then to the later rules: ``#### `` at the end of a
  truncated sample therefore yields its last number, with source
  ``last_number``, so a format filter can still tell it from a ``hashes`` one.
- Inside ``\boxed{...}`` the number after the last ``=`` is taken (``x = 5``).
- A number may carry a sign, a currency sign (``$``, also ``-$5`` and ``$-5``),
  thousands commas (only in groups of three: ``1,080``), decimals, a fraction
  ``3/4``, a mixed number ``1 1/2``, and anything after it (``18.`` ``18 apples``
  ``50%``). A ``-`` right after a digit, letter or closing bracket is a binary
  minus, not a sign (``5-3`` reads as 5 and 3). Numbers glued to a word
  (``H2O``) are not numbers. Scientific notation is not read (``2.5e3`` -> 2.5).
- Numbers longer than 100 characters are not read (no real answer is that
  long, and Python refuses to convert integers of more than 4,300 digits).
- Answers are normalised (`normalize_number`) to canonical text: integers
  ``'1080'``, terminating decimals ``'0.75'``, and other fractions ``'1/3'``;
  comparison (`answers_match`) is numeric with relative tolerance 1e-6, so
  ``'1/3'`` matches a gold ``'0.333333'``.

Everything here is pure Python with precompiled regular expressions, and
`extract_answer` never raises on a string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

__all__ = [
    "ANSWER_SOURCES",
    "Extraction",
    "answer_status",
    "answers_match",
    "extract_answer",
    "find_numbers",
    "normalize_answer",
    "normalize_number",
    "parse_number",
]

ANSWER_SOURCES = ("hashes", "boxed", "the_answer_is", "answer_colon", "last_number")

RELATIVE_TOLERANCE = Fraction(1, 10**6)
MAX_NUMBER_CHARS = 100  # longer candidates are not read as numbers
MAX_DECIMAL_PLACES = 30  # terminating fractions with more places are written as p/q

# --- numbers ---------------------------------------------------------------

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(
    # not glued to a word or a decimal point (H2O, 1.2.3); `_` is allowed (__18__)
    r"(?<![^\W_])(?<!\.)"
    # a sign, unless it follows a digit/letter/bracket (then it is a binary minus:
    # the lookbehind above already refuses a match starting right after a word char)
    r"(?:(?<![)\]}])(?P<sign>[-+\u2212]))?"
    r"(?:[$\u20ac\u00a3\u00a5][ \t]?(?P<sign2>[-+\u2212])?)?"
    r"(?:(?P<whole>\d+)[ ](?=\d+[ \t]*/[ \t]*\d))?"
    r"(?P<num>" + _UNSIGNED + r")"
    r"(?:[ \t]*/[ \t]*(?P<den>" + _UNSIGNED + r"))?"
)

# LaTeX that wraps numbers: \frac{a}{b}, \text{..}, thin spaces, escaped $ and %.
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_DROP = re.compile(r"\\[,!;: ]|\\left|\\right|\{,\}")
_LATEX_ESCAPED = re.compile(r"\\([$%])")

# Calculator annotations, finished or not (an unfinished one runs to the end of its line).
_ANNOTATION = re.compile(r"<<[^\n]*?(?:>>|$)", re.MULTILINE)

# Rules. Each captures the text the number is looked for in.
# (The rest of the line is captured in a lookahead, so that a later marker on the
# same line is still found: "The answer is 3. No, the answer is 4."; 200 characters
# are plenty, since the number must come right after the marker.)
_HASHES = re.compile(r"####(?=([^\n]{0,200}))")
_BOXED = re.compile(
    r"\\(?:boxed|fbox)\s*\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}"
)
_THE_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*(?=([^\n]{0,200}))", re.IGNORECASE)
_ANSWER_COLON = re.compile(
    r"^[ \t>*_#-]*(?:final[ \t]+)?(?:answer|a)[ \t]*[*_]*[ \t]*:([^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
# What may stand between a marker and its number.
_LEAD = " \t*_:=#`\"'([{\\$~\u2248"


def _clean_latex(text: str) -> str:
    if "\\" not in text and "{" not in text:
        return text
    text = _LATEX_TEXT.sub(r"\1 ", text)
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = _LATEX_DROP.sub("", text)
    return _LATEX_ESCAPED.sub(r"\1", text)


def _value(match: re.Match) -> Fraction | None:
    """The value of one `_NUMBER` match, or None if it is not a readable number."""
    if match.end() - match.start() > MAX_NUMBER_CHARS:
        return None
    try:
        value = Fraction(match["num"].replace(",", ""))
        den = match["den"]
        if den is not None:
            denominator = Fraction(den.replace(",", ""))
            if denominator:  # a zero denominator: read the numerator alone
                value /= denominator
        whole = match["whole"]
        if whole is not None and value < 1:  # 1 1/2; an improper 5 10/2 is just 10/2
            value += int(whole)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    negative = (match["sign"] in ("-", "\u2212")) != (match["sign2"] in ("-", "\u2212"))
    return -value if negative else value


def _first_number(text: str) -> Fraction | None:
    match = _NUMBER.search(text)
    return None if match is None else _value(match)


def _leading_number(text: str) -> Fraction | None:
    """The number that `text` starts with (after marker punctuation), or None."""
    match = _NUMBER.match(_clean_latex(text).lstrip(_LEAD))
    return None if match is None else _value(match)


def _boxed_number(content: str) -> Fraction | None:
    content = _clean_latex(content)
    if "=" in content:
        content = content.rsplit("=", 1)[1]
    return _first_number(content)


def parse_number(text: str) -> Fraction | None:
    r"""The first number in `text` as an exact Fraction, or None if it has none.

    Ints, Fractions, Decimals and finite floats are accepted as they are.

    >>> parse_number("$1,080.50 in total")
    Fraction(2161, 2)
    >>> parse_number("-3 degrees"), parse_number("3/4"), parse_number(r"\frac{1}{3}")
    (Fraction(-3, 1), Fraction(3, 4), Fraction(1, 3))
    >>> parse_number("no number here") is None
    True
    """
    if isinstance(text, str):
        return _first_number(_clean_latex(text))
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, Fraction, Decimal, float)):
        try:
            return Fraction(text)
        except (ValueError, OverflowError):  # nan, inf
            return None
    return None


def find_numbers(text: str) -> list[Fraction]:
    """Every readable number in `text`, in order (annotations and LaTeX as in extraction)."""
    if not isinstance(text, str):
        return []
    text = _clean_latex(text)
    values = (_value(m) for m in _NUMBER.finditer(text))
    return [v for v in values if v is not None]


def normalize_number(value: Fraction) -> str:
    """Canonical text of a number: '1080', '-3', '0.75'; non-terminating as 'p/q'.

    >>> normalize_number(Fraction(18)), normalize_number(Fraction(-3, 4)), normalize_number(Fraction(2, 3))
    ('18', '-0.75', '2/3')
    """
    value = Fraction(value)
    numerator, denominator = value.numerator, value.denominator
    if denominator == 1:
        return str(numerator)
    rest, twos, fives = denominator, 0, 0
    while rest % 2 == 0:
        rest //= 2
        twos += 1
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    places = max(twos, fives)
    if rest != 1 or places > MAX_DECIMAL_PLACES:
        return f"{numerator}/{denominator}"
    digits = str(abs(numerator) * 10**places // denominator).rjust(places + 1, "0")
    sign = "-" if numerator < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:].rstrip('0')}"


def normalize_answer(text: str | None) -> str | None:
    """`normalize_number(parse_number(text))`, or None if there is no number.

    >>> normalize_answer("1,080"), normalize_answer("18.0"), normalize_answer("$.50")
    ('1080', '18', '0.5')
    """
    value = parse_number(text)
    return None if value is None else normalize_number(value)


# --- extraction ------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """A normalised answer (None: unparseable) and the rule that found it."""

    answer: str | None
    source: str | None


_NOTHING = Extraction(None, None)


def _last(pattern: re.Pattern, text: str, read) -> Fraction | None:
    for match in reversed(pattern.findall(text)):
        value = read(match)
        if value is not None:
            return value
    return None


def extract_answer(text: str) -> Extraction:
    r"""The final answer of a rationale, normalised, and the rule that found it.

    >>> extract_answer("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18")
    Extraction(answer='18', source='hashes')
    >>> extract_answer(r"So the result is $\boxed{\frac{3}{4}}$.")
    Extraction(answer='0.75', source='boxed')
    >>> extract_answer("so 5+3=8.\nThe answer is 8.")
    Extraction(answer='8', source='the_answer_is')
    >>> extract_answer("I do not know.")
    Extraction(answer=None, source=None)
    """
    if not isinstance(text, str) or not text:
        return _NOTHING
    if "<<" in text:
        text = _ANNOTATION.sub("", text)
    value: Fraction | None = None
    source = None
    if "####" in text:
        value = _last(_HASHES, text, _leading_number)
        source = "hashes"
    if value is None and ("boxed" in text or "fbox" in text):
        value = _last(_BOXED, text, _boxed_number)
        source = "boxed"
    if value is None:
        value = _last(_THE_ANSWER_IS, text, _leading_number)
        source = "the_answer_is"
    if value is None:
        value = _last(_ANSWER_COLON, text, _leading_number)
        source = "answer_colon"
    if value is None:
        source = "last_number"
        last = None
        for last in _NUMBER.finditer(_clean_latex(text)):
            pass
        value = None if last is None else _value(last)
    if value is None:
        return _NOTHING
    return Extraction(normalize_number(value), source)


# --- comparison ------------------------------------------------------------


def _as_number(answer) -> Fraction | None:
    if answer is None:
        return None
    return parse_number(answer)


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Numeric equality within a relative tolerance of 1e-6; False if either has no number.

    >>> answers_match("18.0", "18"), answers_match("1,080", "1080"), answers_match("3/4", "0.75")
    (True, True, True)
    >>> answers_match("17", "18"), answers_match(None, "18")
    (False, False)
    """
    p, g = _as_number(predicted), _as_number(gold)
    if p is None or g is None:
        return False
    return p == g or abs(p - g) <= RELATIVE_TOLERANCE * max(abs(p), abs(g))


def answer_status(predicted: str | None, gold: str | None) -> str:
    """One of `factory.schema.ANSWER_STATUSES` for a predicted answer against a gold one.

    'unparseable' if the prediction has no number; else 'no_gold' if the gold
    answer is missing (or has no number, so cannot judge); else 'correct' or 'wrong'.

    >>> answer_status("18", "18.0"), answer_status("17", "18")
    ('correct', 'wrong')
    >>> answer_status(None, "18"), answer_status("18", None)
    ('unparseable', 'no_gold')
    """
    p = _as_number(predicted)
    if p is None:
        return "unparseable"
    g = _as_number(gold)
    if g is None:
        return "no_gold"
    return "correct" if answers_match(p, g) else "wrong"

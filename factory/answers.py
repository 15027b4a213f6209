r"""Final answers: extraction from a rationale, and comparison with a gold answer.

One definition of "the answer of a text" used by the problem loaders (gold
answers), the labelers (sampled answers) and evaluation, so that a gold answer
and a predicted one are always read the same way. An answer is either a
number, normalised (`normalize_number`: ``'1080'``, ``'0.75'``, ``'1/3'``), or
the LaTeX of a symbolic answer as written (``\sqrt{51}``, ``(3,4]``,
``\text{(C)}``), never a number taken out of it.

Extraction rules, first match wins (`Extraction.source` names the rule):

1. ``hashes``        the last ``#### ...`` marker (GSM8K) that carries an answer
2. ``boxed``         the last non-empty ``\boxed{...}`` (or ``\fbox{...}``), braces nested to any depth
                     (also ``\boxed 5``, a token without braces)
3. ``the_answer_is`` the last ``the (final) answer is ...`` (case-insensitive)
4. ``answer_colon``  the last ``Answer: ...`` / ``Final answer: ...`` / ``A: ...`` at a line start
5. ``whole``         the whole text, when it is one line of math, not a plain number and not
                     letters alone (``3+2x``, ``2^{1/2}``; not ``T``, a cut-off sample)
6. ``last_number``   the last number in the text

How a span is read (the content of a box, the rest of a marker's sentence):

- A plain number is a number with at most a currency sign before it and a
  percent sign, degrees (``30^\circ``) or unit words (``18 apples``, ``5 cm^2``;
  not one letter: ``5 x`` is math) after it. Inside a box, a math environment or a whole-text answer it may
  follow ``lhs =`` where lhs is a variable (``x``, ``a_1``, ``f(2)``) or
  arithmetic (``3 + 2 = 5``), as GSM8K-style boxes write it.
- A box holds whatever it holds: not a plain number, its content is the
  (symbolic) answer. After a marker, ``$...$`` (``\(...\)``, ``\[...\]``) right
  after it is read as a box is, else the span is read as a plain number, else as
  math if it looks like math (LaTeX, single-letter variables, ``^``, ``_``, a
  bracket with a comma, and no English word), else its leading number counts
  (``#### 8 apples because ...``), as before.
- Numbers glued to math are not read as numbers: ``3\sqrt{13}``, ``2k``,
  ``7\pi``, ``4210_{5}``, ``(2,\infty)``, ``-\frac{\pi}{6}`` are symbolic answers.

Decisions worth knowing:

- Calculator annotations ``<<expr=result>>`` are removed before any rule runs,
  and so is an unfinished one (``<<3*4=`` up to the end of its line, as left by
  a truncated sample): the numbers inside them are the model's scratch work,
  the number after them is what it wrote.
- In rules 1, 3 and 4 the answer must come first after the marker (spaces,
  ``:``, ``$``, ``*``, brackets and the like may come between), so a markdown
  header ``#### Step 1`` or ``The answer is obtained from 3 + 5`` is not
  mistaken for an answer. A marker with no answer falls through to the next
  matches of the same rule, then to the later rules: ``#### `` at the end of a
  truncated sample therefore yields its last number, with source
  ``last_number``, so a format filter can still tell it from a ``hashes`` one.
- A number may carry a sign, a currency sign (``$``, also ``-$5`` and ``$-5``),
  thousands commas (only in groups of three: ``1,080``), decimals, a fraction
  ``3/4``, a mixed number ``1 1/2``, and anything after it (``18.`` ``18 apples``
  ``50%``). A ``-`` right after a digit, letter or closing bracket is a binary
  minus, not a sign (``5-3`` reads as 5 and 3). Numbers glued to a word
  (``H2O``) are not numbers. Scientific notation is not read (``2.5e3`` -> 2.5).
- Numbers longer than 100 characters are not read (no real answer is that
  long, and Python refuses to convert integers of more than 4,300 digits);
  symbolic answers longer than 1,000 characters are not read either.
- Comparison (`answer_status`): two plain numbers compare as fractions, within a relative
  tolerance of 1e-6 (``'1/3'`` matches a gold ``'0.333333'``, ``'0.33'`` does
  not); anything else is judged by math-verify (`factory.labelers.symbolic`),
  which may also say ``timeout``.

Everything here is pure Python with precompiled regular expressions (math-verify
is imported only when a symbolic answer is judged), and `extract_answer` never
raises on a string.
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
    "looks_like_math",
    "normalize_answer",
    "normalize_number",
    "number_value",
    "parse_number",
    "plain_status",
    "read_answer",
]

ANSWER_SOURCES = ("hashes", "boxed", "the_answer_is", "answer_colon", "whole", "last_number")

RELATIVE_TOLERANCE = Fraction(1, 10**6)
MAX_NUMBER_CHARS = 100  # longer candidates are not read as numbers
MAX_ANSWER_CHARS = 1000  # longer symbolic answers are not read
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
_MIXED_FRAC = re.compile(r"(?<=\d)(?=\\[dt]?frac\b)")  # 1\frac{1}{2} is 1 1/2, a mixed number, not 11/2
_LATEX_DROP = re.compile(r"\\[,!;: ]|\\left|\\right|\{,\}")
_LATEX_ESCAPED = re.compile(r"\\([$%])")

# Calculator annotations, finished or not (an unfinished one runs to the end of its line).
_ANNOTATION = re.compile(r"<<[^\n]*?(?:>>|$)", re.MULTILINE)

# Rules. Each captures the text the number is looked for in.
# (The rest of the line is captured in a lookahead, so that a later marker on the
# same line is still found: "The answer is 3. No, the answer is 4."; 200 characters
# are plenty, since the number must come right after the marker.)
_HASHES = re.compile(r"####(?=([^\n]{0,200}))")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\(?:boxed|fbox) +([^\s${}\\]+)")
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
    text = _LATEX_FRAC.sub(r"\1/\2", _MIXED_FRAC.sub(" ", text))
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


# --- reading an answer span ------------------------------------------------------------

# After a plain number: percent or degrees, unit words ("18 apples", "5 cm^2"; one letter is a variable: 5 x), a stop.
_UNIT_TAIL = re.compile(
    r"\s*(?:%|\^\s*\{?\s*\\circ\s*\}?|\\circ|\u00b0|\\degree)?(?:\s+[A-Za-z]{2,}(?:\^\{?[23]\}?)?)*\s*\.?\s*\Z"
)
# A number and words after it, any letters (a marker's "#### 5 m", a cut-off "7 t"): prose, not math.
_WORDS_TAIL = re.compile(r"(?:\s+[A-Za-z]+)+\s*\.?\s*\Z")
# What may stand before `=` in front of a plain number: a variable (x, a_1, f(2)) or arithmetic (3 + 2).
_VARIABLE = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?'*(?:\([^()=]*\))?\s*")
_ARITHMETIC = re.compile(r"[\d\s.,+\-*/()\u00d7\u00f7]+")
_TIMES = re.compile(r"\\(?:times|cdot|div)\b")
# LaTeX groups that hold words, not math (\text{Evelyn}, \mathrm{cm}, \begin{pmatrix}), and commands.
_WORD_GROUP = re.compile(r"\\(?:text\w*|math\w*|mbox|operatorname|begin|end)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2}|[A-Za-z]\d")  # an English word, or a letter glued to a digit after it (H2O)
_MATH_SIGNAL = re.compile(r"[A-Za-z\\^_{}\u03c0\u221a\u221e]|[(\[][^()\[\]]*,")
# A math environment on one line, and where a marker's sentence ends.
_MATH_ENV = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_EMPHASIS = " \t*_:"  # markdown and punctuation around a marker's answer
_OPEN_END = tuple("=+-*/^_,(<>:\\")  # a whole text ending so was cut off, not answered
_FORMULA = re.compile(r"[\d\\^_{}+\-*/=<>,]")  # a whole text of letters alone ("T", "(C)") is not an answer
_BRACE = re.compile(r"(?<!\\)[{}]")


def number_value(text: str, *, lhs: bool = False) -> Fraction | None:
    r"""The value of an answer that is just a number (with units, percent or degrees), else None.

    With `lhs`, a plain number may follow ``x =`` or ``3 + 2 =`` (as in a box).

    >>> number_value("$1,080"), number_value(r"30^\circ"), number_value(r"\frac{3}{4} \text{ cups}")
    (Fraction(1080, 1), Fraction(30, 1), Fraction(3, 4))
    >>> number_value(r"3\sqrt{13}"), number_value("2k"), number_value("x = 5"), number_value("x = 5", lhs=True)
    (None, None, None, Fraction(5, 1))
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    text = _clean_latex(text)
    if lhs and "=" in text:
        *sides, text = text.split("=")
        if not all(_VARIABLE.fullmatch(side) or _ARITHMETIC.fullmatch(_TIMES.sub("*", side)) for side in sides):
            return None
    text = text.strip()
    match = _NUMBER.match(text)
    if match is None or not _UNIT_TAIL.match(text, match.end()) or (match["whole"] and not _proper(match)):
        return None  # 2 3/2 is not a mixed number: 2 times 3/2? math-verify decides
    return _value(match)


def _proper(match: re.Match) -> bool:
    try:
        return Fraction(match["num"].replace(",", "")) < Fraction(match["den"].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return False


def looks_like_math(text: str) -> bool:
    r"""Is this span math rather than prose: some LaTeX, a variable, ``^``, ``_`` or a bracket with a comma,
    and no English word (words inside ``\text{}`` do not count)? A ``$`` (currency) says no, and so does
    a number followed by words, even of one letter (``5 m``, a cut-off ``7 t``).

    >>> looks_like_math("6 - 5i"), looks_like_math("(3,4]"), looks_like_math(r"\text{Evelyn}")
    (True, True, True)
    >>> looks_like_math("18 + 2 = 20"), looks_like_math("8 apples"), looks_like_math("H2O")
    (False, False, False)
    """
    if not text or len(text) > MAX_ANSWER_CHARS or "$" in text:
        return False
    if _WORD.search(_COMMAND.sub(" ", _WORD_GROUP.sub(" ", text))) or _number_then_words(text):
        return False
    return _MATH_SIGNAL.search(text) is not None


def _env_content(match: re.Match) -> str:
    return next(group for group in match.groups() if group is not None)


def _read_boxed(content: str) -> Fraction | str | None:
    """A box holds its answer: a plain number (after ``lhs =``), else its LaTeX as written."""
    value = number_value(content, lhs=True)
    if value is not None:
        return value
    content = content.strip()
    return content if content and len(content) <= MAX_ANSWER_CHARS else None


def _read_math(content: str) -> Fraction | str | None:
    value = number_value(content, lhs=True)
    if value is not None:
        return value
    content = content.strip()
    return content if looks_like_math(content) else None


def _read_marker(rest: str) -> Fraction | str | None:
    """The answer after a marker: a math environment, a plain number, math, else the leading number."""
    span = _SENTENCE_END.split(rest, 1)[0].strip(_EMPHASIS)
    env = _MATH_ENV.match(span)
    if env is not None:
        value = _read_math(_env_content(env))
    else:
        value = number_value(span)
        if value is None and looks_like_math(span):
            value = _read_math(span)
    return value if value is not None else _leading_number(rest)


def _number_then_words(text: str) -> bool:
    text = _clean_latex(text).strip()
    match = _NUMBER.match(text)
    return match is not None and _WORDS_TAIL.match(text, match.end()) is not None


def _read_whole(text: str) -> str | None:
    """A text that is one line of math, not a plain number (``3+2x``, ``$\\frac12$``), is its own answer."""
    text = text.strip()
    if not text or "\n" in text or len(text) > MAX_ANSWER_CHARS:
        return None
    env = _MATH_ENV.fullmatch(text)
    content = _env_content(env).strip() if env is not None else text
    if (content.endswith(_OPEN_END) or not _FORMULA.search(content) or number_value(content, lhs=True) is not None
            or not looks_like_math(content)):
        return None
    return content


def _boxed_contents(text: str) -> list[str]:
    r"""The contents of every closed ``\boxed{...}`` / ``\fbox{...}`` (``\{`` is not a brace) and of every
    ``\boxed 5`` (a token, as MATH sometimes writes it), by position."""
    contents = [(bare.start(), bare[1]) for bare in _BOX_BARE.finditer(text)]
    for opening in _BOX_OPEN.finditer(text):
        depth = 1
        for brace in _BRACE.finditer(text, opening.end()):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                contents.append((opening.start(), text[opening.end(): brace.start()]))
                break
    return [content for _, content in sorted(contents)]


def read_answer(text: str) -> str | None:
    r"""A final answer written in LaTeX (a MATH ``answer`` field), as `extract_answer` would give it.

    The last box's content if there is one, a whole ``$...$`` unwrapped; a plain number
    normalised, anything else kept as written (stripped). None if empty.

    >>> read_answer(r"\frac{14}{3}"), read_answer(r"$\sqrt{51}$"), read_answer(r"so \boxed{x = 5}.")
    ('14/3', '\\sqrt{51}', '5')
    """
    if not isinstance(text, str):
        return None
    boxes = _boxed_contents(text)
    if boxes:
        value = _last(boxes, _read_boxed)
    else:
        env = _MATH_ENV.fullmatch(text.strip())
        value = _read_boxed(_env_content(env) if env is not None else text)
    return value if value is None or isinstance(value, str) else normalize_number(value)


# --- extraction ------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """An answer (a normalised number or a symbolic answer's LaTeX; None: unparseable) and the rule that found it."""

    answer: str | None
    source: str | None


_NOTHING = Extraction(None, None)


def _last(candidates: list[str], read) -> Fraction | str | None:
    for candidate in reversed(candidates):
        value = read(candidate)
        if value is not None:
            return value
    return None


def extract_answer(text: str) -> Extraction:
    r"""The final answer of a rationale, normalised, and the rule that found it.

    >>> extract_answer("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18")
    Extraction(answer='18', source='hashes')
    >>> extract_answer(r"So the result is $\boxed{\frac{3}{4}}$.")
    Extraction(answer='0.75', source='boxed')
    >>> extract_answer(r"Hence the distance is $\boxed{\sqrt{51}}$.")
    Extraction(answer='\\sqrt{51}', source='boxed')
    >>> extract_answer("so 5+3=8.\nThe answer is 8.")
    Extraction(answer='8', source='the_answer_is')
    >>> extract_answer("I do not know.")
    Extraction(answer=None, source=None)
    """
    if not isinstance(text, str) or not text:
        return _NOTHING
    if "<<" in text:
        text = _ANNOTATION.sub("", text)
    value: Fraction | str | None = None
    source = None
    if "####" in text:
        value = _last(_HASHES.findall(text), _read_marker)
        source = "hashes"
    if value is None and ("boxed" in text or "fbox" in text):
        value = _last(_boxed_contents(text), _read_boxed)
        source = "boxed"
    if value is None:
        value = _last(_THE_ANSWER_IS.findall(text), _read_marker)
        source = "the_answer_is"
    if value is None:
        value = _last(_ANSWER_COLON.findall(text), _read_marker)
        source = "answer_colon"
    if value is None:
        value = _read_whole(text)
        source = "whole"
    if value is None:
        source = "last_number"
        last = None
        for last in _NUMBER.finditer(_clean_latex(text)):
            pass
        value = None if last is None else _value(last)
    if value is None:
        return _NOTHING
    return Extraction(value if isinstance(value, str) else normalize_number(value), source)


# --- comparison ------------------------------------------------------------


def _as_number(answer) -> Fraction | None:
    if answer is None:
        return None
    return parse_number(answer)


def _close(p: Fraction, g: Fraction) -> bool:
    return p == g or abs(p - g) <= RELATIVE_TOLERANCE * max(abs(p), abs(g))


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Numeric equality within a relative tolerance of 1e-6; False if either has no number.

    Numbers only (the first number of each text): `answer_status` judges every kind of answer.

    >>> answers_match("18.0", "18"), answers_match("1,080", "1080"), answers_match("3/4", "0.75")
    (True, True, True)
    >>> answers_match("17", "18"), answers_match(None, "18")
    (False, False)
    """
    p, g = _as_number(predicted), _as_number(gold)
    if p is None or g is None:
        return False
    return _close(p, g)


def answer_status(predicted: str | None, gold: str | None, *, verifier=None) -> str:
    r"""One of `factory.schema.ANSWER_STATUSES` for a predicted answer against a gold one.

    'unparseable' if there is no prediction; else 'no_gold' if the gold answer is
    missing or empty; else 'correct' or 'wrong': two plain numbers (`number_value`)
    compare here, anything else goes to math-verify (`factory.labelers.symbolic`,
    through `verifier` or the shared one), which may also answer 'timeout'.

    >>> answer_status("18", "18.0"), answer_status("17", "18")
    ('correct', 'wrong')
    >>> answer_status(None, "18"), answer_status("18", None)
    ('unparseable', 'no_gold')
    """
    status = plain_status(predicted, gold)
    if status is not None:
        return status
    from factory.labelers.symbolic import judge

    return judge([(gold, predicted)], verifier)[0]


def plain_status(predicted: str | None, gold: str | None) -> str | None:
    """`answer_status` where no symbolic judgement is needed; None where math-verify must decide."""
    if not isinstance(predicted, str) or not predicted.strip():
        return "unparseable"
    if not isinstance(gold, str) or not gold.strip():
        return "no_gold"
    p, g = number_value(predicted), number_value(gold)
    if p is None or g is None:
        return None
    return "correct" if _close(p, g) else "wrong"

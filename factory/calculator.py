"""A safe arithmetic calculator and a checker for GSM8K calculator annotations.

GSM8K rationales carry calculator annotations such as ``<<48/2=24>>``: the
left-hand side is an arithmetic expression and the right-hand side its result.
This module serves twice (README, "Answers and the calculator"):

* at decoding time, :func:`calculator_result` turns the text after ``<<`` and
  before ``=`` into the result text to force (or ``None`` to leave the model
  alone); it never raises;
* after the fact, :func:`check_annotations` checks every annotation of a
  rationale and locates the first wrong step (0-based, as in
  :mod:`factory.reasoning_steps`).

How :func:`evaluate` stays safe
-------------------------------
It never calls ``eval``/``exec``/``compile``-to-bytecode. The expression is
parsed with ``ast.parse(..., mode="eval")`` and the tree is walked against an
explicit whitelist: ``Expression``, ``BinOp`` with ``+ - * / // % **``,
``UnaryOp`` with unary ``+``/``-`` and ``Constant`` holding an ``int`` or a
``float`` (not ``bool``, ``complex`` or ``str``). Every other node - names,
calls, attributes, subscripts, comparisons, lambdas, strings, tuples... - is
refused with a :class:`CalculatorError` that names it.

Arithmetic is exact (:class:`fractions.Fraction`; decimal literals go through
``Fraction(str)`` so ``2.4/12`` is exactly ``1/5``). A power with a
non-integer exponent falls back to ``float``.

Bounds, all checked before the expensive work is done:

* the expression is at most :data:`MAX_EXPRESSION_CHARS` characters;
* the tree is at most :data:`MAX_DEPTH` deep and at most :data:`MAX_NODES`
  nodes are visited (a cheap operation budget);
* every intermediate numerator and denominator is at most :data:`MAX_MAGNITUDE`
  in magnitude (floats too, and they must be finite);
* integer exponents satisfy ``|e| <= MAX_EXPONENT`` and the size of the power
  is estimated from bit lengths before it is computed; literal exponents
  (``1e400``) are bounded before the literal is converted;
* division and modulo by zero are refused.

What it does not protect against: it bounds work per call, not the number of
calls, so a caller that evaluates millions of expressions still spends the
time; it relies on CPython's own parser for the (length-bounded) parse, so a
bug there is out of its reach; it does not limit wall-clock time with a timer
or signal, only by the size bounds above (which keep each call to well under
a millisecond of arithmetic on small integers); and "safe" means "cannot run
code or exhaust memory", not "the arithmetic means what the author intended":
the light normalisation (``x`` as multiplication, ``%`` as percent, ``^`` as
power) is a guess at human notation.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from fractions import Fraction

from factory.reasoning_steps import split_steps

__all__ = [
    "CalculatorError",
    "evaluate",
    "format_result",
    "calculator_result",
    "Annotation",
    "AnnotationCheck",
    "check_annotations",
    "ANNOTATION_PATTERN",
    "MAX_EXPRESSION_CHARS",
    "MAX_MAGNITUDE",
    "MAX_EXPONENT",
]

MAX_EXPRESSION_CHARS = 200
"""Longest expression accepted, in characters, before normalisation."""

MAX_NORMALISED_CHARS = 2 * MAX_EXPRESSION_CHARS
"""Longest expression after normalisation (percent signs expand)."""

MAX_MAGNITUDE = 10**30
"""Bound on every intermediate numerator, denominator and float magnitude."""

_MAGNITUDE_BITS = MAX_MAGNITUDE.bit_length()

MAX_EXPONENT = 64
"""Largest integer exponent, in absolute value."""

MAX_DEPTH = 100
"""Deepest expression tree accepted."""

MAX_NODES = 1000
"""Operation budget: most tree nodes visited in one evaluation."""

MAX_LITERAL_EXPONENT = 40
"""Largest ``e`` exponent in a float literal such as ``1e5``."""

FORMAT_DECIMALS = 6
"""Decimals kept by :func:`format_result`."""

Number = Fraction | float


class CalculatorError(ValueError):
    """The expression was refused: unsupported syntax, too large, or undefined."""


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------

_TIMES_X = re.compile(r"(?<=[\d.)%])\s*[xX×]\s*(?=[\d.($])")
_WHITESPACE = re.compile(r"\s+")
_DOLLAR = re.compile(r"\$(?=[\d.(])")
_THOUSANDS = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?![\d,])")
# A percent sign right after a number literal, not followed by an operand
# (`5%`, `5%*20`, `(5%)`) means per cent; `7%3` and `7%(2)` stay modulo.
_PERCENT = re.compile(r"(?<![\w.])((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)%(?![\w.($])")
_WORDISH = re.compile(r"[\w.]")


def _squeeze_space(match: re.Match[str]) -> str:
    """Drop whitespace, except a single space between two word characters.

    Keeping ``2 3`` apart makes it a syntax error rather than ``23``, and
    keeping ``lambda x`` apart lets the refusal name the lambda.
    """
    text = match.string
    start, end = match.span()
    if start > 0 and end < len(text) and _WORDISH.match(text[start - 1]) and _WORDISH.match(text[end]):
        return " "
    return ""


def _normalise(expression: str) -> str:
    s = expression.strip()
    s = s.replace("×", "*").replace("÷", "/").replace("−", "-").replace("^", "**")
    s = _TIMES_X.sub("*", s)
    s = _WHITESPACE.sub(_squeeze_space, s)
    s = _DOLLAR.sub("", s)
    s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _PERCENT.sub(r"(\1/100)", s)
    return s


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

_REFUSED_NAMES = {
    "Name": "name",
    "Call": "function call",
    "Attribute": "attribute access",
    "Subscript": "subscript",
    "Compare": "comparison",
    "BoolOp": "boolean operator",
    "Lambda": "lambda",
    "IfExp": "conditional expression",
    "Tuple": "tuple",
    "List": "list",
    "Set": "set",
    "Dict": "dict",
    "JoinedStr": "f-string",
    "NamedExpr": "assignment expression",
    "Starred": "starred expression",
    "ListComp": "comprehension",
    "SetComp": "comprehension",
    "DictComp": "comprehension",
    "GeneratorExp": "generator expression",
    "Await": "await",
    "Yield": "yield",
    "YieldFrom": "yield",
    "Slice": "slice",
}

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


def _describe(node: ast.AST) -> str:
    kind = type(node).__name__
    what = _REFUSED_NAMES.get(kind, kind)
    if isinstance(node, ast.Name):
        what = f"name {node.id!r}"
    elif isinstance(node, ast.Attribute):
        what = f"attribute access .{node.attr}"
    return f"{what} ({kind})" if what != kind else kind


def _check_size(value: Number) -> Number:
    """Refuse a value outside the magnitude bound; return it otherwise."""
    if isinstance(value, Fraction):
        if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
            raise CalculatorError(f"refused: intermediate value too large (bound {MAX_MAGNITUDE:.0e})")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("refused: non-finite float result")
        if abs(value) > MAX_MAGNITUDE:
            raise CalculatorError(f"refused: intermediate value too large (bound {MAX_MAGNITUDE:.0e})")
        return value
    raise CalculatorError(f"refused: result of type {type(value).__name__}")


class _Evaluator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes = 0

    def visit(self, node: ast.AST, depth: int) -> Number:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculatorError(f"refused: expression too long (more than {MAX_NODES} operations)")
        if depth > MAX_DEPTH:
            raise CalculatorError(f"refused: expression nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, ast.Expression):
            return self.visit(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return _check_size(-self.visit(node.operand, depth + 1))
            if isinstance(node.op, ast.UAdd):
                return self.visit(node.operand, depth + 1)
            raise CalculatorError(f"refused: unary operator {type(node.op).__name__}")
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                raise CalculatorError(f"refused: binary operator {type(node.op).__name__}")
            left = self.visit(node.left, depth + 1)
            right = self.visit(node.right, depth + 1)
            return _check_size(_binop(node.op, left, right))
        raise CalculatorError(f"refused: {_describe(node)}")

    def constant(self, node: ast.Constant) -> Number:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"refused: constant of type {type(value).__name__}")
        if isinstance(value, int):
            return _check_size(Fraction(value))
        segment = ast.get_source_segment(self.source, node) or repr(value)
        segment = segment.replace("_", "")
        exponent = re.search(r"[eE]([-+]?\d+)$", segment)
        if exponent and abs(int(exponent.group(1))) > MAX_LITERAL_EXPONENT:
            raise CalculatorError(f"refused: literal exponent too large in {segment!r}")
        try:
            exact = Fraction(segment)
        except (ValueError, ZeroDivisionError):
            if not math.isfinite(value):
                raise CalculatorError(f"refused: non-finite literal {segment!r}") from None
            exact = Fraction(value)
        return _check_size(exact)


def _binop(op: ast.operator, left: Number, right: Number) -> Number:
    if isinstance(op, ast.Add):
        return left + right
    if isinstance(op, ast.Sub):
        return left - right
    if isinstance(op, ast.Mult):
        return left * right
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
        raise CalculatorError("refused: division by zero")
    if isinstance(op, ast.Div):
        return left / right
    if isinstance(op, ast.FloorDiv):
        result = left // right
        return Fraction(result) if isinstance(result, int) else result
    if isinstance(op, ast.Mod):
        return left % right
    return _power(left, right)


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        e = exponent.numerator
        if abs(e) > MAX_EXPONENT:
            raise CalculatorError(f"refused: exponent {e} too large (|e| <= {MAX_EXPONENT})")
        if base == 0 and e < 0:
            raise CalculatorError("refused: division by zero (zero to a negative power)")
        if isinstance(base, Fraction):
            bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length()) - 1
            if bits * abs(e) >= _MAGNITUDE_BITS:
                raise CalculatorError(f"refused: power too large (bound {MAX_MAGNITUDE:.0e})")
            return base**e
        return float(base) ** e
    # Non-integer exponent: a float result, or a refusal.
    b, x = float(base), float(exponent)
    if b < 0:
        raise CalculatorError("refused: negative base with a non-integer exponent")
    if b == 0 and x < 0:
        raise CalculatorError("refused: division by zero (zero to a negative power)")
    result = b**x
    if not isinstance(result, float):
        raise CalculatorError("refused: non-real power")
    return result


def evaluate(expression: str) -> Fraction | float:
    """Evaluate a plain arithmetic expression exactly; see the module docstring.

    Returns a :class:`~fractions.Fraction` (exact) or a ``float`` (only after
    a power with a non-integer exponent). Raises :class:`CalculatorError`, and
    nothing else, when the expression is refused.

    >>> evaluate("2.4/12")
    Fraction(1, 5)
    >>> evaluate("$1,080 x 5%")
    Fraction(54, 1)
    """
    try:
        if not isinstance(expression, str):
            raise CalculatorError(f"refused: expression of type {type(expression).__name__}")
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise CalculatorError(
                f"refused: expression too long ({len(expression)} > {MAX_EXPRESSION_CHARS} characters)"
            )
        source = _normalise(expression)
        if not source:
            raise CalculatorError("refused: empty expression")
        if len(source) > MAX_NORMALISED_CHARS:
            raise CalculatorError("refused: expression too long after normalisation")
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise CalculatorError(f"refused: syntax error ({exc.msg})") from None
        return _Evaluator(source).visit(tree, 0)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("refused: division by zero") from None
    except OverflowError:
        raise CalculatorError("refused: numeric overflow") from None
    except RecursionError:
        raise CalculatorError("refused: expression nested too deeply") from None
    except MemoryError:
        raise CalculatorError("refused: out of memory") from None
    except (ValueError, TypeError) as exc:
        raise CalculatorError(f"refused: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # belt and braces: evaluate raises CalculatorError only
        raise CalculatorError(f"refused: unexpected {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def _round_half_away(value: Fraction, decimals: int) -> Fraction:
    scale = 10**decimals
    scaled = abs(value) * scale
    rounded = math.floor(scaled + Fraction(1, 2))
    return Fraction(rounded if value >= 0 else -rounded, scale)


def format_result(value: Fraction | float) -> str:
    """GSM8K-style result text: ``34``, ``-3``, ``0.2``, ``2.5``, ``0.333333``.

    Integral values have no decimals; others are a plain decimal rounded (half
    away from zero) to at most six decimals with trailing zeros stripped.
    Never scientific notation. Raises :class:`CalculatorError` for a
    non-finite float or a non-number.
    """
    if isinstance(value, bool) or not isinstance(value, (Fraction, float, int)):
        raise CalculatorError(f"cannot format {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"cannot format non-finite {value!r}")
    exact = Fraction(value)
    if exact.denominator == 1:
        return str(exact.numerator)
    rounded = _round_half_away(exact, FORMAT_DECIMALS)
    if rounded.denominator == 1:
        return str(rounded.numerator)
    units = abs(rounded.numerator * (10**FORMAT_DECIMALS // rounded.denominator))
    whole, frac = divmod(units, 10**FORMAT_DECIMALS)
    digits = str(frac).rjust(FORMAT_DECIMALS, "0").rstrip("0")
    sign = "-" if rounded < 0 else ""
    return f"{sign}{whole}.{digits}"


def calculator_result(expression: str) -> str | None:
    """Formatted result of `expression`, or None when it is refused. Never raises.

    Used at decoding time on the text between ``<<`` and ``=``.
    """
    try:
        return format_result(evaluate(expression))
    except Exception:  # noqa: BLE001 - decoding must never stop on the calculator
        return None


# --------------------------------------------------------------------------
# Annotation checks
# --------------------------------------------------------------------------

ANNOTATION_PATTERN = re.compile(r"<<([^<>]*?)>>")
_DECIMAL_RHS = re.compile(r"^[-+]?\$?\d[\d,]*\.(\d+)$|^[-+]?\$?\.(\d+)$")
_RELATIVE_TOLERANCE = Fraction(1, 10**6)


@dataclass(frozen=True)
class Annotation:
    """One ``<<lhs=rhs>>`` annotation.

    `step` is the 0-based step index, ``step_index_at(text, start)`` from
    :mod:`factory.reasoning_steps`; `value` the
    lhs value (None when it cannot be evaluated); `ok` is True (matches),
    False (wrong, or rhs unparseable) or None (invalid: no ``=`` or lhs
    refused); `error` says why when `ok` is not True.
    """

    step: int
    lhs: str
    rhs: str
    value: Fraction | float | None
    ok: bool | None
    error: str | None


@dataclass(frozen=True)
class AnnotationCheck:
    """All annotations of a text: `wrong` counts ok=False, `invalid` ok=None."""

    total: int
    wrong: int
    invalid: int
    first_error_step: int | None
    annotations: tuple[Annotation, ...]


def _is_formatted_result(left: Fraction, right: Fraction) -> bool:
    """True when `right` is what :func:`format_result` writes for `left`.

    The decoder forces exactly that text after ``<<expr=``, so the checker
    must accept it even where the other rules do not (``<<1/3000000=0>>``).
    """
    return Fraction(format_result(left)) == right


def _matches(lhs: Number, rhs: Number, rhs_text: str) -> bool:
    left, right = Fraction(lhs), Fraction(rhs)
    if left == right:
        return True
    diff = abs(left - right)
    if diff <= _RELATIVE_TOLERANCE * max(abs(left), abs(right)):
        return True
    if _is_formatted_result(left, right):
        return True
    decimal = _DECIMAL_RHS.match(re.sub(r"\s+", "", rhs_text))
    if decimal:
        k = len(decimal.group(1) or decimal.group(2))
        # lhs rounded to k decimals equals rhs (either tie rule).
        if diff <= Fraction(1, 2 * 10**k):
            return True
    return False


def _check_one(lhs: str, rhs: str) -> tuple[Number | None, bool | None, str | None]:
    try:
        value = evaluate(lhs)
    except CalculatorError as exc:
        return None, None, f"lhs: {exc}"
    try:
        expected = evaluate(rhs)
    except CalculatorError as exc:
        return value, False, f"rhs: {exc}"
    if _matches(value, expected, rhs):
        return value, True, None
    return value, False, f"{lhs} = {format_result(value)}, not {rhs}"


def check_annotations(text: str) -> AnnotationCheck:
    """Check every ``<<lhs=rhs>>`` annotation of `text`. Never raises.

    The rhs matches when it equals the lhs exactly (as rationals), or within
    a relative 1e-6, or - when written with k >= 1 decimals - when the lhs
    rounds to it at k decimals (``<<10/3=3.33>>``), or when it is what
    :func:`format_result` writes for the lhs (what the decoder forces).

    >>> check_annotations("a <<2+3=5>>5\\nb <<5*4=21>>21\\n#### 21").first_error_step
    1
    """
    annotations: list[Annotation] = []
    try:
        if not isinstance(text, str):
            text = str(text)
        # step == factory.reasoning_steps.step_index_at(text, match.start()) (the tests
        # check this), computed incrementally:
        # calling it per annotation is quadratic in the text length, while the
        # steps before a line are those before the previous annotated line
        # plus split_steps() of the lines in between.
        last_cut, steps_before = -1, 0
        for match in ANNOTATION_PATTERN.finditer(text):
            cut = text.rfind("\n", 0, match.start())
            if cut != last_cut:
                steps_before += len(split_steps(text[last_cut + 1 : cut]))
                last_cut = cut
            step = steps_before
            inner = match.group(1)
            if "=" not in inner:
                annotations.append(Annotation(step, inner, "", None, None, "no '=' in annotation"))
                continue
            lhs, rhs = inner.split("=", 1)
            try:
                value, ok, error = _check_one(lhs, rhs)
            except Exception as exc:  # noqa: BLE001 - never raise on any input
                value, ok, error = None, None, f"internal error: {type(exc).__name__}"
            annotations.append(Annotation(step, lhs, rhs, value, ok, error))
    except Exception:  # noqa: BLE001 - report what was checked so far
        pass
    wrong = [a for a in annotations if a.ok is False]
    return AnnotationCheck(
        total=len(annotations),
        wrong=len(wrong),
        invalid=sum(1 for a in annotations if a.ok is None),
        first_error_step=wrong[0].step if wrong else None,
        annotations=tuple(annotations),
    )

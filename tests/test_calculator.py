"""Tests for factory.calculator: the safe evaluator and the annotation checker."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.calculator import (
    ANNOTATION_PATTERN,
    Annotation,
    AnnotationCheck,
    CalculatorError,
    calculator_result,
    check_annotations,
    evaluate,
    format_result,
)
from factory.reasoning_steps import step_index_at

# Hypothesis deadline: a guard against hangs (e.g. 9**9**9 actually computed), not a speed target.
HANG_GUARD_MS = 2000

# shared/ lies beside the repository, in development and in CI.
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

# --------------------------------------------------------------------------
# Hand cases: values
# --------------------------------------------------------------------------

VALUES = [
    ("48/2", Fraction(24)),
    ("48+24", Fraction(72)),
    ("2.4/12", Fraction(1, 5)),  # exact, not float noise
    ("96/.8", Fraction(120)),
    ("3/4", Fraction(3, 4)),
    ("(4+20)-6", Fraction(18)),
    ("-3", Fraction(-3)),
    ("+3", Fraction(3)),
    ("--3", Fraction(3)),
    ("2**10", Fraction(1024)),
    ("2**2.0", Fraction(4)),  # an integral decimal exponent stays exact
    ("2^10", Fraction(1024)),
    ("2**-2", Fraction(1, 4)),
    ("(2/3)**3", Fraction(8, 27)),
    ("7//2", Fraction(3)),
    ("-7//2", Fraction(-4)),
    ("7%3", Fraction(1)),  # modulo when an operand follows
    ("7%(3)", Fraction(1)),
    ("5%", Fraction(1, 20)),  # percent when nothing follows
    ("50%*20", Fraction(10)),
    ("20*50%", Fraction(10)),
    ("(25%)", Fraction(1, 4)),
    ("1,080", Fraction(1080)),
    ("1,080+1,000,000", Fraction(1001080)),
    ("$1,080 x 5%", Fraction(54)),
    ("$5+$3", Fraction(8)),
    ("3 x 4", Fraction(12)),
    ("3×4", Fraction(12)),
    ("12÷4", Fraction(3)),
    (" 2 + 3 * 4 ", Fraction(14)),
    ("1e3", Fraction(1000)),
    ("1e-5", Fraction(1, 100000)),
    ("5.", Fraction(5)),
    ("1_000", Fraction(1000)),
    ("0.1+0.2", Fraction(3, 10)),
    ("10**30", Fraction(10**30)),
    ("2**-64", Fraction(1, 2**64)),
    ("(" * 99 + "7" + ")" * 99, Fraction(7)),  # parentheses add no depth
    ("1+" * 99 + "1", Fraction(100)),  # a 100-term sum is within the depth bound
    ("-" * 99 + "1", Fraction(-1)),
]


@pytest.mark.parametrize(("expression", "expected"), VALUES)
def test_values(expression: str, expected: Fraction) -> None:
    value = evaluate(expression)
    assert isinstance(value, Fraction)
    assert value == expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("4**0.5", 2.0), ("2**0.5", math.sqrt(2)), ("8**(1/3)", 2.0), ("2**0.25", 2**0.25)],
)
def test_non_integer_power_is_float(expression: str, expected: float) -> None:
    value = evaluate(expression)
    assert isinstance(value, float)
    assert value == pytest.approx(expected)


# --------------------------------------------------------------------------
# Hand cases: formatting
# --------------------------------------------------------------------------

FORMATS = [
    (Fraction(34), "34"),
    (Fraction(-3), "-3"),
    (Fraction(1, 5), "0.2"),
    (Fraction(5, 2), "2.5"),
    (Fraction(1, 3), "0.333333"),
    (Fraction(2, 3), "0.666667"),
    (Fraction(-1, 3), "-0.333333"),
    (Fraction(10, 3), "3.333333"),
    (Fraction(1, 100000), "0.00001"),
    (Fraction(1, 10**7), "0"),  # rounds to zero
    (Fraction(-1, 10**7), "0"),  # never "-0"
    (Fraction(1, 2 * 10**6), "0.000001"),  # half away from zero
    (Fraction(2 * 10**6 - 1, 2 * 10**6), "1"),  # 0.9999995 rounds to an integer
    (Fraction(10**25), "10000000000000000000000000"),  # never scientific
    (2.0, "2"),
    (0.1, "0.1"),
    (1e20, "100000000000000000000"),
    (1.5e-7, "0"),
    (2 ** 0.5, "1.414214"),
    (18, "18"),
]


@pytest.mark.parametrize(("value", "expected"), FORMATS)
def test_format_result(value: Fraction | float, expected: str) -> None:
    assert format_result(value) == expected


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_format_result_refuses_non_finite(bad: float) -> None:
    with pytest.raises(CalculatorError):
        format_result(bad)


def test_calculator_result() -> None:
    assert calculator_result("48/2") == "24"
    assert calculator_result("2.4/12") == "0.2"
    assert calculator_result("10/3") == "3.333333"
    assert calculator_result("__import__('os')") is None
    assert calculator_result("1/0") is None
    assert calculator_result("") is None
    assert calculator_result(None) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Hand cases: refusals, with what was refused named in the message
# --------------------------------------------------------------------------

REFUSALS = [
    ("__import__('os').system('x')", "function call"),
    ("open('/etc/passwd')", "function call"),
    ("().__class__", "attribute"),
    ("(1).__class__", "attribute"),
    ("os", "name 'os'"),
    ("x", "name 'x'"),
    ("a+1", "name 'a'"),
    ("[1][0]", "subscript"),
    ("1<2", "comparison"),
    ("1 and 2", "boolean operator"),
    ("not 1", "unary operator Not"),
    ("~1", "unary operator Invert"),
    ("1 if 1 else 2", "conditional"),
    ("lambda x: x", "lambda"),
    ("lambda: 1", "lambda"),
    ("'abc'", "str"),
    ("b'abc'", "bytes"),
    ("True", "bool"),
    ("True+1", "bool"),
    ("None", "NoneType"),
    ("1j", "complex"),
    ("1,2", "tuple"),
    ("[1,2]", "list"),
    ("{1: 2}", "dict"),
    ("f'{1}'", "f-string"),
    ("(y := 1)", "assignment expression"),
    ("[i for i in (1,)]", "comprehension"),
    ("1 << 3", "binary operator LShift"),
    ("3 & 1", "binary operator BitAnd"),
    ("3 | 1", "binary operator BitOr"),
    ("1 @ 2", "binary operator MatMult"),
    ("1/0", "division by zero"),
    ("1//0", "division by zero"),
    ("1%0", "division by zero"),
    ("1/(2-2)", "division by zero"),
    ("0**-1", "division by zero"),
    ("9**9**9", "exponent"),
    ("10**1000", "exponent"),
    ("2**65", "exponent"),
    ("10**31", "too large"),
    ("3**64", "too large"),
    ("(1/3)**64", "too large"),
    ("10**20*10**20", "too large"),
    ("1" * 40, "too large"),
    ("0." + "0" * 40 + "1", "too large"),
    ("1e400", "literal exponent"),
    ("1e999999999", "literal exponent"),
    ("1e-400", "literal exponent"),
    ("(-8)**(1/3)", "negative base"),
    ("10**1000.5", "overflow"),
    ("(" * 10000, "too long"),
    ("1+" * 150 + "1", "too long"),
    ("(" * 150 + "1" + ")" * 150, "too long"),
    ("-" * 150 + "1", "nested too deeply"),
    ("", "empty"),
    ("   ", "empty"),
    ("2 3", "syntax error"),
    ("1+", "syntax error"),
    ("import os", "syntax error"),
    ("\x00", "syntax error"),
]


@pytest.mark.parametrize(("expression", "refused"), REFUSALS)
def test_refusals(expression: str, refused: str) -> None:
    with pytest.raises(CalculatorError) as info:
        evaluate(expression)
    assert refused.lower() in str(info.value).lower()
    assert isinstance(info.value, ValueError)


def test_refusal_of_non_string() -> None:
    with pytest.raises(CalculatorError, match="type int"):
        evaluate(12)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Hand cases: annotation checks
# --------------------------------------------------------------------------

ANNOTATION_CASES = [
    # text, total, wrong, invalid, first_error_step
    ("a <<2+3=5>>5\nb <<5*4=21>>21\n#### 21", 2, 1, 0, 1),
    ("a <<2+3=5>>5\nb <<5*4=20>>20\n#### 20", 2, 0, 0, None),
    ("no annotations at all\n#### 3", 0, 0, 0, None),
    ("", 0, 0, 0, None),
    ("<<2+3=6>>6", 1, 1, 0, 0),
    # blank lines are not steps
    ("a <<1+1=2>>2\n\n\nb <<2*3=6>>6\nc <<6-1=4>>4\n#### 4", 3, 1, 0, 2),
    # two annotations on one line share a step; the first wrong one counts
    ("x <<1+1=2>> and <<2+2=5>>\ny <<3+3=7>>7", 3, 2, 0, 0),
    # no '=' and an unevaluable lhs are invalid, not wrong
    ("a <<2+3>>5\nb <<foo(1)=3>>3\nc <<2*2=5>>5", 3, 1, 2, 2),
    # an rhs that cannot be parsed is wrong
    ("a <<2+3=five>>\nb <<2+3=>>", 2, 2, 0, 0),
    # float noise and rounding by a human
    ("<<2.4/12=.2>>.2\n<<10/3=3.33>>\n<<2/3=0.67>>\n<<1/3=0.333333>>", 4, 0, 0, None),
    # k decimals, but not a rounding of the lhs
    ("a\n<<2/3=0.66>>", 1, 1, 0, 1),
    ("a\n<<10/3=3>>", 1, 1, 0, 1),
    # what the decoder forces (format_result of the lhs) is accepted
    ("<<1/3000000=0>>\n<<-1/3000000=0>>\n<<1/3000000=0.0000004>>", 3, 1, 0, 2),
    # relative 1e-6 tolerance
    ("<<1000000/3=333333.3333>>", 1, 0, 0, None),
    ("<<1/3=0.33>>\n<<1/3=0.3>>\n<<1/3=0.4>>", 3, 1, 0, 2),
    # rhs written as an expression (GSM8K has `3/4=3/4`) and with commas / dollars
    ("<<3/4=3/4>>3/4\n<<1000+80=1,080>>\n<<2*2=$4>>", 3, 0, 0, None),
    # splits on the first '=' only
    ("<<2+2=4=4>>", 1, 1, 0, 0),
    # the final-answer line is not a step; an annotation on it gets the index after the last step
    ("a <<1+1=2>>\n#### 2 <<1+1=3>>", 2, 1, 0, 1),
    # hostile lhs is invalid, not evaluated
    ("<<__import__('os').system('rm -rf /')=0>>", 1, 0, 1, None),
    # nested angle brackets: only the inner well-formed annotation is found
    ("<<<2+2=4>>>", 1, 0, 0, None),
]


@pytest.mark.parametrize(("text", "total", "wrong", "invalid", "first_error_step"), ANNOTATION_CASES)
def test_check_annotations(text: str, total: int, wrong: int, invalid: int, first_error_step: int | None) -> None:
    check = check_annotations(text)
    assert isinstance(check, AnnotationCheck)
    assert (check.total, check.wrong, check.invalid, check.first_error_step) == (
        total,
        wrong,
        invalid,
        first_error_step,
    )
    _assert_consistent(check)


def test_long_text_steps_are_counted() -> None:
    text = "\n".join(f"s <<{i}+1={i + 1}>>" for i in range(10_000)) + "\n#### 0"
    check = check_annotations(text)
    assert (check.total, check.wrong, check.invalid) == (10_000, 0, 0)
    assert check.annotations[-1].step == 9_999


def test_annotation_fields() -> None:
    check = check_annotations("a <<2+3=5>>5\nb <<5*4=21>>21\nc <<x=1>>\n#### 21")
    good, bad, invalid = check.annotations
    assert good == Annotation(step=0, lhs="2+3", rhs="5", value=Fraction(5), ok=True, error=None)
    assert (bad.step, bad.lhs, bad.rhs, bad.value, bad.ok) == (1, "5*4", "21", Fraction(20), False)
    assert bad.error and "20" in bad.error
    assert (invalid.step, invalid.value, invalid.ok) == (2, None, None)
    assert invalid.error and "name 'x'" in invalid.error
    with pytest.raises(AttributeError):
        check.total = 0  # type: ignore[misc]


def _assert_consistent(check: AnnotationCheck) -> None:
    assert check.total == len(check.annotations)
    assert check.wrong == sum(a.ok is False for a in check.annotations)
    assert check.invalid == sum(a.ok is None for a in check.annotations)
    wrong_steps = [a.step for a in check.annotations if a.ok is False]
    assert check.first_error_step == (wrong_steps[0] if wrong_steps else None)
    for a in check.annotations:
        assert (a.error is None) == (a.ok is True)
        assert a.step >= 0


# --------------------------------------------------------------------------
# Real GSM8K lines
# --------------------------------------------------------------------------

# A few gold answers copied verbatim from GSM8K (Cobbe et al. 2021, "Training
# Verifiers to Solve Math Word Problems", https://github.com/openai/grade-school-math,
# MIT licence): train rows 0 and 943, test row 319, and two with thousands
# commas after `>>`.
GSM8K_FIXTURE = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
    "altogether in April and May.\n#### 72",
    "Every donut costs him $.2 because 2.4 divided by 12 equals <<2.4/12=.2>>.2\nSo he makes $.8 for "
    "every donut he sells because $1 minus $.2 equals .8\nHe needs to sell 120 donuts because 96 "
    "divided by .8 equals <<96/.8=120>>120.\nHe needs to buy and sell 10 dozen donuts because 120 "
    "divided by 12 equals <<120/12=10>>10\n#### 10",
    "The total ratio representing the number of electric poles and wires is 1+3=<<1+3=4>>4\nThe "
    "fraction representing the number of wires required to connect the neighborhood's electricity "
    "is <<3/4=3/4>>3/4\nIf 3/4 represents 45, the number of wires required for the connections, then "
    "the total fraction which is 4/4, representing the poles and wires needed, represents "
    "4/4*45*4/3=60\nSince the total number of wires and poles required is 60, and the number of "
    "electric wires to be used is 45, the number of poles required is 60-45=<<60-45=15>>15\n#### 15",
    "It cost 20000*2=$<<20000*2=40000>>40,000 a year\nSo it cost 40,000*13=$<<40000*13=520000>>520,000"
    "\n#### 520,000",
    "First Day:<<4=4>>4 inches\nSecond Day: 5(4)=20 inches\nThird Day: (4+20)-6=<<(4+20)-6=18>>18 "
    "inches\n#### 18",
]
GSM8K_FIXTURE_TOTALS = [2, 3, 3, 2, 2]


@pytest.mark.parametrize(("answer", "total"), zip(GSM8K_FIXTURE, GSM8K_FIXTURE_TOTALS))
def test_gsm8k_fixture(answer: str, total: int) -> None:
    check = check_annotations(answer)
    assert (check.total, check.wrong, check.invalid, check.first_error_step) == (total, 0, 0, None)


def test_gsm8k_fixture_steps() -> None:
    check = check_annotations(GSM8K_FIXTURE[1])
    assert [a.step for a in check.annotations] == [0, 2, 3]
    corrupted = GSM8K_FIXTURE[1].replace("<<96/.8=120>>", "<<96/.8=121>>")
    assert check_annotations(corrupted).first_error_step == 2


@pytest.mark.parametrize(("split", "expected_total"), [("train", 23716), ("test", 4282)])
def test_gsm8k_real_data(split: str, expected_total: int) -> None:
    path = GSM8K_DIR / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not available")
    total = wrong = invalid = 0
    bad: list[tuple[int, Annotation]] = []
    with path.open(encoding="utf-8") as handle:
        for row_index, line in enumerate(handle):
            check = check_annotations(json.loads(line)["answer"])
            total += check.total
            wrong += check.wrong
            invalid += check.invalid
            bad.extend((row_index, a) for a in check.annotations if a.ok is not True)
    assert total == expected_total
    assert wrong == 0, bad[:10]
    assert invalid == 0, bad[:10]


# --------------------------------------------------------------------------
# Property-based tests
# --------------------------------------------------------------------------

HOSTILE = [
    "__import__('os').system('x')",
    "__import__('os')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "(lambda x: x)(1)",
    "9**9**9",
    "10**1000",
    "2**2**2**2**2",
    "1e400",
    "1e-400",
    "(" * 10000,
    ")" * 10000,
    "-" * 199 + "1",
    "9" * 200,
    "[1]*10**9",
    "'a'*10**9",
    "open('/etc/passwd').read()",
    "exec('1')",
    "eval('1')",
    "globals()",
    "__builtins__",
    "1 if True else 0",
    "(x := 1)",
    "0**-1",
    "(-1)**0.5",
    "1/0",
    "10**30*10",
    "1.5**64",
    "2.5**1e9",
    "\x00",
    "\\",
    "%",
    "1%",
    "$",
    ",",
    "1,,2",
    "x",
    "×÷^",
    "1e",
    "..",
]

_FRAGMENTS = st.sampled_from(
    HOSTILE
    + ["1", "2.5", ".5", "1,000", "$", "%", "x", "×", "÷", "^", "**", "*", "/", "//", "+", "-"]
    + ["(", ")", " ", "e9", "0"]
)

hostile_strings = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=250),
    st.text(alphabet=st.sampled_from("0123456789.+-*/%()^x$,e _ab'[]:=<>"), max_size=250),
    st.lists(_FRAGMENTS, max_size=12).map("".join),
)


@settings(max_examples=400, deadline=HANG_GUARD_MS, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_strings)
def test_evaluate_returns_number_or_refuses(expression: str) -> None:
    try:
        value = evaluate(expression)
    except CalculatorError:
        pass
    else:
        assert isinstance(value, (Fraction, float))
        if isinstance(value, float):
            assert math.isfinite(value)
        else:
            assert abs(value.numerator) <= 10**30 and value.denominator <= 10**30
        assert isinstance(format_result(value), str)
    result = calculator_result(expression)
    assert result is None or isinstance(result, str)


_BOUND = 10**30


class _TooBig(Exception):
    pass


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) > _BOUND or value.denominator > _BOUND:
        raise _TooBig
    return value


def _leaf(n: int) -> tuple[str, object]:
    return (str(n) if n >= 0 else f"({n})"), Fraction(n)


def _combine(op: str, left: tuple[str, object], right: tuple[str, object]) -> tuple[str, object]:
    """Build `(left op right)` and its value, computed independently with Fractions.

    The value is a Fraction, "zero" (division by zero somewhere) or "big" (an
    intermediate went past the evaluator's documented bound).
    """
    text = f"({left[0]} {op} {right[0]})"
    a, b = left[1], right[1]
    if isinstance(a, str):  # the evaluator visits the left operand first
        return text, a
    if isinstance(b, str):
        return text, b
    assert isinstance(a, Fraction) and isinstance(b, Fraction)
    try:
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        elif b == 0:
            return text, "zero"
        elif op == "/":
            value = a / b
        elif op == "//":
            value = Fraction(math.floor(a / b))
        else:  # "%"
            value = a - b * math.floor(a / b)
        return text, _bounded(value)
    except _TooBig:
        return text, "big"


def _power(base: tuple[str, object], exponent: int) -> tuple[str, object]:
    text = f"({base[0]})**{exponent}" if exponent >= 0 else f"({base[0]})**({exponent})"
    a = base[1]
    if not isinstance(a, Fraction):
        return text, a
    if a == 0 and exponent < 0:
        return text, "zero"
    try:
        return text, _bounded(a**exponent)
    except _TooBig:
        return text, "big"


leaves = st.integers(min_value=-12, max_value=12).map(_leaf)


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    binary = st.builds(_combine, st.sampled_from(["+", "-", "*", "/", "//", "%"]), children, children)
    power = st.builds(_power, children, st.integers(min_value=-3, max_value=3))
    return st.one_of(binary, binary, power)


arithmetic_trees = st.recursive(leaves, _extend, max_leaves=10)


@settings(max_examples=300, deadline=HANG_GUARD_MS)
@given(arithmetic_trees)
def test_evaluate_agrees_with_fractions(tree: tuple[str, object]) -> None:
    text, expected = tree
    if len(text) > 200:
        with pytest.raises(CalculatorError, match="too long"):
            evaluate(text)
    elif isinstance(expected, Fraction):
        assert evaluate(text) == expected
    elif expected == "zero":
        with pytest.raises(CalculatorError, match="division by zero"):
            evaluate(text)
    else:
        # Past the documented bound somewhere along the way: refused (an
        # over-long expression is refused too).
        with pytest.raises(CalculatorError):
            evaluate(text)


annotation_texts = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.sampled_from(
            ["<<", ">>", "=", "\n", "\n\n", "  \n", "####", " ", "1", "2.5", "/", "*", "x", "(", "<", ">"]
            + ["foo", "9**9**9", "3/4", "1,000", "$"]
        ),
        max_size=60,
    ).map("".join),
)


@settings(max_examples=300, deadline=HANG_GUARD_MS)
@given(annotation_texts)
def test_check_annotations_never_raises(text: str) -> None:
    check = check_annotations(text)
    assert isinstance(check, AnnotationCheck)
    _assert_consistent(check)
    starts = [m.start() for m in ANNOTATION_PATTERN.finditer(text)]
    assert [a.step for a in check.annotations] == [step_index_at(text, s) for s in starts]


operands = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(lambda n: (str(n), Fraction(n))),
    st.integers(min_value=0, max_value=10**6).map(lambda n: (f"{n // 100}.{n % 100:02d}", Fraction(n, 100))),
    st.integers(min_value=1, max_value=999).map(lambda n: (f".{n:03d}", Fraction(n, 1000))),
)


@st.composite
def correct_annotation_lines(draw: st.DrawFn) -> str:
    a_text, a = draw(operands)
    op = draw(st.sampled_from(["+", "-", "*", "/"]))
    b_text, b = draw(operands.filter(lambda o: op != "/" or o[1] != 0))
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else Fraction(0)}[op]
    words = draw(st.sampled_from(["", "So ", "He has "]))
    return f"{words}{a_text}{op}{b_text}=<<{a_text}{op}{b_text}={format_result(value)}>>{format_result(value)}"


@settings(max_examples=200, deadline=HANG_GUARD_MS)
@given(st.lists(correct_annotation_lines(), min_size=1, max_size=6))
def test_correct_annotations_check_ok(lines: list[str]) -> None:
    check = check_annotations("\n".join(lines) + "\n#### 0")
    assert (check.total, check.wrong, check.invalid, check.first_error_step) == (len(lines), 0, 0, None)
    assert [a.step for a in check.annotations] == list(range(len(lines)))

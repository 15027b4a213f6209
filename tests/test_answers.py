"""Final-answer extraction and numeric comparison (factory.answers)."""

from __future__ import annotations

import doctest
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory import answers
from factory.answers import (
    ANSWER_SOURCES,
    Extraction,
    answer_status,
    answers_match,
    extract_answer,
    normalize_answer,
    normalize_number,
    number_value,
    parse_number,
)
from factory.schema import ANSWER_STATUSES


def test_doctests():
    result = doctest.testmod(answers, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


# --- one hand-made input per rule: value and source -------------------------


@pytest.mark.parametrize(
    "text, answer, source",
    [
        # hashes: the last #### line, GSM8K
        ("9 * 2 = $<<9*2=18>>18 a day.\n#### 18", "18", "hashes"),
        ("#### 3\nwait, no.\n#### 1,080", "1080", "hashes"),
        ("#### -3", "-3", "hashes"),
        ("#### 3 #### 4", "4", "hashes"),
        ("The answer is 7.\n#### 8", "8", "hashes"),  # hashes wins over the_answer_is
        # boxed: last one, one level of nested braces
        (r"First \boxed{2}, then $\boxed{5}$.", "5", "boxed"),
        (r"So $x = \boxed{\frac{3}{4}}$", "0.75", "boxed"),
        (r"\boxed{x = 1{,}080}", "1080", "boxed"),
        (r"The answer is 3. \boxed{4}", "4", "boxed"),  # boxed wins over the_answer_is
        # the_answer_is: case-insensitive, last one
        ("so 5+3=8.\nThe answer is 8.", "8", "the_answer_is"),
        ("the final answer is: $18$", "18", "the_answer_is"),
        ("The answer is 3. No: THE ANSWER IS 4 apples", "4", "the_answer_is"),
        (r"the final answer is: $\frac{1}{3}$", "1/3", "the_answer_is"),
        # answer_colon: at a line start
        ("3 + 4 = 7\nA: 7", "7", "answer_colon"),
        ("work 12\nAnswer: $1,000.50\nthanks 3", "1000.5", "answer_colon"),
        ("**Final Answer:** -2", "-2", "answer_colon"),
        # last_number
        ("so she has 5 + 3 = 8 apples.", "8", "last_number"),
        ("It is 18.", "18", "last_number"),
        ("It was -3 degrees.", "-3", "last_number"),
        ("He pays 2/2=<<2/2=1>>1 dollar", "1", "last_number"),
        ("x = 3*4 = <<3*4=", "4", "last_number"),  # an unfinished annotation is ignored
        ("half is .5 and 50% of it", "50", "last_number"),
        ("it takes 1 1/2 hours", "1.5", "last_number"),
    ],
)
def test_extraction_rules(text, answer, source):
    assert extract_answer(text) == Extraction(answer, source)
    assert source in ANSWER_SOURCES


@pytest.mark.parametrize(
    "text, expected",
    [
        # a marker without a number falls through to later rules
        ("Step 1: 4 + 4 = 8\n#### ", Extraction("8", "last_number")),
        ("#### Step 1\n3 + 4 = 7\nThe answer is 7", Extraction("7", "the_answer_is")),
        ("The answer is obtained from 3 + 5 = 8", Extraction("8", "last_number")),
        (r"\boxed{ } because 2 > 1", Extraction("1", "last_number")),  # an empty box holds no answer
        (r"\boxed{\text{yes}} because 2 > 1", Extraction(r"\text{yes}", "boxed")),  # a text answer is an answer
        ("#### 12\n#### ", Extraction("12", "hashes")),  # the last #### that carries a number
        # nothing at all
        ("", Extraction(None, None)),
        ("I do not know.", Extraction(None, None)),
        ("#### ", Extraction(None, None)),
        ("<<3*4=12>>", Extraction(None, None)),
    ],
)
def test_fallthrough_and_unparseable(text, expected):
    assert extract_answer(text) == expected


def test_not_numbers():
    assert extract_answer("H2O").answer is None  # glued to a word
    assert extract_answer("take 5-3").answer == "3"  # binary minus, not -3
    assert extract_answer("(2+3)-4").answer == "4"
    assert extract_answer("1.2.3").answer == "1.2"
    assert extract_answer("9" * 500).answer is None  # too long to be an answer
    assert extract_answer(None) == Extraction(None, None)


# --- numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,080", Fraction(1080)),
        ("18.0", Fraction(18)),
        ("-3", Fraction(-3)),
        (".5", Fraction(1, 2)),
        ("$1,000.50", Fraction(2001, 2)),
        ("-$5", Fraction(-5)),
        ("$-5", Fraction(-5)),
        ("3/4", Fraction(3, 4)),
        ("-1/3", Fraction(-1, 3)),
        ("1 1/2", Fraction(3, 2)),
        ("50%", Fraction(50)),
        ("18 apples", Fraction(18)),
        ("\u22123", Fraction(-3)),  # unicode minus
        (r"\frac{3}{4}", Fraction(3, 4)),
        ("1,0800", Fraction(1)),  # not a thousands group
        (18, Fraction(18)),
        ("none", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "value, text",
    [
        (Fraction(1080), "1080"),
        (Fraction(-3), "-3"),
        (Fraction(1, 2), "0.5"),
        (Fraction(3, 4), "0.75"),
        (Fraction(-1, 8), "-0.125"),
        (Fraction(1, 3), "1/3"),
        (Fraction(-4, 3), "-4/3"),
        (Fraction(0), "0"),
        (Fraction(1, 10**40), f"1/{10**40}"),  # too many places for a decimal
    ],
)
def test_normalize_number(value, text):
    assert normalize_number(value) == text


def test_normalize_answer():
    assert normalize_answer("1,080") == "1080"
    assert normalize_answer("18.0") == "18"
    assert normalize_answer("#### 3/4") == "0.75"
    assert normalize_answer("nothing") is None
    assert normalize_answer(None) is None


@pytest.mark.parametrize(
    "predicted, gold, match",
    [
        ("18.0", "18", True),
        ("1,080", "1080", True),
        ("-3", "-3", True),
        ("-3", "3", False),
        ("0.5", ".50", True),
        ("3/4", "0.75", True),
        ("1/3", "0.333333", True),  # within 1e-6 relative
        ("1/3", "0.333", False),
        ("2.5", "2.50001", False),
        ("1000000", "1000000.5", True),
        ("0", "0", True),
        ("0", "0.0000001", False),
        (None, "18", False),
        ("18", None, False),
        ("abc", "18", False),
    ],
)
def test_answers_match(predicted, gold, match):
    assert answers_match(predicted, gold) is match


def test_answer_status_all_four():
    assert answer_status("18.0", "18") == "correct"
    assert answer_status("17", "18") == "wrong"
    assert answer_status(None, "18") == "unparseable"
    assert answer_status(None, None) == "unparseable"
    assert answer_status("18", None) == "no_gold"
    statuses = {answer_status(p, g) for p, g in [("1", "1"), ("1", "2"), (None, "1"), ("1", None)]}
    assert statuses == set(ANSWER_STATUSES) - {"timeout"}  # only math-verify times out: tests/test_math_answers.py


def test_status_from_extraction():
    gold = normalize_answer("1,080")
    assert answer_status(extract_answer("so it costs $1,080.00").answer, gold) == "correct"
    assert answer_status(extract_answer("no idea").answer, gold) == "unparseable"


# --- properties -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_extract_never_raises(text):
    result = extract_answer(text)
    assert result.source in ANSWER_SOURCES + (None,)
    assert (result.answer is None) == (result.source is None)


_ANSWERISH = st.text(alphabet="0123456789 ,.$-+/#%<>=:\n\\{}boxedfracAnswer is", max_size=60)


@settings(max_examples=300, deadline=None)
@given(_ANSWERISH)
def test_extract_never_raises_on_number_soup(text):
    result = extract_answer(text)
    if result.answer is not None:  # a number comes normalised; a symbolic answer is never a plain number
        value = number_value(result.answer)
        assert value is None or normalize_number(value) == result.answer


@settings(max_examples=300, deadline=None)
@given(
    st.fractions(
        min_value=Fraction(-(10**9)), max_value=Fraction(10**9), max_denominator=64
    )
)
def test_normalize_round_trip(value):
    text = normalize_number(value)
    assert parse_number(text) == value
    assert normalize_number(parse_number(text)) == text
    assert answers_match(text, normalize_number(value))
    assert extract_answer(f"#### {text}").answer == text
    assert extract_answer(f"so it is {text}.").answer == text

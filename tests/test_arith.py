"""The synthetic GSM8K-format task (factory.problems.arith): splits, determinism, valid rationales, variety."""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from factory.ids import content_id
from factory.problems.arith import (
    ITEMS,
    NAMES,
    ArithConfig,
    Program,
    generate_problems,
    generate_with_programs,
    render_rationale,
)
from factory.schema import from_rows
from factory.reasoning_steps import split_steps

from factory.calculator import check_annotations

SIZES = {"train": 200, "dev": 20, "answers": 40, "unlabeled": 40, "test": 60, "test_ood": 60}
CONFIG = ArithConfig(seed=3, sizes=SIZES)
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
NUMBER = re.compile(r"\d+")


@pytest.fixture(scope="module")
def pairs():
    return generate_with_programs(CONFIG)


@pytest.fixture(scope="module")
def rows(pairs):
    return [row for row, _ in pairs]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr: str) -> Fraction:
    """Exact value of + - * / arithmetic on integers; anything else is refused."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"refused: {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval"))


def check_rationale(rationale: str, answer: str, lo: int, hi: int) -> list[str]:
    """Raise AssertionError unless the rationale is valid; return its lines' lhs expressions."""
    lines = rationale.split("\n")
    assert lines[-1] == f"#### {answer}", rationale
    steps = split_steps(rationale)
    assert lo <= len(steps) <= hi, rationale
    assert len(steps) == len(lines) - 1
    lhs_all = []
    for line in steps:
        found = ANNOTATION.findall(line)
        assert len(found) == 1, line
        lhs, rhs = found[0]
        value = safe_eval(lhs)
        assert value == Fraction(int(rhs)), line
        assert value.denominator == 1 and 0 < value < 1000, line
        assert f">>{rhs}" in line, line  # the result is repeated after the annotation
        assert line.replace("$", "").find(f"{lhs}=<<{lhs}=") >= 0, line
        lhs_all.append(lhs)
    assert safe_eval(lhs_all[-1]) == int(answer)
    result = check_annotations(rationale)
    assert result.total == len(steps) and result.wrong == 0 and result.invalid == 0, rationale
    return lhs_all


def test_deterministic_and_seeded(rows):
    assert generate_problems(CONFIG) == rows
    other = generate_problems(ArithConfig(seed=4, sizes=SIZES))
    assert len({r["question"] for r in rows} & {r["question"] for r in other}) < len(rows) // 10


def test_deterministic_across_processes():
    code = (
        "import hashlib, json; from factory.problems.arith import ArithConfig, generate_problems; "
        "rows = generate_problems(ArithConfig(seed=5, sizes={'train': 30, 'test': 30, 'unlabeled': 10})); "
        "print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip()
        for seed in ("1", "2")
    }
    here = generate_problems(ArithConfig(seed=5, sizes={"train": 30, "test": 30, "unlabeled": 10}))
    assert digests == {hashlib.sha256(json.dumps(here, sort_keys=True).encode()).hexdigest()}


def test_splits_columns_and_schema(rows):
    assert Counter(r["split"] for r in rows) == Counter(SIZES)
    assert [r["split"] for r in rows] == sorted((r["split"] for r in rows), key=list(SIZES).index)
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == len(questions)  # no question twice, in a split or across splits
    table = from_rows(rows, "problems")
    assert table.num_rows == len(rows)
    for row in rows:
        assert set(row) == {"problem_id", "question", "gold_answer", "gold_rationale", "source", "split", "n_steps"}
        assert row["problem_id"] == content_id("problem", row["question"])
        assert row["source"] == "arith"
        split = row["split"]
        assert (row["gold_rationale"] is not None) == (split in ("train", "dev"))
        assert (row["gold_answer"] is not None) == (split != "unlabeled")
        if row["gold_answer"] is not None:
            assert re.fullmatch(r"[1-9]\d*", row["gold_answer"])
        assert not re.search(r"\d,\d|\d\.\d", row["question"])  # plain digits: no commas, no decimals


def test_test_sets_do_not_depend_on_training_sizes(rows):
    bigger = generate_problems(ArithConfig(seed=3, sizes={**SIZES, "train": 260}))
    assert [r for r in bigger if r["split"] == "test"] == [r for r in rows if r["split"] == "test"]


def test_gold_rationales_are_valid(pairs):
    for row, program in pairs:
        lo, hi = (5, 6) if row["split"] == "test_ood" else (2, 4)
        assert lo <= row["n_steps"] <= hi and row["n_steps"] == program.n_steps
        rationale = row["gold_rationale"] or render_rationale(program, random.Random(0))
        lhs = check_rationale(rationale, str(program.answer), lo, hi)
        assert len(split_steps(rationale)) == row["n_steps"]
        if row["gold_answer"] is not None:
            assert row["gold_answer"] == str(program.answer)
        # the first line only uses numbers written in the question
        question_numbers = set(NUMBER.findall(row["question"]))
        assert set(NUMBER.findall(lhs[0])) <= question_numbers, (row["question"], rationale)
        # so does every leaf of the program
        assert {str(v) for v in program.leaves()} <= question_numbers
        assert 10 <= len(row["question"].split()) <= 110


def test_program_json_round_trip(pairs):
    for _, program in pairs[:50]:
        again = Program.from_json(program.to_json())
        assert again == program
        assert render_rationale(again, random.Random(7)) == render_rationale(program, random.Random(7))


def test_several_rationales_per_problem(pairs):
    train = [(row, program) for row, program in pairs if row["split"] == "train"]
    assert len(train) == 200
    distinct = []
    orders_vary = 0
    for row, program in train:
        texts = {row["gold_rationale"]}
        for seed in range(6):
            text = render_rationale(program, random.Random(seed))
            check_rationale(text, row["gold_answer"], 2, 4)
            texts.add(text)
        distinct.append(len(texts))
        orders_vary += len({tuple(ANNOTATION.findall(t)) for t in texts}) > 1
    assert sum(d >= 3 for d in distinct) >= 0.9 * len(train)
    assert orders_vary >= 0.9 * len(train)  # the calculations themselves (not only the words) vary


def test_independent_steps_change_order(pairs):
    """Programs with independent sub-results render their lines in more than one order."""
    reordered = 0
    for _, program in pairs[:200]:
        results = set()
        for seed in range(8):
            text = render_rationale(program, random.Random(seed))
            results.add(tuple(rhs for _, rhs in ANNOTATION.findall(text)))
        reordered += len(results) > 1
    assert reordered >= 20


def test_order_bias_follows_the_story(pairs):
    for _, program in pairs[:100]:
        results = {tuple(rhs for _, rhs in ANNOTATION.findall(render_rationale(program, random.Random(seed),
                                                                                  order_bias=1.0)))
                   for seed in range(4)}
        assert len(results) == 1 or any(len(step.args) > 2 for step in program.steps)
    rows = generate_problems(ArithConfig(seed=3, sizes={"train": 20}, gold_order_bias=1.0))
    for row in rows:
        check_rationale(row["gold_rationale"], row["gold_answer"], 2, 4)


def _skeleton(sentence: str) -> str:
    sentence = NUMBER.sub("#", sentence)
    for name, _ in NAMES:
        sentence = re.sub(rf"\b{name}\b", "N", sentence)
    for item in ITEMS:
        sentence = re.sub(rf"\b{item.many}\b", "I", sentence)
        sentence = re.sub(rf"\b{item.one}\b", "I", sentence)
    return sentence


def test_many_templates_and_modest_vocabulary(rows):
    sentences = [s for r in rows for s in re.split(r"(?<=[.?])\s+", r["question"])]
    skeletons = Counter(_skeleton(s) for s in sentences)
    assert len(skeletons) >= 100
    final_questions = Counter(_skeleton(re.split(r"(?<=[.?])\s+", r["question"])[-1]) for r in rows)
    assert len(final_questions) >= 25
    words = Counter(w for r in rows for w in re.findall(r"[A-Za-z']+", r["question"] + (r["gold_rationale"] or "")))
    assert 150 <= len(words) <= 600


def test_distractors(pairs):
    with_unused = 0
    for row, program in pairs:
        unused = set(NUMBER.findall(row["question"])) - {str(v) for v in program.leaves()}
        with_unused += bool(unused)
    assert 0.3 * len(pairs) <= with_unused <= 0.9 * len(pairs)
    clean = generate_with_programs(ArithConfig(seed=3, sizes={"train": 100}, max_distractors=0))
    for row, program in clean:  # without distractors every number in the question is needed
        assert set(NUMBER.findall(row["question"])) == {str(v) for v in program.leaves()}, row["question"]


def test_difficulty_knobs():
    rows = generate_problems(ArithConfig(seed=1, sizes={"train": 60, "test_ood": 30}, min_steps=3, max_steps=3,
                                         ood_min_steps=7, ood_max_steps=8, max_operand=9))
    for row in rows:
        expected = {3} if row["split"] == "train" else {7, 8}
        assert row["n_steps"] in expected
    with pytest.raises(ValueError):
        ArithConfig(min_steps=4, max_steps=2)
    with pytest.raises(ValueError):
        ArithConfig(families=("nope",))

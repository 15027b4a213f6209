"""Answers beyond plain numbers: MATH-style extraction and golds, math-verify under our own timeout, canonical votes."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.answers import Extraction, answer_status, extract_answer, number_value, read_answer
from factory.cli import main
from factory.ids import content_id
from factory.labelers import label_samples, vote_table
from factory.labelers.symbolic import TIMEOUT, Verifier
from factory.recipes.scpo import ScPOPairs, scpo_pairs
from factory.problems.files import load_hf, load_jsonl
from factory.schema import from_rows

FIXTURES = Path(__file__).parent / "fixtures"
MATH = FIXTURES / "math_sample.jsonl"
GSM8K = FIXTURES / "gsm8k_sample.jsonl"
# Evaluating it would take far longer than any timeout here (math-verify's own check hangs on it).
PATHOLOGICAL = r"2^{2^{2^{2^{2^{2}}}}}"


@pytest.fixture(scope="module")
def verifier():
    verifier = Verifier(workers=2)
    yield verifier
    verifier.close()


@pytest.fixture(scope="module")
def inline():
    """math-verify in this process's main thread (pytest runs tests there)."""
    return Verifier(workers=0)


def math_problems() -> pa.Table:
    problems, dropped = load_jsonl(str(MATH))
    assert dropped == []
    return from_rows(problems, "problems")


def label(rows: list[tuple[str, str]], problems: pa.Table, verifier, **options) -> pa.Table:
    """Labels of (problem_id, text) samples."""
    samples = pa.table({"sample_id": [f"s-{i}" for i in range(len(rows))], "problem_id": [p for p, _ in rows],
                        "text": [t for _, t in rows]})
    return label_samples(samples, problems, verifier=verifier, **options)


# --- extraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer, source",
    [
        (r"so $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}", "boxed"),
        (r"\boxed{\dfrac{\sqrt{2^{x}}}{3}}", r"\dfrac{\sqrt{2^{x}}}{3}", "boxed"),  # braces three deep
        (r"\boxed{\boxed{5}}", "5", "boxed"),
        (r"so $\boxed 5$ and then \boxed{\sqrt{2}}", r"\sqrt{2}", "boxed"),
        (r"\boxed{\sqrt{2}}, or rather $\boxed 5$", "5", "boxed"),  # a box without braces, as MATH has a few
        (r"\boxed{3\sqrt{13}}", r"3\sqrt{13}", "boxed"),
        (r"\boxed{\sqrt{51}}", r"\sqrt{51}", "boxed"),
        (r"\boxed{-\frac{\pi}{6}}", r"-\frac{\pi}{6}", "boxed"),
        (r"\boxed{(3,4]}", "(3,4]", "boxed"),
        (r"\boxed{(2,\infty)}", r"(2,\infty)", "boxed"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}", "boxed"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}", "boxed"),
        (r"\boxed{52_8}", "52_8", "boxed"),
        (r"\boxed{6 - 5i}", "6 - 5i", "boxed"),
        (r"\boxed{2k}", "2k", "boxed"),
        (r"\boxed{7\pi}", r"7\pi", "boxed"),
        (r"\boxed{x^2 + y^2 = 25}", "x^2 + y^2 = 25", "boxed"),  # an equation is not its right side
        (r"\boxed{x = 1, y = 2}", "x = 1, y = 2", "boxed"),
        (r"\boxed{5 x}", "5 x", "boxed"),  # one letter after a number is a variable in a box, not a unit
        (r"\boxed{4 a^2}", "4 a^2", "boxed"),
        # plain numbers inside a box, as before: after `lhs =`, with units, degrees, percent, dollars
        (r"\boxed{x = 5}", "5", "boxed"),
        (r"\boxed{30^\circ}", "30", "boxed"),
        (r"\boxed{50\%}", "50", "boxed"),
        (r"\boxed{\$18.90}", "18.9", "boxed"),
        (r"\boxed{5 \text{ cm}}", "5", "boxed"),
        (r"\boxed{1{,}080}", "1080", "boxed"),
        # math after a marker: a math environment, or a span that looks like math
        (r"Final Answer: The final answer is $\frac{\sqrt3}{2}$. I hope it is correct.", r"\frac{\sqrt3}{2}",
         "the_answer_is"),
        (r"The answer is 7\pi.", r"7\pi", "the_answer_is"),
        ("#### 6 - 5i", "6 - 5i", "hashes"),
        (r"Answer: $(2,\infty)$", r"(2,\infty)", "answer_colon"),
        # a whole text of math that is not a plain number
        ("3+2x", "3+2x", "whole"),
        ("2^{1/2}", "2^{1/2}", "whole"),
        (r"$\frac12$", r"\frac12", "whole"),
        ("1/2", "0.5", "last_number"),
        # GSM8K-style text reads as it always did
        ("The answer is 8 apples because 5+3=8", "8", "the_answer_is"),
        ("#### 18 - 2 = 16", "18", "hashes"),
        ("#### 5 m", "5", "hashes"),
        ("she had 7 t", "7", "last_number"),
        ("7 t", "7", "last_number"),  # a cut-off word, not 7t
        ("The answer is $5 + $3 = $8", "5", "the_answer_is"),
        ("T", None, None),  # a cut-off sample's one letter is no answer
    ],
)
def test_extraction_of_math_answers(text, answer, source):
    assert extract_answer(text) == Extraction(answer, source)


@pytest.mark.parametrize(
    "text, gold",
    [
        (r"\frac{14}{3}", "14/3"),
        ("1,080", "1080"),
        (r"\$18.90", "18.9"),
        (r"90^\circ", "90"),
        (r"$\sqrt{51}$", r"\sqrt{51}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
        ("Evelyn", "Evelyn"),
        (r"so \boxed{x = 5}.", "5"),
        (r"1\frac{1}{2}", "1.5"),  # a mixed number (this was read as 11/2)
        (r"2\frac{3}{2}", r"2\frac{3}{2}"),  # not a mixed number: math-verify reads it
        ("  ", None),
    ],
)
def test_read_answer_keeps_a_gold_as_written_unless_it_is_a_number(text, gold):
    assert read_answer(text) == gold


# --- math-verify's verdicts (documented in factory.labelers.symbolic) --------------------------------------


@pytest.mark.parametrize(
    "gold, predicted, same",
    [
        (r"\text{(C)}", "C", True),
        (r"\text{(C)}", "(C)", True),
        (r"\text{(C)}", r"\text{C}", True),
        (r"\text{(C)}", r"\text{(D)}", False),
        (r"\text{Evelyn}", "Evelyn", True),
        (r"\text{Evelyn}", r"\text{Bob}", False),
        ("52_8", "52_{8}", True),
        ("52_8", "52", False),  # math-verify alone says True: it drops the base
        ("52_8", "42", False),
        ("4210_{5}", "4210_5", True),
        ("4210_{5}", "555", False),
        ("(3,4]", "(3, 4]", True),
        ("(3,4]", "(3,4)", False),
        (r"(2,\infty)", "2", False),
        (r"(-\infty,1)\cup(2,\infty)", r"(-\infty, 1) \cup (2, \infty)", True),
        ("x=5", "5", True),
        ("5", "x=5", True),
        ("x=5", "y=5", False),
        ("y = 2x + 3", "2x+3", True),
        ("y=2x+3", "y=3+2x", True),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
        (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 4 & 3 \end{pmatrix}", False),
        (r"\{1,2\}", r"\{2,1\}", True),
        (r"\{1,2\}", r"\{1,3\}", False),
        (r"\frac12", r"\dfrac{1}{2}", True),
        (r"\frac12", "0.5", True),
        (r"\sqrt{2}", "2^{1/2}", True),
        (r"\sqrt{51}", "51", False),
        ("1/3", "0.333333", True),  # within the 1e-6 relative tolerance of plain numbers
        ("1/3", "0.33", False),
        (r"\frac13", "0.33", False),
        ("2x+3", "3+2x", True),
        ("2x+3", "-2x-3", False),
        (r"-\frac{\pi}{6}", r"\frac{\pi}{6}", False),
        ("6 - 5i", "6-5i", True),
        ("6-5i", "6+5i", False),
        (r"3\sqrt{13}", r"\sqrt{117}", True),
        ("p - q", "q - p", False),
        ("2k", "2", False),
        (r"7\pi", "7", False),
        (r"2^{10}", "1024", True),
    ],
)
def test_math_verify_edge_cases(inline, gold, predicted, same):
    assert inline.equivalent([(gold, predicted)]) == [same]


def test_rational_answers_get_their_number_text(inline):
    assert inline.rational([r"\frac12", "1/2", r"\sqrt{4}", r"2^{10}", r"\sqrt{2}", "52_8", "x"]) == [
        "0.5", "0.5", "2", "1024", None, None, None]


# --- timeouts: our own, in any thread ------------------------------------------------------


def test_a_pathological_answer_times_out_in_a_thread():
    verifier = Verifier(workers=1, timeout_s=1)
    results = {}

    def work():
        results["ops"] = verifier.equivalent([("1", PATHOLOGICAL), ("2x+3", "3+2x")])
        results["status"] = answer_status(PATHOLOGICAL, "7", verifier=verifier)

    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        verifier.close()
    assert results == {"ops": [TIMEOUT, True], "status": "timeout"}


def test_a_pathological_answer_times_out_in_the_main_thread():
    before = signal.getsignal(signal.SIGALRM)
    verifier = Verifier(workers=0, timeout_s=1)
    assert verifier.equivalent([("1", PATHOLOGICAL), (r"\frac12", "0.5")]) == [TIMEOUT, True]
    assert verifier.pids() == [] and signal.getsignal(signal.SIGALRM) is before  # no child; our alarm is gone


def test_a_stuck_worker_is_killed_and_replaced():
    verifier = Verifier(workers=1, timeout_s=1, grace_s=1)
    try:
        assert verifier.equivalent([("1", "1.0")]) == [True]
        (stuck,) = verifier.pids()
        os.kill(stuck, signal.SIGSTOP)  # as if stuck in C code, where no alarm reaches it
        assert verifier.equivalent([("2x", "x+x")]) == [TIMEOUT]
        (fresh,) = verifier.pids()
        assert fresh != stuck
        assert verifier.equivalent([("3x", "x+2x"), ("2x", "x+x")]) == [True, TIMEOUT]  # a verdict is kept
    finally:
        verifier.close()


# --- problems: the MATH format, from a file and from a dataset folder ---------------------------------------


EXPECTED_GOLDS = [
    "0.5", r"\sqrt{51}", r"-\frac{\pi}{6}", r"11\sqrt2", "y = 2x + 3", r"(2,\infty)", "(3,4]",
    r"(-\infty,1)\cup(2,\infty)", "6 - 5i", "(2,3)", r"\{-2,2\}", r"\begin{pmatrix} 2 & 2 \\ 3 & 5 \end{pmatrix}",
    r"\text{Evelyn}", r"\text{(C)}", "30", "52_8", "4210_{5}", "1080", "2x+3", r"3\sqrt{13}", "p - q", r"7\pi", "2k",
    "5", "18.9", "1/3", r"\sqrt{2}", r"\frac{\sqrt{3}}{3}", "50",
]


def test_math_file_loads_every_problem_with_its_gold():
    records = [json.loads(line) for line in MATH.read_text(encoding="utf-8").splitlines()]
    problems, dropped = load_jsonl(str(MATH))
    assert dropped == [] and len(problems) == len(records) == len(EXPECTED_GOLDS)
    assert [p["gold_answer"] for p in problems] == EXPECTED_GOLDS
    for problem, record in zip(problems, records):
        assert problem["question"] == record["problem"] and problem["gold_rationale"] == record["solution"]
        assert problem["problem_id"] == content_id("problem", record["problem"]) and problem["n_steps"] >= 1
        assert problem["source"] == "jsonl:math_sample.jsonl"
        if "answer" in record and number_value(record["answer"]) is None:
            assert problem["gold_answer"] == record["answer"]  # a symbolic gold is kept exactly as written


def test_math_records_without_a_box_or_with_a_question_field(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "What is 2 + 2?", "solution": "It is 4."},  # no box: dropped
        {"question": "What is 3 + 3?", "solution": r"So $\boxed{6}$."},  # a solution makes it MATH format
        {"problem": "Name it.", "answer": "", "solution": r"It is $\boxed{\text{Bo}}$."},  # empty answer: the box
        {"problem": "Unlabeled?"},
    ]) + "\n")
    problems, dropped = load_jsonl(str(path))
    assert [(p["gold_answer"], p["gold_rationale"] is not None) for p in problems] == [
        ("6", True), (r"\text{Bo}", True), (None, False)]
    assert [d["filter"] for d in dropped] == ["answer"] and "no \\boxed{} answer" in dropped[0]["reason"]


def test_math_as_released_a_folder_of_json_files_and_a_json_array(tmp_path):
    records = [json.loads(line) for line in MATH.read_text(encoding="utf-8").splitlines()]
    folder = tmp_path / "MATH" / "test"
    for index, record in enumerate(records):
        kind = folder / record["type"].lower().replace(" ", "_")
        kind.mkdir(parents=True, exist_ok=True)
        (kind / f"{index:03d}.json").write_text(json.dumps(record, indent=4), encoding="utf-8")
    (folder / "prealgebra" / "999.json").write_text(json.dumps(records[0]), encoding="utf-8")  # a repeat
    problems, dropped = load_jsonl(str(folder), split="test")
    by_question = {p["question"]: p["gold_answer"] for p in problems}
    assert len(problems) == len(records) and {p["source"] for p in problems} == {"jsonl:test"}
    assert [by_question[r["problem"]] for r in records] == EXPECTED_GOLDS
    assert [d["filter"] for d in dropped] == ["duplicate"]
    assert dropped[0]["reason"].startswith("test prealgebra/999.json: duplicate of prealgebra/000.json")
    array = tmp_path / "math.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    problems, dropped = load_jsonl(str(array))
    assert dropped == [] and [p["gold_answer"] for p in problems] == EXPECTED_GOLDS


def test_math_dataset_folder_loads_like_the_file(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    rows = [json.loads(line) for line in MATH.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row.setdefault("answer", None)
    folder = tmp_path / "tiny_math"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    problems, dropped = load_hf(str(folder))
    assert dropped == [] and [p["gold_answer"] for p in problems] == EXPECTED_GOLDS
    assert {p["split"] for p in problems} == {"test"} and {p["source"] for p in problems} == {"hf:tiny_math"}


# --- labels ------------------------------------------------------------------------------------


def test_reference_solutions_are_correct_and_other_answers_wrong(verifier):
    problems = math_problems()
    ids, golds = problems.column("problem_id").to_pylist(), problems.column("gold_answer").to_pylist()
    rationales = problems.column("gold_rationale").to_pylist()
    rows = list(zip(ids, rationales))
    rows += [(ids[i], f"So the answer is $\\boxed{{{golds[(i + 1) % len(ids)]}}}$.") for i in range(len(ids))]
    labels = label(rows, problems, verifier)
    statuses = labels.column("answer_status").to_pylist()
    assert statuses == ["correct"] * len(ids) + ["wrong"] * len(ids)
    canonical, n = labels.column("answer_canonical").to_pylist(), len(ids)
    # Gold i, written again as problem i-1's wrong answer, has the same canonical text there.
    assert [canonical[n + (i - 1) % n] for i in range(n)] == canonical[:n]


@pytest.mark.parametrize("template", ["{}", "The answer is $\\boxed{{{}}}$.",
                                      "Final Answer: The final answer is ${}$. I hope it is correct."])
def test_equivalent_forms_are_correct_and_near_misses_wrong(verifier, template):
    problems = math_problems()
    by_gold = dict(zip(problems.column("gold_answer").to_pylist(), problems.column("problem_id").to_pylist()))
    cases = [
        ("0.5", r"\dfrac{1}{2}", "correct"), ("0.5", r"\frac12", "correct"), ("0.5", "1/2", "correct"),
        (r"\sqrt{2}", "2^{1/2}", "correct"), ("30", "30", "correct"), ("2x+3", "3+2x", "correct"),
        (r"\text{(C)}", r"\text{C}", "correct"), ("y = 2x + 3", "2x+3", "correct"),
        (r"\{-2,2\}", r"\{2,-2\}", "correct"), ("30", r"30^{\circ}", "correct"), ("30", "30 degrees", "correct"),
        (r"11\sqrt2", r"\sqrt{242}", "correct"), ("52_8", "52_{8}", "correct"), ("1080", "1,080", "correct"),
        (r"\sqrt{51}", "51", "wrong"), ("1/3", "0.33", "wrong"), ("2x+3", "-2x-3", "wrong"),
        (r"-\frac{\pi}{6}", r"\frac{\pi}{6}", "wrong"), ("6 - 5i", "6+5i", "wrong"), ("(3,4]", "(3,4)", "wrong"),
        ("52_8", "52", "wrong"), (r"(2,\infty)", "2", "wrong"), ("2k", "2", "wrong"), (r"7\pi", "7", "wrong"),
    ]
    labels = label([(by_gold[gold], template.format(form)) for gold, form, _ in cases], problems, verifier)
    assert labels.column("answer_status").to_pylist() == [want for _, _, want in cases]


def test_equivalent_answers_share_a_canonical_text_and_vote_together(verifier):
    problems = from_rows([{"problem_id": "half", "question": "Half?", "gold_answer": "0.5", "source": "t",
                           "split": "t"},
                          {"problem_id": "root", "question": "Root?", "gold_answer": r"\sqrt{2}", "source": "t",
                           "split": "t"}], "problems")
    rows = [("half", r"\boxed{\frac{1}{2}}"), ("half", r"\boxed{\frac12}"), ("half", "1/2"), ("half", r"\boxed{0.6}"),
            ("root", r"\boxed{2^{1/2}}"), ("root", r"\boxed{\sqrt{2}}"), ("root", r"\boxed{\sqrt{3}}"),
            ("root", r"\boxed{3^{1/2}}"), ("root", r"\boxed{\sqrt{3}}"), ("root", "no idea")]
    labels = label(rows, problems, verifier)
    assert labels.column("answer").to_pylist()[:3] == ["0.5", r"\frac12", "0.5"]
    assert labels.column("answer_canonical").to_pylist() == [
        "0.5", "0.5", "0.5", "0.6", r"\sqrt{2}", r"\sqrt{2}", "3^{1/2}", "3^{1/2}", "3^{1/2}", None]
    assert labels.column("vote_count").to_pylist() == [3, 3, 3, 1, 2, 2, 3, 3, 3, 0]
    votes = {row["problem_id"]: row for row in vote_table(labels).to_pylist()}
    assert (votes["half"]["top_answer"], votes["half"]["majority_correct"], votes["half"]["n_answers"]) == (
        "0.5", True, 2)
    assert (votes["root"]["top_answer"], votes["root"]["majority_correct"]) == ("3^{1/2}", False)
    # Without gold (ScPO), answers cluster among themselves: the first in sorted order names the cluster.
    unjudged = label(rows, problems, verifier, labelers=("vote",))
    assert unjudged.column("answer_canonical").to_pylist()[4:] == [
        "2^{1/2}", "2^{1/2}", "3^{1/2}", "3^{1/2}", "3^{1/2}", None]


def test_scpo_votes_by_canonical_answer():
    samples = [{"sample_id": f"s-{i}", "problem_id": "p", "text": t}
               for i, t in enumerate([r"\boxed{\frac12}", r"\boxed{0.5}", r"\boxed{\frac{2}{4}}", r"\boxed{3}"])]
    labels = [{"sample_id": s["sample_id"], "problem_id": "p", "answer": a, "answer_canonical": c, "vote_count": v}
              for s, a, c, v in zip(samples, [r"\frac12", "0.5", "0.5", "3"], ["0.5", "0.5", "0.5", "3"],
                                    [3, 3, 3, 1])]
    rows, _ = scpo_pairs([{"problem_id": "p", "question": "Half?"}], samples, labels, prompt_for=lambda q: q,
                         iteration=1, config=ScPOPairs())
    # By `answer` the vote would tie (\frac12 and 0.5 both lead with 3 votes) and make no pair.
    assert {r["chosen_sample_id"] for r in rows} == {"s-0", "s-1", "s-2"}
    assert {r["rejected_sample_id"] for r in rows} == {"s-3"}


def test_a_timeout_is_a_status_not_a_verdict():
    problems = from_rows([{"problem_id": "p", "question": "?", "gold_answer": "7", "source": "t", "split": "t"}],
                         "problems")
    verifier = Verifier(workers=1, timeout_s=1)
    try:
        labels = label([("p", f"\\boxed{{{PATHOLOGICAL}}}"), ("p", r"\boxed{7}")], problems, verifier)
    finally:
        verifier.close()
    assert labels.column("answer_status").to_pylist() == ["timeout", "correct"]
    assert labels.column("correct").to_pylist() == [None, True]
    assert labels.column("answer_canonical").to_pylist() == [PATHOLOGICAL, "7"]


def test_numbers_never_start_math_verify():
    records = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    problems = from_rows([{"problem_id": f"p-{i}", "question": r["question"], "source": "t", "split": "t",
                           "gold_answer": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")}
                          for i, r in enumerate(records)], "problems")
    verifier = Verifier(workers=1)
    labels = label([(f"p-{i}", r["answer"]) for i, r in enumerate(records)], problems, verifier)
    assert set(labels.column("answer_status").to_pylist()) == {"correct"}
    assert labels.column("answer_canonical").equals(labels.column("answer")) and verifier.pids() == []


# --- the commands ------------------------------------------------------------------------------


def test_factory_problems_and_label_on_math(tmp_path, capsys):
    source = tmp_path / "math.jsonl"
    source.write_text(MATH.read_text(encoding="utf-8") + json.dumps({"problem": "Boxless?", "solution": "None."})
                      + "\n", encoding="utf-8")
    problems = tmp_path / "problems.parquet"
    assert main(["problems", f"jsonl:{source}", "--out", str(problems)]) in (0, None)
    table = pq.read_table(problems)
    assert table.num_rows == len(EXPECTED_GOLDS) and table.column("gold_answer").to_pylist() == EXPECTED_GOLDS
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"problem_id": p, "text": t}) + "\n" for p, t in zip(
        table.column("problem_id").to_pylist(), table.column("gold_rationale").to_pylist())), encoding="utf-8")
    labels = tmp_path / "labels.parquet"
    assert main(["label", str(samples), "--problems", str(problems), "--out", str(labels)]) in (0, None)
    assert set(pq.read_table(labels).column("answer_status").to_pylist()) == {"correct"}
    # A sample of the problem `factory problems` dropped: the error says so, on one line.
    dropped_id = content_id("problem", "Boxless?")
    samples.write_text(json.dumps({"problem_id": dropped_id, "text": r"\boxed{1}"}) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["label", str(samples), "--problems", str(problems), "--out", str(labels)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"samples.jsonl: row 1 field 'problem_id': '{dropped_id}' is not in the problems file" in error
    assert "factory problems dropped it, filter answer: math.jsonl line 30: field 'solution' has no" in error

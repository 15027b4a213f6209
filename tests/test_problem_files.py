"""Problem sources from files and the Hub (factory.problems.files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.answers import extract_answer
from factory.ids import content_id
from factory.problems.files import ProblemSourceError, load_gsm8k, load_hf, load_jsonl
from factory.schema import DROPPED, PROBLEMS, from_rows
from factory.reasoning_steps import split_steps

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = FIXTURES / "gsm8k_sample.jsonl"
# shared/ lies beside the repository, in development and in CI.
REAL_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
        encoding="utf-8",
    )
    return path


def check_tables(problems: list[dict], dropped: list[dict]) -> None:
    for row in problems:
        assert list(row) == PROBLEMS.names
    for row in dropped:
        assert set(row) == set(DROPPED.names)
        assert json.loads(row["row"])  # the original record, whole
    from_rows(problems, "problems", source="test")
    from_rows(dropped, "dropped", source="test")


# --- GSM8K files -------------------------------------------------------------------


def test_gsm8k_sample():
    problems, dropped = load_gsm8k(str(SAMPLE))
    check_tables(problems, dropped)
    assert len(problems) == 8 and dropped == []
    assert [p["gold_answer"] for p in problems] == ["18", "3", "70000", "2125", "114200", "15", "-10", "-3"]
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    for problem, record in zip(problems, records):
        assert problem["problem_id"] == content_id("problem", record["question"])
        assert problem["problem_id"].startswith("p-") and len(problem["problem_id"]) == 18
        assert problem["question"] == record["question"]
        assert problem["gold_rationale"] == record["answer"]
        assert problem["n_steps"] == len(split_steps(record["answer"])) > 0
        assert problem["source"] == "gsm8k:gsm8k_sample.jsonl"
        assert problem["split"] == "train"  # the stem is neither train nor test
        assert extract_answer(problem["gold_rationale"]).answer == problem["gold_answer"]
    assert "<<3/4=3/4>>" in problems[5]["gold_rationale"]


def test_gsm8k_split_from_stem_and_override(tmp_path):
    test_file = tmp_path / "test.jsonl"
    test_file.write_bytes(SAMPLE.read_bytes())
    problems, _ = load_gsm8k(str(test_file))
    assert {p["split"] for p in problems} == {"test"}
    assert {p["source"] for p in problems} == {"gsm8k:test.jsonl"}
    problems, _ = load_gsm8k(str(test_file), split="heldout")
    assert {p["split"] for p in problems} == {"heldout"}


def test_gsm8k_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gsm8k(str(tmp_path / "train.jsonl"))


# --- generic JSONL ---------------------------------------------------------------------


def test_jsonl_ids_answers_and_unlabeled(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": 7, "question": "What is 3 + 4?", "answer": "7"},
            "",
            {"id": "q2", "question": "How much is $1,000 plus $80?", "answer": "$1,080"},
            {"question": "What is 1 + 1?", "answer": "One plus one is <<1+1=2>>2.\n#### 2"},
            {"question": "What is half of 3?", "answer": "3/2"},
            {"question": "What is 2 + 2?"},
            {"question": "What is 5 - 5?", "answer": None},
            {"question": "What is 10 / 4?", "answer": 2.5},
        ],
    )
    problems, dropped = load_jsonl(str(path))
    check_tables(problems, dropped)
    assert dropped == []
    ids = [p["problem_id"] for p in problems]
    assert ids[:2] == ["7", "q2"]
    assert ids[2] == content_id("problem", "What is 1 + 1?")
    assert [p["gold_answer"] for p in problems] == ["7", "1080", "2", "1.5", None, None, "2.5"]
    assert [p["gold_rationale"] is not None for p in problems] == [False, False, True, False, False, False, False]
    assert [p["n_steps"] for p in problems] == [None, None, 1, None, None, None, None]
    assert {p["source"] for p in problems} == {"jsonl:mine.jsonl"}
    assert {p["split"] for p in problems} == {"train"}
    assert load_jsonl(str(path), split="unlabeled")[0][0]["split"] == "unlabeled"


def test_jsonl_custom_fields(tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"uid": "a", "problem": "What is 6 * 7?", "final": "42"}])
    problems, _ = load_jsonl(str(path), question_field="problem", answer_field="final", id_field="uid")
    assert problems[0]["problem_id"] == "a" and problems[0]["gold_answer"] == "42"


@pytest.mark.parametrize(
    "bad_line, fragments",
    [
        ('{"question": "What is 1 + 1?", "answer": "2"', ["line 3", "malformed JSON"]),
        ('{"answer": "2"}', ["line 3", "'question'", "missing"]),
        ('{"question": 12, "answer": "2"}', ["line 3", "'question'", "string"]),
        ('{"question": "   "}', ["line 3", "'question'", "empty"]),
        ('["What is 1 + 1?", "2"]', ["line 3", "'question'", "JSON object"]),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad_line, fragments):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}, "", bad_line])
    with pytest.raises(ProblemSourceError) as caught:
        load_jsonl(str(path))
    message = str(caught.value)
    assert "broken.jsonl" in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(caught.value, ValueError)


def test_jsonl_duplicates_and_bad_answers_are_dropped_with_reasons(tmp_path):
    records = [
        {"question": "What is 2 + 2?", "answer": "4"},  # line 1
        {"question": "What is 2 + 2?", "answer": "4"},  # line 2: same question
        {"id": "x", "question": "What is 3 + 3?", "answer": "6"},  # line 3
        {"id": "x", "question": "What is 3 + 4?", "answer": "7"},  # line 4: same id
        {"question": "What is 9 - 1?", "answer": "eight"},  # line 5: no number
        {"question": "What is 9 - 2?", "answer": "Nine minus two.\n#### seven"},  # line 6
        {"question": "What is 9 - 3?", "answer": "3:45"},  # line 7: several numbers
        {"question": "What is 9 - 4?", "answer": ["5"]},  # line 8: not text
        {"question": "What is 9 - 5?", "answer": "4"},  # line 9
    ]
    path = write_jsonl(tmp_path / "dups.jsonl", records)
    problems, dropped = load_jsonl(str(path))
    check_tables(problems, dropped)
    assert len(problems) + len(dropped) == len(records)
    assert [p["question"] for p in problems] == ["What is 2 + 2?", "What is 3 + 3?", "What is 9 - 5?"]
    assert [d["filter"] for d in dropped] == ["duplicate"] * 2 + ["answer"] * 4
    assert all(d["table"] == "problems" and d["stage"] == "problems" for d in dropped)
    by_line = {d["reason"].split(":")[0]: d for d in dropped}
    reason = {line: d["reason"] for line, d in by_line.items()}
    assert "duplicate of line 1" in reason["dups.jsonl line 2"]
    assert "duplicate of line 3" in reason["dups.jsonl line 4"]
    assert by_line["dups.jsonl line 4"]["row_id"] == "x"
    assert "'answer'" in reason["dups.jsonl line 5"] and "'eight'" in reason["dups.jsonl line 5"]
    assert "####" in reason["dups.jsonl line 6"] and "seven" in reason["dups.jsonl line 6"]
    assert "several numbers" in reason["dups.jsonl line 7"]
    assert "neither text nor a number" in reason["dups.jsonl line 8"]
    assert json.loads(by_line["dups.jsonl line 5"]["row"]) == records[4]
    assert by_line["dups.jsonl line 5"]["row_id"] == content_id("problem", "What is 9 - 1?")
    assert all(str(tmp_path) not in d["reason"] for d in dropped)  # no machine paths in data


# --- datasets: a tiny local save_to_disk folder, offline ----------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def test_load_hf_from_disk(offline, tmp_path):
    import datasets

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    folder = tmp_path / "tiny_gsm8k"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:5]),
            "test": datasets.Dataset.from_list(rows[5:] + rows[:1]),  # one repeat of a train question
        }
    ).save_to_disk(str(folder))

    problems, dropped = load_hf(str(folder))
    check_tables(problems, dropped)
    assert len(problems) == 8 and len(dropped) == 1
    assert [p["split"] for p in problems] == ["train"] * 5 + ["test"] * 3
    assert {p["source"] for p in problems} == {"hf:tiny_gsm8k"}
    assert [p["gold_answer"] for p in problems] == ["18", "3", "70000", "2125", "114200", "15", "-10", "-3"]
    assert dropped[0]["filter"] == "duplicate"
    assert "split 'test' row 4" in dropped[0]["reason"] and "split 'train' row 1" in dropped[0]["reason"]

    problems, dropped = load_hf(str(folder), split="test")
    assert len(problems) == 4 and dropped == [] and {p["split"] for p in problems} == {"test"}
    with pytest.raises(ProblemSourceError, match="validation"):
        load_hf(str(folder), split="validation")
    with pytest.raises(ProblemSourceError, match="'problem'"):
        load_hf(str(folder), question_field="problem")

    gsm_problems, _ = load_gsm8k(str(folder), split="test")
    assert {p["source"] for p in gsm_problems} == {"gsm8k:tiny_gsm8k"}


def test_load_hf_single_dataset_with_numeric_answers(offline, tmp_path):
    import datasets

    folder = tmp_path / "numeric"
    datasets.Dataset.from_list(
        [{"problem": "What is 6 * 7?", "value": 42}, {"problem": "What is 1 / 4?", "value": 0.25}]
    ).save_to_disk(str(folder))
    problems, dropped = load_hf(str(folder), question_field="problem", answer_field="value", split="eval")
    check_tables(problems, dropped)
    assert [p["gold_answer"] for p in problems] == ["42", "0.25"]
    assert {p["split"] for p in problems} == {"eval"}


def test_load_gsm8k_hub_path_calls_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "What is 1 + 1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, dropped = load_gsm8k("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert problems[0]["source"] == "gsm8k:openai/gsm8k" and problems[0]["split"] == "test"
    assert problems[0]["gold_answer"] == "2" and problems[0]["n_steps"] == 1
    load_gsm8k("openai/gsm8k")
    assert calls[-1] == ("openai/gsm8k", "main", "train")
    load_hf("someone/data", config="cfg", split="train[:10]")
    assert calls[-1] == ("someone/data", "cfg", "train[:10]")


# --- the real GSM8K files, when present ----------------------------------------------


@pytest.mark.parametrize("split, count", [("test", 1319), ("train", 7473)])
def test_real_gsm8k(split, count):
    path = REAL_GSM8K / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    problems, dropped = load_gsm8k(str(path))
    check_tables(problems, dropped)
    assert len(problems) == count and dropped == []
    assert {p["split"] for p in problems} == {split}
    assert len({p["problem_id"] for p in problems}) == count
    for problem in problems:
        assert problem["gold_answer"] is not None
        assert problem["n_steps"] >= 1
        extraction = extract_answer(problem["gold_rationale"])
        assert extraction.answer == problem["gold_answer"], problem["problem_id"]
        assert extraction.source == "hashes"

"""Carving the flywheel's splits out of a dataset's own train/test."""

from __future__ import annotations

import pytest

from factory.problems.splits import Carve, CarveError, carve_splits, parse_carve


def _problems(n: int, split: str = "train") -> list[dict]:
    return [{"problem_id": f"{split}-{i}", "question": f"q{i}", "gold_answer": str(i), "gold_rationale": f"r{i}\n#### {i}",
             "source": "jsonl:x.jsonl", "split": split, "n_steps": 1} for i in range(n)]


def test_parse_carve_reads_from_to_and_count_and_refuses_other_spellings():
    assert parse_carve("train:dev=200") == Carve("train", "dev", 200)
    for bad in ("train=dev:2", "train:dev", "train:train=3", "train:dev=-1"):
        with pytest.raises(CarveError, match="--carve"):
            parse_carve(bad)


def test_carved_rows_keep_what_their_split_may_hold_and_the_rest_is_untouched():
    problems = _problems(10) + _problems(3, "test")
    carved = carve_splits(problems, [Carve("train", "dev", 2), Carve("train", "answers", 3),
                                     Carve("train", "unlabeled", 1)])
    assert [p["problem_id"] for p in carved] == [p["problem_id"] for p in problems]  # order kept
    by_split: dict[str, list[dict]] = {}
    for row in carved:
        by_split.setdefault(row["split"], []).append(row)
    assert {k: len(v) for k, v in by_split.items()} == {"train": 4, "dev": 2, "answers": 3, "unlabeled": 1, "test": 3}
    assert all(r["gold_rationale"] and r["gold_answer"] for r in by_split["dev"] + by_split["train"])
    assert all(r["gold_rationale"] is None and r["n_steps"] is None and r["gold_answer"] for r in by_split["answers"])
    assert all(r["gold_answer"] is None and r["gold_rationale"] is None for r in by_split["unlabeled"])
    assert carved[10:] == problems[10:]


def test_which_problems_move_depends_on_ids_and_seed_not_on_file_order():
    problems = _problems(50)
    moved = {p["problem_id"] for p in carve_splits(problems, [Carve("train", "dev", 10)]) if p["split"] == "dev"}
    shuffled = {p["problem_id"] for p in carve_splits(problems[::-1], [Carve("train", "dev", 10)]) if p["split"] == "dev"}
    other_seed = {p["problem_id"] for p in carve_splits(problems, [Carve("train", "dev", 10)], seed=1)
                  if p["split"] == "dev"}
    assert moved == shuffled and len(moved) == 10
    assert other_seed != moved


def test_asking_for_more_problems_than_a_split_has_names_the_split():
    with pytest.raises(CarveError, match=r"split 'train' has 4 problems"):
        carve_splits(_problems(6), [Carve("train", "dev", 2), Carve("train", "answers", 5)])
    with pytest.raises(CarveError, match=r"split 'validation' has 0 problems \(splits: train\)"):
        carve_splits(_problems(2), [Carve("validation", "dev", 1)])


def test_factory_problems_joins_sources_carves_splits_and_keeps_repeats_with_their_reason(tmp_path):
    from pathlib import Path

    import pyarrow.parquet as pq

    from factory.cli import main

    fixtures = Path(__file__).parent / "fixtures"
    out = tmp_path / "problems.parquet"
    sources = [f"gsm8k:{fixtures / 'gsm8k_sample.jsonl'}", f"jsonl:{fixtures / 'math_sample.jsonl'}",
               f"gsm8k:{fixtures / 'gsm8k_sample.jsonl'}"]
    assert main(["problems", *sources, "--split", "train", "--carve", "train:dev=3", "--carve", "train:answers=4",
                 "--out", str(out)]) == 0
    problems = pq.read_table(out).to_pylist()
    dropped = pq.read_table(tmp_path / "problems.dropped.parquet").to_pylist()
    gsm8k = sum(1 for line in (fixtures / "gsm8k_sample.jsonl").read_text().splitlines() if line.strip())
    assert [row["filter"] for row in dropped] == ["duplicate"] * gsm8k  # the second copy, each with its reason
    assert "the same problem as in gsm8k:gsm8k_sample.jsonl" in dropped[0]["reason"]
    splits = [p["split"] for p in problems]
    assert splits.count("dev") == 3 and splits.count("answers") == 4
    assert {p["source"] for p in problems} == {"gsm8k:gsm8k_sample.jsonl", "jsonl:math_sample.jsonl"}
    assert main(["problems", sources[0], "--carve", "test:dev=1", "--out", str(out)]) == 2

"""The `factory` command: help everywhere, problems and label on real GSM8K lines, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.cli import build_parser, main
from factory.lineage import read_provenance, read_table

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"
GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def subcommands():
    parser = build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("name", subcommands())
def test_every_command_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "Example: factory " + name in capsys.readouterr().out


def test_fast_path_does_not_import_heavy_libraries():
    code = "import sys, factory.cli; factory.cli.build_parser(); print(sorted(m for m in ('torch','transformers','trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def gold_as_samples(problems_path, samples_path):
    rows = read_table(problems_path, "problems").to_pylist()
    with open(samples_path, "w") as handle:
        for row in rows:
            handle.write(json.dumps({"problem_id": row["problem_id"], "text": row["gold_rationale"]}) + "\n")
    return len(rows)


def label_gold(tmp_path, source):
    problems = tmp_path / "problems.parquet"
    assert main(["problems", f"gsm8k:{source}", "--out", str(problems)]) == 0
    samples = tmp_path / "samples.jsonl"
    count = gold_as_samples(problems, samples)
    labels_path = tmp_path / "labels.parquet"
    assert main(["label", str(samples), "--problems", str(problems), "--out", str(labels_path)]) == 0
    return count, problems, read_table(labels_path, "labels").to_pylist()


def test_gold_rationales_label_as_correct_with_no_wrong_annotation(tmp_path):
    count, problems, labels = label_gold(tmp_path, FIXTURE)
    assert count == 8 and len(labels) == 8
    assert {row["answer_status"] for row in labels} == {"correct"}
    assert sum(row["calc_wrong"] for row in labels) == 0 and sum(row["calc_total"] for row in labels) > 0
    assert read_provenance(problems)["stage"] == "problems"
    assert pq.read_table(tmp_path / "problems.dropped.parquet").num_rows == 0


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="GSM8K development data not present")
def test_real_gsm8k_test_split(tmp_path):
    count, _, labels = label_gold(tmp_path, GSM8K_TEST)
    assert count == 1319
    assert all(row["correct"] for row in labels)
    assert sum(row["calc_wrong"] for row in labels) == 0


def test_label_errors_name_file_row_and_field(tmp_path, capsys):
    problems = tmp_path / "problems.parquet"
    main(["problems", f"gsm8k:{FIXTURE}", "--out", str(problems)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem_id": "p-x", "text": "#### 3"}) + "\n")
    assert main(["label", str(bad), "--problems", str(problems), "--out", str(tmp_path / "l.parquet")]) == 2
    assert "bad.jsonl: row 1 field 'problem_id': 'p-x' is not in the problems file" in capsys.readouterr().err
    bad.write_text(json.dumps({"problem_id": "p-x", "text": 3}) + "\n")
    assert main(["label", str(bad), "--problems", str(problems), "--out", str(tmp_path / "l.parquet")]) == 2
    assert "line 1 field 'text': expected a string, got 3" in capsys.readouterr().err
    bad.write_text('{"problem_id": "p-x", "text": "a"}\n{oops\n')
    assert main(["label", str(bad), "--problems", str(problems), "--out", str(tmp_path / "l.parquet")]) == 2
    assert "bad.jsonl: line 2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "l.parquet").exists()


def test_unknown_source_is_a_clear_error(tmp_path, capsys):
    assert main(["problems", "csv:x.csv", "--out", str(tmp_path / "p.parquet")]) == 2
    assert "unknown kind 'csv'" in capsys.readouterr().err


def test_arith_outside_a_project_uses_the_task_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["problems", "arith", "--split", "test", "--out", "test.parquet"]) == 0
    rows = read_table(tmp_path / "test.parquet", "problems").to_pylist()
    assert {row["split"] for row in rows} == {"test"} and all(row["gold_answer"] for row in rows)
    assert main(["problems", "arith", "--out", "x.parquet", "--params", "missing.yaml"]) == 2
    assert "missing.yaml: no such params file" in capsys.readouterr().err


def test_a_jsonl_field_of_mixed_types_is_named(tmp_path, capsys):
    problems = tmp_path / "problems.parquet"
    main(["problems", f"gsm8k:{FIXTURE}", "--out", str(problems)])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"problem_id": "p-1", "text": "a"}\n{"problem_id": ["p-2"], "text": "b"}\n')
    assert main(["label", str(mixed), "--problems", str(problems), "--out", str(tmp_path / "l.parquet")]) == 2
    assert "mixed.jsonl: line 2 field 'problem_id': got ['p-2'] (list)" in capsys.readouterr().err

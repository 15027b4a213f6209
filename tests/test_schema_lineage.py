import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory import lineage
from factory.ids import content_id, file_fingerprint
from factory.schema import PROBLEMS, TABLES, SchemaError, from_rows, validate

PUBLIC_COLUMNS = {
    "problems": ["problem_id", "question", "gold_answer", "gold_rationale", "source", "split"],
    "samples": ["sample_id", "problem_id", "iteration", "model_id", "generator", "parent_sample_id",
                "prefix_steps", "seed", "temperature", "text", "n_tokens", "finish_reason"],
    "labels": ["sample_id", "problem_id", "answer", "answer_status", "correct", "calc_total",
               "calc_wrong", "first_error_step", "vote_count", "vote_share", "vote_rank", "step_scores"],
    "pairs": ["pair_id", "problem_id", "iteration", "recipe", "prompt", "chosen", "rejected",
              "chosen_sample_id", "rejected_sample_id", "weight"],
    "dropped": ["row_id", "table", "stage", "filter", "reason", "row"],
}


@pytest.mark.parametrize("kind", sorted(PUBLIC_COLUMNS))
def test_public_column_names_are_declared(kind):
    assert set(PUBLIC_COLUMNS[kind]) <= set(TABLES[kind].names)


def problem(**overrides):
    row = {"problem_id": "p-1", "question": "What is 2+2?", "gold_answer": "4", "source": "test", "split": "train"}
    return row | overrides


def test_validate_names_file_column_and_row_of_a_null():
    table = pa.table({k: [v, v] for k, v in problem().items()}).set_column(
        0, "problem_id", pa.array(["p-1", None]))
    with pytest.raises(SchemaError, match=r"problems\.parquet: column 'problem_id' row 2: null"):
        validate(table, "problems", source="problems.parquet")


def test_validate_names_missing_required_column():
    table = pa.table({"problem_id": ["p-1"], "question": ["q"], "source": ["s"]})
    with pytest.raises(SchemaError, match=r"f\.parquet: problems table has no column 'split'"):
        validate(table, "problems", source="f.parquet")


def test_validate_names_row_of_a_bad_type_and_keeps_extra_columns():
    table = pa.table({**{k: [v, v] for k, v in problem().items()}, "n_steps": ["3", "three"]})
    with pytest.raises(SchemaError, match=r"column 'n_steps' row 2: expected int32, got 'three'"):
        validate(table, "problems", source="x")
    ok = validate(pa.table({**{k: [v] for k, v in problem().items()}, "extra": [1]}), "problems")
    assert ok.column_names[: len(PROBLEMS)] == PROBLEMS.names and ok.column_names[-1] == "extra"


def test_from_rows_names_row_and_field():
    with pytest.raises(SchemaError, match=r"row 2: required field 'question'"):
        from_rows([problem(), problem(question=None)], "problems")


def test_content_ids_are_stable_and_pinned():
    # A pinned value: an accidental change to id hashing must fail loudly (it would orphan every table).
    assert content_id("problem", "What is 2+2?") == "p-969c37745aae05ea"
    assert content_id("problem", "What is 2+2?") != content_id("problem", "What is 2+3?")
    with pytest.raises(ValueError, match="unknown id kind"):
        content_id("banana", "x")


def test_write_table_is_atomic_carries_provenance_and_is_deterministic(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("input")
    table = from_rows([problem()], "problems")
    out = lineage.write_table(table, tmp_path / "p.parquet", kind="problems", stage="problems",
                              params={"seed": 1}, inputs={"source": source})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "p.parquet"]
    assert not list(tmp_path.glob(".*tmp*"))
    record = lineage.read_provenance(out)
    assert record["stage"] == "problems" and record["params"] == {"seed": 1} and record["rows"] == 1
    assert record["inputs"] == {"source": file_fingerprint(source)}
    assert record["code_version"].startswith("0.")
    assert record["versions"] == lineage.library_versions()
    first = out.read_bytes()
    lineage.write_table(table, out, kind="problems", stage="problems", params={"seed": 1}, inputs={"source": source})
    assert out.read_bytes() == first
    assert lineage.read_table(out, "problems").to_pylist()[0]["question"] == "What is 2+2?"


def test_write_table_refuses_an_invalid_table_and_leaves_no_file(tmp_path):
    with pytest.raises(SchemaError):
        lineage.write_table(pa.table({"problem_id": ["p"]}), tmp_path / "bad.parquet", kind="problems", stage="x")
    assert list(tmp_path.iterdir()) == []


def test_read_provenance_of_a_foreign_file_is_none(tmp_path):
    pq.write_table(pa.table({"a": [1]}), tmp_path / "f.parquet")
    assert lineage.read_provenance(tmp_path / "f.parquet") is None


def test_model_lineage_round_trip(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    record = lineage.write_model_lineage(model, stage="warmup", parent=None, data={}, params={"lr": 1})
    assert record["model_id"].startswith("m-")
    assert lineage.read_model_lineage(model) == json.loads((model / "lineage.json").read_text())
    assert record["versions"] == lineage.library_versions() and record["code_version"].startswith("0.")
    # The lineage file itself does not change the model's id.
    assert lineage.model_id(model) == record["model_id"]
    (model / "model.safetensors").write_bytes(b"other weights")
    assert lineage.model_id(model) != record["model_id"]
    assert lineage.model_id("Qwen/Qwen2.5-0.5B") == "hub:Qwen/Qwen2.5-0.5B"

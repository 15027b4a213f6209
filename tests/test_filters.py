"""Filters: one tiny input per rule with its reason, near-duplicate edges, counts, and the CLI."""

import json
import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.cli import main
from factory.filters import (
    Filter,
    FilterConfig,
    FinalAnswerFilter,
    LengthFilter,
    NearDuplicateFilter,
    build_filters,
    join_labels,
    run_filters,
)
from factory.lineage import read_provenance, read_table, write_table
from factory.params import ParamsError, section
from factory.schema import SAMPLES, from_rows

WORDS = [f"w{i}" for i in range(10)]


def sample(sid, *, problem="p-1", index=0, text="Mia has 12+7=<<12+7=19>>19 marbles.\n#### 19", **over):
    row = {
        "sample_id": sid, "problem_id": problem, "iteration": 1, "model_id": "m-test", "generator": "hf",
        "parent_sample_id": None, "prefix_steps": None, "sample_index": index, "seed": 0, "temperature": 0.7,
        "top_p": 1.0, "max_new_tokens": 256, "calculator": True, "text": text, "n_tokens": 20,
        "finish_reason": "stop",
    }
    return row | over


def label(sid, *, problem="p-1", status="correct", **over):
    row = {
        "sample_id": sid, "problem_id": problem, "answer": "19", "answer_source": "hashes",
        "answer_status": status, "correct": {"correct": True, "wrong": False}.get(status), "n_steps": 1,
        "calc_total": 1, "calc_wrong": 0, "calc_invalid": 0, "first_error_step": None, "vote_count": None,
        "vote_share": None, "vote_rank": None, "step_scores": None,
    }
    return row | over


def joined(samples, labels):
    return join_labels(from_rows(samples, "samples").to_pylist(), from_rows(labels, "labels").to_pylist())


def reasons(result):
    return {row["row_id"]: row["reason"] for row in result.dropped}


# --- one rule, one tiny input, the reason asserted ---------------------------------------------


def test_final_answer_filter_names_the_value():
    rows = joined(
        [sample("s-ok"), sample("s-none"), sample("s-cut", finish_reason="length", n_tokens=256)],
        [label("s-ok"), label("s-none", status="unparseable", answer=None), label("s-cut", status="unparseable")],
    )
    result = FinalAnswerFilter().apply(rows)
    assert [row["sample_id"] for row in result.kept] == ["s-ok"]
    assert reasons(result) == {
        "s-none": "no final answer (answer_status=unparseable)",
        "s-cut": "truncated at max_new_tokens (finish_reason=length, max_new_tokens=256)",
    }
    assert result.counts == {"input": 3, "kept": 1, "dropped": {"no final answer": 1, "truncated at max_new_tokens": 1}}
    assert {row["filter"] for row in result.dropped} == {"final_answer"}


def test_length_filter_names_steps_and_tokens():
    rows = joined(
        [sample("s-ok", n_tokens=256), sample("s-bare", text="#### 19"), sample("s-long", n_tokens=300)],
        [label("s-ok"), label("s-bare", n_steps=0), label("s-long", n_steps=2)],
    )
    result = LengthFilter(min_steps=1, max_tokens=256).apply(rows)
    assert [row["sample_id"] for row in result.kept] == ["s-ok"]  # exactly max_tokens is kept
    assert reasons(result) == {
        "s-bare": "too few steps (n_steps=0 < min_steps=1)",
        "s-long": "too many tokens (n_tokens=300 > max_tokens=256)",
    }


def jaccard_text(shared):
    """A text whose word set shares `shared` of the 10 base words and adds none: Jaccard shared/10."""
    return " ".join(WORDS[:shared])


@pytest.mark.parametrize("shared, similarity, dropped", [(7, "0.700", False), (8, "0.800", True)])
def test_near_duplicate_threshold_edges(shared, similarity, dropped):
    rows = joined(
        [sample("s-a", index=0, text=" ".join(WORDS)), sample("s-other", index=1, text="something else entirely"),
         sample("s-b", index=2, text=jaccard_text(shared))],
        [label("s-a"), label("s-other"), label("s-b")],
    )
    result = NearDuplicateFilter(threshold=0.7).apply(rows)
    if dropped:
        assert reasons(result) == {"s-b": f"near-duplicate (of s-a, Jaccard {similarity} > 0.7)"}
    else:  # exactly at the threshold is kept: DPO-ST drops only above 0.7
        assert result.dropped == [] and len(result.kept) == 3


def test_near_duplicate_ignores_annotations_and_case():
    rows = joined(
        [sample("s-a", index=0, text="She has 3*4=<<3*4=12>>12 pens.\n#### 12"),
         sample("s-c", index=1, text="She has 3*4=12 pens so far.\n#### 12"),
         sample("s-b", index=2, text="SHE HAS 3*4=<<3*4=13>>12 PENS.\n#### 12")],
        [label("s-a"), label("s-c"), label("s-b")],
    )
    result = NearDuplicateFilter(threshold=0.7).apply(rows)
    assert [row["sample_id"] for row in result.kept] == ["s-a", "s-c"]  # s-c: 5 of 9 words shared
    assert reasons(result) == {"s-b": "near-duplicate (of s-a, Jaccard 1.000 > 0.7)"}


def test_near_duplicate_names_the_most_similar_kept_sample():
    extra = [f"x{i}" for i in range(5)]
    rows = joined(
        [sample("s-c", index=0, text=" ".join(WORDS[:5] + extra)),  # 5/15 with s-a: both kept
         sample("s-a", index=1, text=" ".join(WORDS)),
         sample("s-b", index=2, text=" ".join(WORDS + extra[:3]))],  # 8/15 with s-c, 10/13 with s-a
        [label("s-c"), label("s-a"), label("s-b")],
    )
    result = NearDuplicateFilter(threshold=0.5).apply(rows)
    assert reasons(result) == {"s-b": "near-duplicate (of s-a, Jaccard 0.769 > 0.5)"}


def test_identical_samples_in_different_groups_are_all_kept():
    text = "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12"
    rows = joined(
        [sample("s-right", text=text), sample("s-wrong", index=1, text=text),
         sample("s-other", problem="p-2", text=text)],
        [label("s-right"), label("s-wrong", status="wrong", answer="13"), label("s-other", problem="p-2")],
    )
    result = NearDuplicateFilter().apply(rows)
    assert result.dropped == [] and len(result.kept) == 3


def test_near_duplicates_do_not_depend_on_input_order():
    base = "Ann had 20 coins and gave 5 away so 20-5=<<20-5=15>>15 are left.\n#### 15"
    samples, labels = [], []
    for problem in ("p-1", "p-2"):
        for index, text in enumerate([base, base.replace("Ann", "She"), "20-5=<<20-5=15>>15\n#### 15",
                                      base, base.replace("coins", "COINS"), "Fifteen.\n#### 15"]):
            sid = f"s-{problem}-{index}"
            samples.append(sample(sid, problem=problem, index=index % 3, text=text))
            labels.append(label(sid, problem=problem, status="correct" if index < 4 else "wrong"))
    reference = None
    for seed in range(5):
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        rows = joined([samples[i] for i in order], labels)
        result = NearDuplicateFilter().apply(rows)
        assert [row["sample_id"] for row in result.kept] == [r["sample_id"] for r in rows if r in result.kept]
        outcome = (sorted(row["sample_id"] for row in result.kept), sorted(reasons(result).items()))
        assert reference is None or outcome == reference
        reference = outcome
    assert len(reference[1]) > 0 and len(reference[0]) > 0


# --- the base class ------------------------------------------------------------------------------


class OddIndex(Filter):
    name = "odd_index"

    def judge(self, row):
        return True if row["sample_index"] % 2 == 0 else (False, f"odd index (sample_index={row['sample_index']})")


def test_base_class_counts_and_builds_dropped_rows_that_round_trip():
    rows = joined([sample("s-0", index=0), sample("s-1", index=1), sample("s-3", index=3)],
                  [label("s-0"), label("s-1"), label("s-3")])
    result = OddIndex().apply(rows)
    assert result.counts == {"input": 3, "kept": 1, "dropped": {"odd index": 2}}
    first = result.dropped[0]
    assert {k: first[k] for k in ("row_id", "table", "stage", "filter", "reason")} == {
        "row_id": "s-1", "table": "samples", "stage": "filter", "filter": "odd_index",
        "reason": "odd index (sample_index=1)"}
    assert json.loads(first["row"]) == rows[1]


def test_a_drop_without_a_reason_is_an_error_naming_the_filter_and_row():
    class Bad(Filter):
        name = "bad"

        def judge(self, row):
            return False

    with pytest.raises(TypeError, match="filter 'bad' judged sample_id='s-0' as False"):
        Bad().apply(joined([sample("s-0")], [label("s-0")]))


# --- run_filters: join, order, counts --------------------------------------------------------------


def mixed_tables():
    dup = "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12"
    samples = [
        sample("s-0", index=0, text=dup), sample("s-1", index=1, text="#### 12"),
        sample("s-2", index=2, finish_reason="length", n_tokens=256), sample("s-3", index=3, text=dup),
        sample("s-4", index=4, text="3 boxes of 4 is 3*4=<<3*4=12>>12\nso twelve pens in all\n#### 12"),
        sample("s-5", index=5, n_tokens=900),
    ]
    labels = [label("s-0"), label("s-1", n_steps=0), label("s-2", status="unparseable"), label("s-3"),
              label("s-4", n_steps=2), label("s-5")]
    return from_rows(samples, "samples"), from_rows(list(reversed(labels)), "labels")


def test_run_filters_counts_reconcile_and_keep_input_order():
    samples, labels = mixed_tables()
    kept, dropped, counts = run_filters(samples, labels, FilterConfig())
    assert kept.schema == SAMPLES
    assert kept.column("sample_id").to_pylist() == ["s-0", "s-4"]
    assert kept.to_pylist() == [row for row in samples.to_pylist() if row["sample_id"] in {"s-0", "s-4"}]
    assert counts == {"input": 6, "kept": 2, "dropped": {
        "final_answer": {"truncated at max_new_tokens": 1},
        "length": {"too few steps": 1, "too many tokens": 1},
        "near_duplicate": {"near-duplicate": 1}}}
    assert counts["input"] == counts["kept"] + dropped.num_rows
    by_id = {row["row_id"]: row for row in dropped.to_pylist()}
    assert by_id["s-3"]["reason"] == "near-duplicate (of s-0, Jaccard 1.000 > 0.7)"
    original = {row["sample_id"]: row for row in samples.to_pylist()}
    label_of = {row["sample_id"]: row for row in labels.to_pylist()}
    for row_id, row in by_id.items():
        restored = json.loads(row["row"])
        assert {k: restored[k] for k in SAMPLES.names} == original[row_id]
        assert restored["answer_status"] == label_of[row_id]["answer_status"]


def test_a_sample_without_a_label_is_an_error_naming_it():
    samples, labels = mixed_tables()
    with pytest.raises(ValueError, match=r"s\.parquet: row 6: sample_id 's-5' has no label in l\.parquet"):
        run_filters(samples, labels.slice(1), FilterConfig(), samples_source="s.parquet", labels_source="l.parquet")


def test_filter_config_from_params_refuses_unknown_keys_and_bad_thresholds():
    assert section({"filter": {"max_tokens": 128}}, "filter", FilterConfig).max_tokens == 128
    assert [type(f).__name__ for f in build_filters(FilterConfig())] == [
        "FinalAnswerFilter", "LengthFilter", "NearDuplicateFilter"]
    with pytest.raises(ParamsError, match=r"section 'filter': unknown key\(s\) \['dedup'\]"):
        section({"filter": {"dedup": 0.5}}, "filter", FilterConfig)
    with pytest.raises(ParamsError, match=r"threshold must be within \[0, 1\], got 1.5"):
        section({"filter": {"dedup_threshold": 1.5}}, "filter", FilterConfig)


# --- the CLI -------------------------------------------------------------------------------------


def write_inputs(tmp_path):
    samples, labels = mixed_tables()
    write_table(samples, tmp_path / "samples.parquet", kind="samples", stage="sample")
    write_table(labels, tmp_path / "labels.parquet", kind="labels", stage="label")
    return tmp_path / "samples.parquet", tmp_path / "labels.parquet"


def test_cli_filter_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults apply
    samples, labels = write_inputs(tmp_path)
    args = ["filter", str(samples), "--labels", str(labels), "--out", "kept.parquet", "--dropped", "dropped.parquet"]
    assert main(args + ["--counts", "counts.json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kept.parquet: kept 2 of 6 samples; 4 dropped -> dropped.parquet (")
    assert "near_duplicate: near-duplicate 1" in out
    assert read_table("kept.parquet", "samples").column("sample_id").to_pylist() == ["s-0", "s-4"]
    assert read_table("dropped.parquet", "dropped").num_rows == 4
    provenance = read_provenance("kept.parquet")
    assert provenance["stage"] == "filter" and provenance["model_id"] == "m-test"
    assert provenance["params"] == {"filter": {"min_steps": 1, "max_tokens": 256, "dedup_threshold": 0.7,
                                                     "calculator_consistent": False}}
    assert set(provenance["inputs"]) == {"samples", "labels"}
    assert read_provenance("dropped.parquet")["stage"] == "filter"
    assert json.loads((tmp_path / "counts.json").read_text())["kept"] == 2

    (tmp_path / "params.yaml").write_text("filter:\n  max_tokens: 1000\n  min_steps: 0\n")
    assert main(args) == 0
    assert read_table("kept.parquet", "samples").column("sample_id").to_pylist() == ["s-0", "s-1", "s-4", "s-5"]


def test_cli_filter_errors_name_the_sample_and_the_file(tmp_path, capsys):
    samples, labels = write_inputs(tmp_path)
    table = read_table(labels, "labels")
    write_table(table.filter(pc.not_equal(table.column("sample_id"), "s-2")), labels, kind="labels",
                stage="label")
    out = tmp_path / "kept.parquet"
    args = ["filter", str(samples), "--labels", str(labels), "--out", str(out),
            "--dropped", str(tmp_path / "d.parquet")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"factory filter: error: {samples}: row 3: sample_id 's-2' has no label in {labels}" in err
    assert not out.exists()
    assert main(args[:-2] + ["--dropped", "d.parquet", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such params file" in capsys.readouterr().err


def test_calculator_consistency_filter_drops_inconsistent_samples_only_when_asked():
    from factory.filters import CalculatorConsistencyFilter, FilterConfig, build_filters

    assert "calculator_consistent" not in [f.name for f in build_filters(FilterConfig())]
    assert [f.name for f in build_filters(FilterConfig(calculator_consistent=True))] == [
        "final_answer", "length", "calculator_consistent", "near_duplicate"]
    table = pa.table({"calc_wrong": pa.array([0, 1, 0], pa.int32()), "calc_invalid": pa.array([0, 0, 2], pa.int32()),
                      "first_error_step": pa.array([None, 1, None], pa.int32())})
    rule = CalculatorConsistencyFilter()
    assert rule.reasons(table).to_pylist() == [
        None if verdict is True else verdict[1] for verdict in map(rule.judge, table.to_pylist())]
    assert rule.reasons(table).to_pylist()[1] == \
        "calculator inconsistent (calc_wrong=1, calc_invalid=0, first_error_step=1)"

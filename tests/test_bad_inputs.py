"""Every bad input is one clear line: the commands that read user files, against each kind of bad file.

For each (command, input, kind of damage) the CLI runs in-process (`factory.cli.main`) and must exit non-zero
with exactly one line on stderr (no traceback) that names the file, and write nothing. Model-reading commands
get a model path that does not exist, so no model is ever loaded. Rows and lines in messages are 1-based.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.cli import main
from factory.lineage import write_table
from factory.schema import from_rows

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"


@pytest.fixture(autouse=True)
def outside_a_project(tmp_path, monkeypatch):
    """Run where there is no params.yaml: every params default applies."""
    monkeypatch.chdir(tmp_path)


# --- good inputs ----------------------------------------------------------------------------------------


def problem_rows(n: int = 3) -> list[dict]:
    return [{"problem_id": f"p-{i}", "question": f"What is {i} + 1?", "gold_answer": str(i + 1),
             "gold_rationale": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}", "source": "test",
             "split": "answers" if i == 1 else "train", "n_steps": 1} for i in range(n)]


def sample_rows(n: int = 3) -> list[dict]:
    return [{"sample_id": f"s-{i}", "problem_id": f"p-{i % 3}", "iteration": 1, "model_id": "m-x",
             "generator": "sample", "parent_sample_id": None, "prefix_steps": None, "sample_index": i, "seed": 0,
             "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64, "calculator": True,
             "text": f"{i % 3}+1=<<{i % 3}+1={i % 3 + 1}>>{i % 3 + 1}\n#### {i % 3 + 1}", "n_tokens": 10,
             "finish_reason": "stop", "step_temperatures": None} for i in range(n)]


def pair_rows() -> list[dict]:
    return [{"pair_id": "pair-1", "problem_id": "p-0", "iteration": 1, "recipe": "dpo_st", "prompt": "q",
             "chosen": "a", "rejected": "b", "chosen_sample_id": None, "rejected_sample_id": None, "weight": 1.0,
             "prefix_steps": None, "chosen_node_id": None, "rejected_node_id": None}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """Good inputs for every command: problems, samples (Parquet and JSONL), labels, pairs."""
    folder = tmp_path_factory.mktemp("good")
    paths = {"problems": folder / "problems.parquet", "samples": folder / "samples.parquet",
             "pairs": folder / "pairs.parquet", "labels": folder / "labels.parquet",
             "samples_jsonl": write_jsonl(folder / "samples.jsonl", sample_rows())}
    write_table(from_rows(problem_rows(), "problems"), paths["problems"], kind="problems", stage="problems")
    write_table(from_rows(sample_rows(), "samples"), paths["samples"], kind="samples", stage="sample")
    write_table(from_rows(pair_rows(), "pairs"), paths["pairs"], kind="pairs", stage="pairs")
    assert main(["label", str(paths["samples"]), "--problems", str(paths["problems"]),
                 "--out", str(paths["labels"])]) == 0
    return paths


# --- bad inputs: each makes a damaged copy of a good input, in tmp_path ------------------------------------


def missing(tmp_path, good, kind):
    return tmp_path / f"missing_{kind}.parquet", "no such"


def empty(tmp_path, good, kind):
    path = tmp_path / f"empty_{kind}.parquet"
    path.write_bytes(b"")
    return path, "empty"


def folder(tmp_path, good, kind):
    """A folder holding two copies of the good file: read as a dataset it would be their union (duplicates)."""
    path = tmp_path / f"{kind}_folder"
    path.mkdir()
    for name in ("a.parquet", "b.parquet"):
        (path / name).write_bytes(good[kind].read_bytes())
    return path, "folder"


def truncated(tmp_path, good, kind):
    path = tmp_path / f"truncated_{kind}.parquet"
    data = good[kind].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "not a readable Parquet file"


def wrong_kind(tmp_path, good, kind):
    """A pairs table (factory wrote it) given where another kind is expected."""
    path = tmp_path / f"pairs_as_{kind}.parquet"
    path.write_bytes(good["pairs"].read_bytes())
    return path, "pairs table, expected a"


def duplicates(tmp_path, good, kind):
    path = tmp_path / f"duplicate_{kind}.parquet"
    table = pq.read_table(good[kind])
    pq.write_table(pa.concat_tables([table, table.slice(1, 1)]), path)
    key = "problem_id" if kind == "problems" else "sample_id"
    return path, f"rows 2 and 4 field '{key}': duplicate id"


def wrong_types(tmp_path, good, kind):
    path = tmp_path / f"wrong_types_{kind}.parquet"
    table = pq.read_table(good[kind])
    column = "question" if kind == "problems" else "text"
    values = [[1]] * table.num_rows
    table = table.set_column(table.column_names.index(column), column, pa.array(values))
    pq.write_table(table, path)
    return path, f"'{column}'"


def nan(tmp_path, good, kind):
    path = tmp_path / f"nan_{kind}.parquet"
    table = pq.read_table(good[kind])
    column = {"samples": "temperature", "labels": "vote_share"}[kind]
    values = table.column(column).to_pylist()
    values[1] = float("nan")
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values, pa.float64())), path)
    return path, f"row 2 field '{column}': nan is not a finite number"


def infinity_jsonl(tmp_path, good, kind):
    rows = sample_rows()
    rows[2]["temperature"] = float("inf")
    path = tmp_path / "inf_samples.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")  # json writes Infinity
    return path, "line 3 field 'temperature': inf is not a finite number"


def not_utf8_jsonl(tmp_path, good, kind):
    path = tmp_path / "latin1_samples.jsonl"
    rows = [json.dumps(row) for row in sample_rows()]
    path.write_bytes((rows[0] + "\n" + rows[1] + "\n").encode() + rows[2].replace("stop", "st\xe9p").encode("latin-1"))
    return path, "line 3: not UTF-8"


def duplicates_jsonl(tmp_path, good, kind):
    rows = sample_rows()
    path = write_jsonl(tmp_path / "dup_samples.jsonl", rows + [rows[0]])
    return path, "lines 1 and 4 field 'sample_id': duplicate id 's-0'"


def empty_jsonl(tmp_path, good, kind):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")
    return path, "no rows"


def pairs_jsonl_as_samples(tmp_path, good, kind):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows()), r"samples need a 'text' field|samples table has no column"


def text_not_string_jsonl(tmp_path, good, kind):
    rows = sample_rows()
    rows[1]["text"] = 3
    path = tmp_path / "int_text.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    return path, "line 3 field 'text'"


PARQUET_DAMAGE = [missing, empty, folder, truncated, wrong_kind, duplicates, wrong_types]
JSONL_DAMAGE = [not_utf8_jsonl, duplicates_jsonl, infinity_jsonl, empty_jsonl, pairs_jsonl_as_samples,
                text_not_string_jsonl]
MISSING_MODEL = "models/no_such_model"  # looks local (has a folder part that ...), never loaded


def commands(good, tmp_path, role, bad):
    """(argv, outputs) of each command reading `role` with `bad` in its place; outputs must not appear."""
    out = tmp_path / "out"
    inputs = {"problems": good["problems"], "samples": good["samples"], "labels": good["labels"], role: bad}
    model = str(tmp_path / "no_such_model")
    return {
        "label": (["label", str(inputs["samples"]), "--problems", str(inputs["problems"]),
                   "--out", str(out / "labels.parquet"), "--votes", str(out / "votes.parquet")], [out]),
        "filter": (["filter", str(inputs["samples"]), "--labels", str(inputs["labels"]),
                    "--out", str(out / "kept.parquet"), "--dropped", str(out / "dropped.parquet")], [out]),
        "sample": (["sample", "--model", model, "--problems", str(inputs["problems"]), "--iteration", "1",
                    "--out", str(out / "samples.parquet")], [out]),
        "eval": (["eval", "--model", model, "--problems", str(inputs["problems"]),
                  "--out", str(out / "metrics.json"), "--splits", "train"], [out]),
        "pairs": (["pairs", "--problems", str(inputs["problems"]), "--samples", str(inputs["samples"]),
                   "--labels", str(inputs["labels"]), "--model", model, "--iteration", "1",
                   "--out", str(out / "pairs.parquet")], [out]),
    }


READERS = {  # which commands read which input, and which damage applies to it
    "samples": (["label", "filter", "pairs"], PARQUET_DAMAGE + [nan]),
    "samples_jsonl": (["label", "filter", "pairs"], JSONL_DAMAGE),
    "problems": (["label", "sample", "eval", "pairs"], PARQUET_DAMAGE),
    "labels": (["filter"], [missing, empty, folder, truncated, wrong_kind, nan]),
}
# Cases a command still gets wrong (strict xfail: once fixed, the entry must go).
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}

CASES = [(command, role, damage) for role, (cmds, damages) in READERS.items() for damage in damages
         for command in cmds]


def run_bad(argv: list[str], outputs: list[Path], capsys) -> str:
    """Run the CLI on a bad input: non-zero exit, one line on stderr, nothing written. Returns that line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0, captured.out
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for path in outputs:
        assert not path.exists(), f"{path} was written"
    return lines[0]


@pytest.mark.parametrize(("command", "role", "damage"), CASES,
                         ids=[f"{c}-{r}-{d.__name__}" for c, r, d in CASES])
def test_bad_input_is_one_line_naming_the_file(command, role, damage, good, tmp_path, capsys, request):
    key = (command, role, damage.__name__)
    if key in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_GAPS[key], strict=True))
    bad, expected = damage(tmp_path, good, role.removesuffix("_jsonl"))
    argv, outputs = commands(good, tmp_path, role.removesuffix("_jsonl"), bad)[command]
    line = run_bad(argv, outputs, capsys)
    assert line.startswith(f"factory {command}: error: ")
    assert str(bad) in line
    assert re.search(expected, line), line


def test_missing_problems_file_says_what_it_is(good, tmp_path, capsys):
    line = run_bad(["label", str(good["samples"]), "--problems", str(tmp_path / "p.parquet"),
                    "--out", str(tmp_path / "l.parquet")], [tmp_path / "l.parquet"], capsys)
    assert line.endswith(f"no such problems file: {tmp_path / 'p.parquet'}")


def test_unknown_problem_row_is_one_based(good, tmp_path, capsys):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"problem_id": "p-0", "text": "#### 1"},
                                                 {"problem_id": "p-x", "text": "#### 2"}])
    line = run_bad(["label", str(samples), "--problems", str(good["problems"]), "--out", str(tmp_path / "l.parquet")],
                   [tmp_path / "l.parquet"], capsys)
    assert f"{samples}: row 2 field 'problem_id': 'p-x' is not in the problems file" in line


def test_samples_without_ids_sharing_a_text_each_vote_once_with_ids_of_their_own(good, tmp_path):
    """No sample_id: two rows with the same problem and text are two samples (both vote), never one id twice."""
    samples = write_jsonl(tmp_path / "same_texts.jsonl", [{"problem_id": "p-0", "text": "#### 1"},
                                                          {"problem_id": "p-0", "text": "#### 7"},
                                                          {"problem_id": "p-0", "text": "#### 1"}])
    labels = tmp_path / "labels.parquet"
    assert main(["label", str(samples), "--problems", str(good["problems"]), "--out", str(labels)]) == 0
    table = pq.read_table(labels)
    assert len(set(table.column("sample_id").to_pylist())) == 3
    assert table.column("vote_count").to_pylist() == [2, 1, 2]


# --- models: a path that cannot be a model is one line, before anything is loaded ---------------------------


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("model", ["missing_abs", "missing_dot", "missing_nested", "no_config", "a_file",
                                   "hub_id_offline"])
def test_a_model_that_is_not_there_is_one_line(command, model, good, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))  # an empty cache: nothing is there
    (tmp_path / "models").mkdir()
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    name, expected = {
        "missing_abs": (str(tmp_path / "nope"), f"no such model folder: {tmp_path / 'nope'}"),
        "missing_dot": ("./nope", "no such model folder: ./nope"),
        "missing_nested": ("models/iter_9", "no such model folder: models/iter_9"),
        # sample fingerprints the model folder first (factory.lineage.model_id), eval checks it as it loads it
        "no_config": ("empty_model", r"empty_model: (not a model folder \(no config.json in it\)|no model weights)"),
        "a_file": ("weights.bin", "weights.bin: not a model folder"),
        "hub_id_offline": ("some-org/some-model", "model 'some-org/some-model' is not in the local Hugging Face "
                                                  "cache and HF_HUB_OFFLINE is set"),
    }[model]
    argv, outputs = commands(good, tmp_path, "problems", good["problems"])[command]
    argv[argv.index("--model") + 1] = name
    line = run_bad(argv, outputs, capsys)
    assert re.match(f"factory {command}: error: " + (expected if model == "no_config" else re.escape(expected)), line)


def test_a_hub_id_still_goes_to_the_hub_loader(monkeypatch, tmp_path):
    """`org/name` is not mistaken for a missing folder: it is left to the Hub loader (here: a stand-in)."""
    import transformers

    from factory import modeling

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    def stand_in(name, **kwargs):
        asked.append(name)
        raise OSError("stand-in hub loader")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", stand_in)
    with pytest.raises(OSError, match="stand-in hub loader"):
        modeling.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert not modeling.looks_local("HuggingFaceTB/SmolLM2-135M-Instruct")


# --- problem sources -------------------------------------------------------------------------------------


def latin1_problems(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "Caf\xe9?", "answer": "3"}\n')
    return f"jsonl:{path}", f"{path}: line 2: not UTF-8"


def latin1_json(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"question": "What is 1 + 1?", "answer": "2"},\n {"question": "Caf\xe9?", "answer": "3"}]')
    return f"jsonl:{path}", f"{path}: line 2: not UTF-8"


def missing_jsonl(tmp_path):
    return f"jsonl:{tmp_path / 'nope.jsonl'}", f"no such problems file: {tmp_path / 'nope.jsonl'}"


def missing_gsm8k(tmp_path):
    return f"gsm8k:{tmp_path / 'nope'}", f"no such problems file or dataset folder: {tmp_path / 'nope'}"


def missing_hf_folder(tmp_path):
    return "hf:./nope", "no such problems file or dataset folder: ./nope"


def empty_problems(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return f"jsonl:{path}", f"{path}: no problems in this file"


def folder_problems(tmp_path):
    path = tmp_path / "folder"
    path.mkdir()
    return f"gsm8k:{path}", str(path)


def wrong_type_question(tmp_path):
    path = write_jsonl(tmp_path / "int_question.jsonl", [{"question": "What is 1 + 1?"}, {"question": 7}])
    return f"jsonl:{path}", f"{path}: line 2: field 'question' must be a string"


def samples_as_problems(tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", [{"problem_id": "p-0", "text": "#### 1"}])
    return f"jsonl:{path}", f"{path}: line 1: field 'question' is missing"


@pytest.mark.parametrize("source", [latin1_problems, latin1_json, missing_jsonl, missing_gsm8k, missing_hf_folder,
                                    empty_problems, folder_problems, wrong_type_question, samples_as_problems])
def test_bad_problem_source_is_one_line(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, expected = source(tmp_path)
    out = tmp_path / "out" / "problems.parquet"
    line = run_bad(["problems", spec, "--out", str(out)], [out.parent], capsys)
    assert expected in line


def test_unknown_arith_split_lists_the_known_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = run_bad(["problems", "arith", "--split", "tset", "--out", "p.parquet"], [tmp_path / "p.parquet"], capsys)
    assert "unknown split 'tset'" in line and "test" in line and "train" in line


def test_duplicate_problems_in_a_source_are_recorded_drops(tmp_path):
    """Where drops are recorded (problem sources), a repeated problem is one, never silently kept or lost."""
    source = write_jsonl(tmp_path / "dups.jsonl", [{"id": "a", "question": "1+1?", "answer": "2"},
                                                  {"id": "a", "question": "1+2?", "answer": "3"},
                                                  {"id": "b", "question": "2+2?", "answer": float("nan")}])
    out = tmp_path / "p.parquet"
    assert main(["problems", f"jsonl:{source}", "--out", str(out)]) == 0
    dropped = pq.read_table(tmp_path / "p.dropped.parquet").to_pylist()
    assert [(d["row_id"], d["filter"]) for d in dropped] == [("a", "duplicate"), ("b", "answer")]
    assert "line 2" in dropped[0]["reason"] and "not a finite number" in dropped[1]["reason"]


# --- outputs: the message names the path given, never a temporary file -------------------------------------


def label_argv(good, out):
    return ["label", str(good["samples"]), "--problems", str(good["problems"]), "--out", str(out)]


def test_out_is_an_existing_folder(good, tmp_path, capsys):
    out = tmp_path / "labels.parquet"
    out.mkdir()
    line = run_bad(label_argv(good, out), [], capsys)
    assert line == f"factory label: error: --out {out}: is a folder, expected a file to write"
    problems_out = tmp_path / "problems.parquet"
    problems_out.mkdir()
    line = run_bad(["problems", f"gsm8k:{FIXTURE}", "--out", str(problems_out)], [], capsys)
    assert f"--out {problems_out}: is a folder" in line


def test_out_in_a_folder_that_is_not_writable(good, tmp_path, capsys, monkeypatch):
    import os

    out = tmp_path / "ro" / "labels.parquet"
    out.parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out.parent else real_access(path, mode))
    line = run_bad(label_argv(good, out), [out], capsys)
    assert line == f"factory label: error: --out {out}: folder {out.parent} is not writable"


@pytest.mark.parametrize("failure", ["permission", "full_disk", "replace_onto_folder"])
def test_a_write_that_fails_names_the_out_path_not_the_temporary_file(failure, good, tmp_path, capsys, monkeypatch):
    """Failures met while writing (read-only file system, full disk): the message names --out."""
    import os

    import pyarrow.parquet as parquet

    out = tmp_path / "labels.parquet"
    real_write = parquet.write_table

    def failing_write(table, where, **kwargs):
        if failure == "permission":
            raise PermissionError(13, "Permission denied", str(where))
        if failure == "full_disk":
            raise OSError(f"Error writing bytes to file. Detail: [errno 28] No space left on device ({where})")
        real_write(table, where, **kwargs)

    real_replace = os.replace

    def replace_onto_folder(src, dst):
        if failure == "replace_onto_folder":
            raise IsADirectoryError(21, "Is a directory", str(src), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(parquet, "write_table", failing_write)
    monkeypatch.setattr(os, "replace", replace_onto_folder)
    line = run_bad(label_argv(good, out), [out], capsys)
    assert ".tmp-" not in line and str(out) in line
    assert list(tmp_path.glob(".*tmp*")) == []


# --- table commands over a project folder -------------------------------------------------------------------


def test_lineage_of_a_bad_target_is_one_line(tmp_path, capsys):
    line = run_bad(["lineage", "not-an-id", "--root", str(tmp_path)], [], capsys)
    assert "'not-an-id'" in line


@pytest.mark.parametrize("command", ["audit", "export", "lineage"])
def test_a_truncated_table_in_the_project_is_one_line(command, good, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "problems.parquet").write_bytes(good["problems"].read_bytes()[:100])
    argv = {"audit": ["audit", "SELECT count(*) FROM problems", "--root", str(tmp_path)],
            "export": ["export", str(tmp_path / "hub"), "--root", str(tmp_path)],
            "lineage": ["lineage", "data/problems.parquet", "--root", str(tmp_path)]}[command]
    line = run_bad(argv, [tmp_path / "hub"], capsys)
    assert "problems.parquet" in line

"""`factory audit`, the audit gates and `factory lineage` on a small hand-made project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factory.audit import AuditConfig, catalog, load_checks, query, run_checks
from factory.cli import main
from factory.io import write_json
from factory.lineage import read_provenance, write_table
from factory.schema import from_rows
from factory.trace import format_tree, trace

ROOT = Path(__file__).resolve().parents[1]
WARMUP, ITER1 = "m-00000000000000a0", "m-00000000000000a1"
BASE = "m-0000000000000bas"
TABLES = ["data/problems.parquet", "data/iter_1/samples.parquet", "data/iter_1/labels.parquet",
          "data/iter_1/votes.parquet", "data/iter_1/pairs.parquet", "data/iter_1/steps/nodes.parquet"]


def problem(i, split, question=None):
    question = question or f"Kid {i} has {i + 3} apples and gets {2 * i + 1} more. How many apples now?"
    return {"problem_id": f"p-{i:016x}", "question": question, "gold_answer": str(3 * i + 4),
            "gold_rationale": None, "source": "test", "split": split, "n_steps": 1}


def sample(i, k, model=WARMUP, iteration=1):
    return {"sample_id": f"s-{i:08x}{k:08x}", "problem_id": f"p-{i:016x}", "iteration": iteration, "model_id": model,
            "generator": "hf", "sample_index": k, "seed": 0, "temperature": 0.7, "top_p": 1.0,
            "max_new_tokens": 64, "calculator": True, "text": f"They have {i}+{k}=<<{i}+{k}={i + k}>>{i + k}.\n#### {i + k}",
            "n_tokens": 12, "finish_reason": "stop"}


def label(s, answer, correct):
    return {"sample_id": s["sample_id"], "problem_id": s["problem_id"], "answer": answer,
            "answer_status": "correct" if correct else "wrong", "correct": correct, "n_steps": 1,
            "calc_total": 1, "calc_wrong": 0, "calc_invalid": 0, "vote_count": 1, "vote_share": 0.5, "vote_rank": 1}


def pair(chosen, rejected, *, text_chosen=None, text_rejected=None, pair_id=None):
    return {"pair_id": pair_id or f"pair-{chosen['sample_id'][2:]}", "problem_id": chosen["problem_id"],
            "iteration": 1, "recipe": "dpo_st", "prompt": f"Q {chosen['problem_id']}",
            "chosen": text_chosen or chosen["text"], "rejected": text_rejected or rejected["text"],
            "chosen_sample_id": chosen["sample_id"], "rejected_sample_id": rejected["sample_id"], "weight": 1.0}


def build(root: Path, *, pairs_model=WARMUP, pairs=None, problems=None, samples=None):
    """problems (train/answers/test) → 2 samples per answers problem from the warm-up → labels, votes, pairs."""
    problems = problems or [problem(i, "answers") for i in range(4)] + [problem(10, "train"), problem(20, "test")]
    samples = samples or [sample(i, k) for i in range(4) for k in range(2)]
    labels = [label(s, str(3 * int(s["problem_id"][2:], 16) + 4) if s["sample_index"] == 0 else "999",
                    s["sample_index"] == 0) for s in samples]
    votes = [{"problem_id": f"p-{i:016x}", "n_samples": 2, "n_answered": 2, "n_answers": 2, "top_answer": None,
              "top_votes": 1, "top_share": 0.5, "tied": True, "entropy": 1.0, "majority_correct": None}
             for i in range(4)]
    by_id = {s["sample_id"]: s for s in samples}
    if pairs is None:
        pairs = [pair(by_id[f"s-{i:08x}{0:08x}"], by_id[f"s-{i:08x}{1:08x}"]) for i in range(4)]
    write_table(from_rows(problems, "problems"), root / TABLES[0], kind="problems", stage="problems")
    write_table(from_rows(samples, "samples"), root / TABLES[1], kind="samples", stage="sample", model_id=WARMUP)
    write_table(from_rows(labels, "labels"), root / TABLES[2], kind="labels", stage="label",
                inputs={"samples": root / TABLES[1]})
    write_table(from_rows(votes, "votes"), root / TABLES[3], kind="votes", stage="label")
    write_table(from_rows([], "nodes"), root / TABLES[5], kind="nodes", stage="steps")  # no tree search here
    write_table(from_rows(pairs, "pairs"), root / TABLES[4], kind="pairs", stage="pairs", model_id=pairs_model,
                inputs={"samples": root / TABLES[1], "labels": root / TABLES[2]})
    for folder, model, stage, parent, data in [
        ("models/base", BASE, "base", None, {}),
        ("models/iter_0", WARMUP, "warmup", BASE, {"problems": root / TABLES[0]}),
        ("models/iter_1", ITER1, "train:dpo_st", WARMUP, {"pairs": root / TABLES[4]}),
    ]:
        from factory.lineage import fingerprints

        write_json(root / folder / "lineage.json", {"model_id": model, "stage": stage, "parent": parent,
                                                    "data": fingerprints(data), "params": {"stage": stage},
                                                    "metrics": {}, "code_version": "test"})
    (root / "params.yaml").write_text(yaml.safe_dump({"audit": {"min_pairs_for_bias": 1},
                                                      "eval": {"splits": ["test"]}}))
    return root


@pytest.fixture
def project(tmp_path):
    return build(tmp_path)


def gate(root, capsys, *extra):
    code = main(["gate", *TABLES, "--root", str(root), "--checks", str(ROOT / "audits"),
                 "--params", str(root / "params.yaml"), "--out", str(root / "audit.json"), *extra])
    return code, capsys.readouterr()


def test_views_carry_iteration_and_file_and_answer_the_users_questions(project):
    con = catalog(project)
    # Pair count per iteration.
    assert query(con, "SELECT iteration, count(*) FROM pairs GROUP BY ALL")[1] == [(1, 4)]
    # How often the majority answer is wrong (none here: every vote is tied).
    assert query(con, "SELECT count(*) FILTER (WHERE NOT majority_correct) FROM votes")[1] == [(0,)]
    # Which model produced the rejected side of a pair.
    columns, rows = query(con, "SELECT s.model_id, s.file FROM pairs p JOIN samples s "
                               "ON s.sample_id = p.rejected_sample_id WHERE p.pair_id = 'pair-0000000000000000'")
    assert rows == [(WARMUP, "data/iter_1/samples.parquet")]
    assert query(con, "SELECT iteration FROM problems LIMIT 1")[1] == [(None,)]
    assert query(con, "SELECT path, stage FROM models ORDER BY path")[1] == [
        ("models/base", "base"), ("models/iter_0", "warmup"), ("models/iter_1", "train:dpo_st")]
    assert query(con, "SELECT model_id FROM files WHERE view = 'pairs'")[1] == [(WARMUP,)]


def test_audit_cli_prints_table_csv_and_json(project, capsys):
    sql = "SELECT iteration, count(*) AS pairs FROM pairs GROUP BY ALL"
    assert main(["audit", sql, "--root", str(project), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "iteration,pairs\n1,4\n"
    assert main(["audit", sql, "--root", str(project), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"iteration": 1, "pairs": 4}]
    assert main(["audit", sql, "--root", str(project)]) == 0
    assert "(1 row)" in capsys.readouterr().out
    assert main(["audit", "SELECT * FROM pairz", "--root", str(project)]) == 2
    assert "views: " in capsys.readouterr().err


def test_audit_starts_without_torch_transformers_or_trl(project):
    code = ("import sys; from factory.cli import main; "
            f"assert main(['audit', 'SELECT count(*) FROM samples', '--root', {str(project)!r}]) == 0; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'pyarrow') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_clean_project_passes_every_check(project, capsys):
    code, out = gate(project, capsys)
    assert code == 0, out.err
    report = json.loads((project / "audit.json").read_text())
    assert report["passed"] and set(report["checks"]) == {c.name for c in load_checks(ROOT / "audits")}


def broken(tmp_path, kind):
    """The clean project with one invariant broken."""
    samples = [sample(i, k) for i in range(4) for k in range(2)]
    by_id = {s["sample_id"]: s for s in samples}
    s = lambda i, k: by_id[f"s-{i:08x}{k:08x}"]  # noqa: E731
    pairs = [pair(s(i, 0), s(i, 1)) for i in range(4)]
    if kind == "duplicate_pairs":
        pairs.append(dict(pairs[0], pair_id="pair-dup"))
    elif kind == "same_final_answer":
        pairs.append(pair(s(0, 0), s(0, 0), pair_id="pair-same", text_rejected="other text"))
    elif kind == "gold_labels":
        pairs.append(pair(s(1, 1), s(1, 0), pair_id="pair-flipped"))
    elif kind == "wrong_model":
        samples.append(sample(3, 5, model="m-someoneelse0000"))
        pairs.append(pair(s(3, 0), samples[-1], pair_id="pair-offpolicy"))
    elif kind == "length_bias":
        pairs = [pair(s(i, 0), s(i, 1), text_chosen=s(i, 0)["text"] + " and so on" * 10) for i in range(4)]
    elif kind == "decontamination":
        test_question = problem(20, "test")["question"]
        problems = [problem(i, "answers") for i in range(3)] + [problem(3, "answers", test_question),
                                                                problem(10, "train"), problem(20, "test")]
        return build(tmp_path, problems=problems, samples=samples, pairs=pairs)
    return build(tmp_path, samples=samples, pairs=pairs)


@pytest.mark.parametrize("check, offending", [
    ("duplicate_pairs", "pair-0000000000000000"),
    ("same_final_answer", "pair-same"),
    ("gold_labels", "pair-flipped"),
    ("wrong_model", "pair-offpolicy"),
    ("length_bias", "iteration 1 dpo_st"),
    ("decontamination", "p-0000000000000003"),
])
def test_a_planted_broken_invariant_fails_the_gate_naming_check_and_ids(tmp_path, capsys, check, offending):
    code, out = gate(broken(tmp_path, check), capsys)
    assert code == 2
    assert f"audit check {check!r} failed (" in out.err and offending in out.err
    report = json.loads((tmp_path / "audit.json").read_text())
    failed = {name for name, c in report["checks"].items() if c["violations"]}
    assert failed == {check} | ({"gold_labels"} if check == "same_final_answer" else set())


def test_a_pairs_file_naming_another_model_fails(tmp_path, capsys):
    code, out = gate(build(tmp_path, pairs_model=ITER1), capsys)
    assert code == 2 and "'wrong_model' failed" in out.err and "other model" in out.err


def test_users_add_their_own_check_with_its_own_threshold(project, capsys, tmp_path):
    checks = tmp_path / "my_checks"
    checks.mkdir()
    (checks / "weights.sql").write_text("-- Pair weights stay below a bound.\n"
                                        "SELECT pair_id, weight FROM pairs WHERE weight > getvariable('max_weight')\n")
    config = yaml.safe_load((project / "params.yaml").read_text())
    config["audit"]["variables"] = {"max_weight": 0.5}
    (project / "params.yaml").write_text(yaml.safe_dump(config))
    code, out = gate(project, capsys, "--checks", str(checks))
    assert code == 2 and "'weights' failed" in out.err and "Pair weights stay below a bound." in out.err


def test_checks_see_only_the_tables_they_are_given(project):
    con = catalog(project, paths=TABLES[:2], variables=AuditConfig().as_variables(["test"]))
    assert {r[0] for r in query(con, "SELECT view FROM files")[1]} == {"problems", "samples"}
    with pytest.raises(ValueError, match="no such table file"):
        catalog(project, paths=["data/iter_9/pairs.parquet"])


def test_lineage_of_a_pair_reaches_problem_samples_models_and_base(project):
    tree = trace("pair-0000000000000000", project)
    text = format_tree(tree)
    kinds = [p.kind for p in tree.parents]
    assert kinds == ["problem", "chosen", "rejected", "file"]
    chosen = tree.parents[1]
    model = next(p for p in chosen.parents if p.kind == "model")
    assert model.id == WARMUP and model.facts["stage"] == "warmup"
    assert [p.id for p in model.parents if p.kind == "model"] == [BASE]
    assert "data/problems.parquet" in text and "data/iter_1/samples.parquet" in text
    # A model's training data is found by content and walked back to the samples' model.
    iter1 = trace(ITER1, project)
    pairs_file = iter1.parents[0]
    assert pairs_file.id == "data/iter_1/pairs.parquet" and pairs_file.facts["role"] == "training data: pairs"
    assert {p.id for p in pairs_file.parents} >= {"data/iter_1/samples.parquet", WARMUP}


def test_lineage_cli_json_and_unknown_ids(project, capsys):
    assert main(["lineage", "s-0000000100000000", "--root", str(project), "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["kind"] == "sample" and tree["problem_id"] == "p-0000000000000001"
    assert main(["lineage", "pair-nope", "--root", str(project)]) == 2
    assert "no such pair" in capsys.readouterr().err
    assert main(["lineage", "banana", "--root", str(project)]) == 2


def test_dvc_lock_entries_name_stage_and_hash(project):
    (project / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"pairs@1": {
        "cmd": "factory pairs ...", "params": {"params.yaml": {"pairs": {"recipe": "dpo_st"}}},
        "outs": [{"path": "data/iter_1/pairs.parquet", "md5": "abc", "size": 1}]}}}))
    node = trace("data/iter_1/pairs.parquet", project)
    assert node.facts["dvc"] == {"out": "data/iter_1/pairs.parquet", "stage": "pairs@1", "md5": "abc",
                                 "cmd": "factory pairs ...", "params": {"pairs": {"recipe": "dpo_st"}}}
    assert read_provenance(project / TABLES[4])["model_id"] == WARMUP

"""Gates that cannot be fooled: each audit check runs alone, read-only and confined to the tables it is given;
`factory audit` is confined unless --unconfined; its JSON and CSV output read back exactly."""

from __future__ import annotations

import csv
import io
import json
import shlex
import shutil
from pathlib import Path

import duckdb
import pytest

from factory.audit import AuditError, ConfinedCatalog, Check, catalog, load_checks, query, run_checks
from factory.cli import main
from tests.test_audit import ROOT, TABLES, broken, build


@pytest.fixture
def project(tmp_path):
    return build(tmp_path / "project")


@pytest.fixture
def outside(tmp_path_factory):
    """A folder outside the project, with a file no check may read."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.csv").write_text("name,password\nroot,hunter2\n")
    return folder


def hostile_sql(kind, outside):
    return {
        # The probe's attack: hide the duplicated pair from the checks that come after this one.
        "replace_view": "CREATE OR REPLACE VIEW pairs AS SELECT * FROM pairs WHERE pair_id <> 'pair-dup';\n"
                        "SELECT 1 WHERE false",
        "temp_view": "CREATE TEMP VIEW pairs AS SELECT * FROM pairs LIMIT 0;\nSELECT * FROM pairs",
        "read_outside": f"SELECT * FROM read_csv('{outside / 'secret.csv'}') WHERE false",
        "read_etc": "SELECT * FROM read_csv('/etc/passwd') WHERE false",
        "copy_out": f"COPY (SELECT * FROM problems) TO '{outside / 'copied.csv'}';\nSELECT 1 WHERE false",
        "attach": f"ATTACH '{outside / 'other.duckdb'}' AS other;\nSELECT 1 WHERE false",
        "unlock": "SET enable_external_access = true;\nSELECT 1 WHERE false",
        "load": "LOAD httpfs;\nSELECT 1 WHERE false",
    }[kind]


def checks_with(folder, name, sql):
    """The shipped checks plus one more, named to run first."""
    shutil.copytree(ROOT / "audits", folder)
    (folder / f"{name}.sql").write_text(f"-- A hostile check.\n{sql}\n")
    return folder


@pytest.mark.parametrize("kind", ["replace_view", "temp_view", "read_outside", "read_etc", "copy_out", "attach",
                                  "unlock", "load"])
def test_a_hostile_check_is_refused_and_the_later_checks_see_the_true_data(tmp_path, outside, capsys, kind):
    project = broken(tmp_path / "project", "duplicate_pairs")  # the planted duplicate must still be found
    checks = checks_with(tmp_path / "checks", "a_hostile", hostile_sql(kind, outside))
    code = main(["gate", *TABLES, "--root", str(project), "--checks", str(checks),
                 "--params", str(project / "params.yaml"), "--out", str(project / "audit.json")])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in err
    refused = [line for line in err.splitlines() if "'a_hostile' refused" in line]
    assert len(refused) == 1 and f"({checks / 'a_hostile.sql'})" in refused[0], err
    assert "FAIL a_hostile: audit check 'a_hostile' refused (" in out
    # The refusal is one line of the gate's error, and the checks after it ran on the true tables.
    assert "audit check 'duplicate_pairs' failed (" in err and "pair-0000000000000000" in err
    report = json.loads((project / "audit.json").read_text())
    assert not report["passed"]
    assert "\n" not in report["checks"]["a_hostile"]["error"]
    failed = {name for name, c in report["checks"].items() if c["violations"] or c.get("error")}
    assert failed == {"a_hostile", "duplicate_pairs"}
    assert not list(outside.glob("copied*")) and not (outside / "other.duckdb").exists()


@pytest.mark.parametrize("sql, refused", [
    ("CREATE OR REPLACE VIEW pairs AS SELECT 1 AS pair_id", "read-only mode"),
    ("CREATE TABLE x AS SELECT 1", "read-only mode"),
    ("COPY (SELECT 1) TO '{outside}/x.csv'", "Permission Error"),
    ("SELECT * FROM read_csv('{outside}/secret.csv')", "Permission Error"),
    ("SELECT * FROM read_text('/etc/hostname')", "Permission Error"),
    ("SELECT * FROM glob('{outside}/*')", "Permission Error"),
    ("ATTACH '{outside}/x.duckdb' AS x", "Permission Error"),
    ("EXPORT DATABASE '{outside}/dump'", "Permission Error"),
    ("INSTALL httpfs", "Permission Error"),
    ("SET enable_external_access = true", "configuration has been locked"),
    ("SET allowed_directories = ['/']", "configuration has been locked"),
    ("RESET lock_configuration", "configuration has been locked"),
])
def test_the_confined_connection_itself_refuses_writes_files_and_settings(project, outside, sql, refused):
    """Below the SELECT-only rule for checks: DuckDB's own read-only mode and file-access settings."""
    with ConfinedCatalog(project, variables={"limit": 3}) as confined:
        con = confined.connect()
        with pytest.raises(AuditError, match="refused") as error:
            query(con, sql.format(outside=outside))
        assert refused in str(error.value) and "\n" not in str(error.value)
        # Still the true tables, the macros, the variables and the model and file tables.
        assert query(con, "SELECT count(*), count(DISTINCT file) FROM pairs")[1] == [(4, 1)]
        assert query(con, "SELECT len(words('Two words')), getvariable('limit')")[1] == [(2, 3)]
        assert query(con, "SELECT count(*) FROM models")[1] == [(3,)]
        assert query(con, "SELECT count(*) FROM files")[1] == [(len(TABLES),)]
        con.close()
    assert list(outside.iterdir()) == [outside / "secret.csv"]


def test_each_check_gets_a_fresh_connection_and_the_catalog_file_goes_away(project, tmp_path):
    """Not even a connection's own temporary objects outlive it; closing removes the database file."""
    counting = Check("count", "count.sql", "", "SELECT count(*) FROM pairs")
    with ConfinedCatalog(project) as confined:
        con = confined.connect()
        con.execute("CREATE TEMP VIEW pairs AS SELECT 1 LIMIT 0")  # on this connection only
        assert query(con, "SELECT count(*) FROM pairs")[1] == [(0,)]
        con.close()
        (result,) = run_checks(confined, [counting])
        assert result.passed is False and result.rows == [(4,)]
        path = Path(confined.path)
        assert path.exists()
    assert not path.exists() and not path.parent.exists()


def test_the_gate_reads_only_the_tables_it_is_given(project, capsys, tmp_path):
    """A check may read a given table's file directly, but not another table of the project."""
    given, other = project / TABLES[4], project / TABLES[1]
    checks = tmp_path / "checks"
    checks.mkdir()
    (checks / "direct.sql").write_text(f"SELECT pair_id FROM read_parquet('{given}') WHERE false")
    (checks / "other.sql").write_text(f"SELECT sample_id FROM read_parquet('{other}') WHERE false")
    code = main(["gate", TABLES[0], TABLES[4], "--root", str(project), "--checks", str(checks),
                 "--params", str(project / "params.yaml")])
    out, err = capsys.readouterr()
    assert code == 2 and "ok   direct:" in out and "FAIL other: audit check 'other' refused (" in out
    assert "Permission Error" in err and "direct" not in err


def test_checks_on_a_plain_connection_are_select_only(project):
    """Tests and scripts that pass a writable `catalog` still cannot change the views for later checks."""
    con = catalog(project)
    tamper = Check("tamper", "tamper.sql", "", "CREATE OR REPLACE VIEW pairs AS SELECT 1 AS x")
    count = Check("count", "count.sql", "", "SELECT count(*) FROM pairs")
    results = run_checks(con, [tamper, count])
    assert results[0].error == ("audit check 'tamper' refused (tamper.sql): a check may run only SELECT statements, "
                                "not CREATE (CREATE OR REPLACE VIEW pairs AS SELECT 1 AS x)")
    assert results[1].rows == [(4,)]


def test_a_broken_check_fails_the_gate_and_the_others_still_run(project, capsys, tmp_path):
    checks = tmp_path / "checks"
    shutil.copytree(ROOT / "audits", checks)
    (checks / "typo.sql").write_text("SELECT * FROM pairz")
    code = main(["gate", *TABLES, "--root", str(project), "--checks", str(checks),
                 "--params", str(project / "params.yaml")])
    out, err = capsys.readouterr()
    assert code == 2 and "audit check 'typo' could not run (" in err and "views: " in err
    assert out.count("ok   ") == len(load_checks(ROOT / "audits"))


def test_audit_is_confined_unless_asked(project, outside, capsys):
    target = outside / "out.csv"
    copy = f"COPY (SELECT pair_id FROM pairs) TO '{target}'"
    assert main(["audit", copy, "--root", str(project)]) == 2
    err = capsys.readouterr().err
    assert "refused: Permission Error" in err and len(err.strip().splitlines()) == 1 and not target.exists()
    assert main(["audit", f"SELECT * FROM read_csv('{outside / 'secret.csv'}')", "--root", str(project)]) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["audit", "CREATE TABLE t AS SELECT 1", "--root", str(project)]) == 2
    assert "read-only" in capsys.readouterr().err
    assert main(["audit", copy, "--root", str(project), "--unconfined"]) == 0
    assert target.read_text().splitlines()[1:] == sorted(f"pair-{i:08x}{0:08x}" for i in range(4))
    capsys.readouterr()


def test_audit_json_is_strict_json_with_null_for_nan_and_infinity(project, capsys):
    sql = ("SELECT 'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf, '-inf'::DOUBLE AS ninf, NULL AS nothing, "
           "1.5::DOUBLE AS x, ['nan'::DOUBLE, 2.0] AS xs, {'a': 'inf'::DOUBLE} AS s")
    assert main(["audit", sql, "--root", str(project), "--format", "json"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    rows = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert rows == [{"nan": None, "inf": None, "ninf": None, "nothing": None, "x": 1.5, "xs": [None, 2.0],
                     "s": {"a": None}}]


TRICKY = ["two\nlines", "crlf\r\nend", 'quote " and, comma', "", None, " padded ", "plain", "\r"]


def test_audit_csv_round_trips_newlines_quotes_and_nulls(project, capsys, tmp_path):
    values = ", ".join("NULL::VARCHAR" if v is None else "'" + v.replace("'", "''") + "'" for v in TRICKY)
    sql = f"SELECT i, t, [1, 2] AS l FROM (SELECT unnest([{values}]) AS t, generate_subscripts([{values}], 1) AS i)"
    assert main(["audit", sql, "--root", str(project), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert '\n4,"","[1, 2]"\n' in out and '\n5,,"[1, 2]"\n' in out  # '' quoted; NULL empty and unquoted
    # csv.reader gets every value back (NULL and '' alike as '').
    rows = list(csv.reader(io.StringIO(out, newline="")))
    assert rows[0] == ["i", "t", "l"]
    assert [r[1] for r in rows[1:]] == ["" if v is None else v for v in TRICKY]
    assert all(r[2] == "[1, 2]" for r in rows[1:])
    # Read with the NULL convention (DuckDB's own), NULL and '' come back apart.
    path = tmp_path / "out.csv"
    path.write_text(out, newline="")
    back = duckdb.sql(f"SELECT t FROM read_csv('{path}', header = true, all_varchar = true, "
                      "allow_quoted_nulls = false) ORDER BY i::INTEGER").fetchall()
    assert [r[0] for r in back] == TRICKY
    if hasattr(csv, "QUOTE_NOTNULL"):  # Python 3.12+
        rows = list(csv.reader(io.StringIO(out, newline=""), quoting=csv.QUOTE_NOTNULL))
        assert [r[1] for r in rows[1:]] == TRICKY


@pytest.mark.parametrize("command", ["gate", "audit"])
def test_the_help_examples_run_on_a_small_project(tmp_path, monkeypatch, capsys, command):
    project = build(tmp_path)
    shutil.copytree(ROOT / "audits", project / "audits")  # params audit.checks defaults to audits/
    with pytest.raises(SystemExit):
        main([command, "--help"])
    examples = [line.strip().removeprefix("Example: ") for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith("Example: ")]
    assert examples
    monkeypatch.chdir(project)
    for example in examples:
        argv = shlex.split(example)
        assert argv[:2] == ["factory", command]
        assert main(argv[1:]) == 0, capsys.readouterr().err
    if command == "gate":
        report = json.loads((project / "metrics/iterations/iter_1/audit.json").read_text())
        assert report["passed"] and set(report["checks"]) == {c.name for c in load_checks(ROOT / "audits")}

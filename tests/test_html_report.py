"""The HTML run report: its plots and tables from a small project, offline and deterministic, and as Chromium renders it."""

from __future__ import annotations

import json
import re
import struct
from html.parser import HTMLParser

import pytest

from factory.browser import BrowserError, dump_dom, find_chromium, screenshot
from factory.html_report import _vote_bins, write_html_report
from factory.lineage import write_table
from factory.schema import from_rows

PARAMS = {"recipe": "dpo_st", "iterations": {"1": {"prev": 0}}}
PLOTS = ("accuracy", "pair-yield", "vote-share", "pair-lengths")


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def label(sample, problem, answer, status, share):
    correct = {"correct": True, "wrong": False}.get(status)
    return {"sample_id": sample, "problem_id": problem, "answer": answer, "answer_status": status, "correct": correct,
            "n_steps": 2, "calc_total": 2, "calc_wrong": 0, "calc_invalid": 0, "vote_share": share}


@pytest.fixture
def project(tmp_path):
    """Two problems, k=4 samples each, three pairs, the metrics of iterations 0 and 1, an audit and a comparison."""
    write_table(from_rows([{"problem_id": p, "question": f"Q {p}?", "gold_answer": a, "source": "arith",
                            "split": "answers"} for p, a in (("p-a", "5"), ("p-b", "8"))], "problems"),
                tmp_path / "data/problems.parquet", kind="problems", stage="problems")
    labels = [label("s-1", "p-a", "5", "correct", 0.75), label("s-2", "p-a", "5", "correct", 0.75),
              label("s-3", "p-a", "5", "correct", 0.75), label("s-4", "p-a", "6", "wrong", 0.25),
              label("s-5", "p-b", "7", "wrong", 0.5), label("s-6", "p-b", "7", "wrong", 0.5),
              label("s-7", "p-b", "8", "correct", 0.25), label("s-8", "p-b", None, "unparseable", None)]
    write_table(from_rows(labels, "labels"), tmp_path / "data/iter_1/labels.parquet", kind="labels", stage="label")
    pairs = [{"pair_id": f"pair-{i}", "problem_id": p, "iteration": 1, "recipe": "dpo_st", "prompt": "Q?",
              "chosen": "a b c", "rejected": "a  b c d\ne", "weight": 1.0}
             for i, p in enumerate(("p-a", "p-a", "p-b"))]
    write_table(from_rows(pairs, "pairs"), tmp_path / "data/iter_1/pairs.parquet", kind="pairs", stage="pairs")

    metrics = tmp_path / "metrics/iterations"
    write_json(metrics / "iter_0/eval.json", {"test": {"accuracy": 0.2, "stderr": 0.01},
                                              "test_ood": {"accuracy": 0.05, "stderr": 0.02}})
    write_json(metrics / "iter_1/eval.json", {"test": {"accuracy": 0.3, "stderr": 0.012},
                                              "test_ood": {"accuracy": 0.04, "stderr": 0.01}})
    write_json(metrics / "iter_1/label.json", {"sample_accuracy": 0.5, "solved_fraction": 0.75,
                                               "pass_at_k": {"1": 0.5, "2": 0.6667},
                                               "vote": {"majority_accuracy": 0.5, "mean_top_share": 0.6,
                                                        "majority_on_gold": {"problems": 4,
                                                                             "majority_accuracy": 0.25}}})
    write_json(metrics / "iter_1/pairs.json", {"pairs": 3, "problems_with_pairs": 2, "problems_seen": 4})
    write_json(metrics / "iter_1/train.json", {"recipe": "dpo_st", "precondition": {
        "signal": "pass_at_n", "value": 0.6667, "threshold": 0.0, "holds": True, "message": "recipe dpo_st: ..."}})
    write_json(metrics / "iter_1/audit.json", {"passed": False, "checks": {
        "pair_sides_differ": {"violations": 2, "description": "chosen & rejected differ"},
        "ids_unique": {"violations": 0, "description": "ids are unique"}}})
    write_json(tmp_path / "bench/compare-small.json", {"baseline": "b", "runs": {"dpo_st": {"0": {}, "1": {}}},
                                                       "summary": {"test": {"accuracy": {"dpo_st": {
                                                           "iter_0": [0.2, 0.0], "iter_1": [0.31, 0.02]}}}}})
    return tmp_path


def build(project, name="report.html", **overrides):
    arguments = {"root": project, "metrics_dir": "metrics/iterations", "params": PARAMS,
                 "compare_files": [project / "bench/compare-small.json"]} | overrides
    return write_html_report(project / name, **arguments)


class Tables(HTMLParser):
    """Every table of a page as rows of cell texts."""

    def __init__(self, page):
        super().__init__()
        self.tables, self.cell = [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def starting(self, header):
        return next(t for t in self.tables if t[0][0:len(header)] == header)


def test_report_has_the_plots_and_the_runs_numbers(project):
    page = build(project).read_text()
    assert page.count("<svg") == len(PLOTS)
    assert all(f'<figure id="{name}">' in page for name in PLOTS)
    tables = Tables(page)
    iterations = tables.starting(["iteration", "test", "test_ood"])
    assert iterations[0] == ["iteration", "test", "test_ood", "recipe", "sample_accuracy", "solved_fraction",
                             "majority_accuracy", "pairs", "pair_yield"]
    assert iterations[1] == ["0", "0.2000 ± 0.0100", "0.0500 ± 0.0200", "", "", "", "", "", ""]
    assert iterations[2] == ["1", "0.3000 ± 0.0120", "0.0400 ± 0.0100", "dpo_st", "0.5000", "0.7500", "0.5000",
                             "3", "0.5000"]
    assert tables.starting(["iteration", "recipe", "pairs"])[1:] == [["1", "dpo_st", "3", "2", "1.0000", "3.0", "5.0"]]
    assert tables.starting(["iteration", "round"]) == [
        ["iteration", "round", "correct", "wrong", "unparseable", "total"], ["1", "sampling", "4", "3", "1", "8"]]
    audit = tables.starting(["iteration", "gate"])
    assert audit[1:] == [["1", "FAILED", "ids_unique", "0", "ids are unique"],
                         ["1", "FAILED", "pair_sides_differ", "2", "chosen & rejected differ"]]
    assert "chosen &amp; rejected differ" in page and '<tr class="failed">' in page
    vote_plot = page[page.index('<figure id="vote-share">'):page.index('<figure id="pair-lengths">')]
    assert all(f">n={n}<" in vote_plot for n in (3, 2))  # per bin: share 0.75 has 3 samples, 0.25 and 0.5 have 2
    assert "dpo_st · compare-small (2 seeds)" in page and "this run (dpo_st)" in page


def test_report_is_self_contained_and_deterministic(project):
    first = build(project, "a.html").read_bytes()
    assert build(project, "b.html").read_bytes() == first
    page = first.decode()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:[a-z]+:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the four figures' ids do not collide
    assert not list(project.glob(".*.tmp-*"))


def test_missing_pieces_become_notes(tmp_path):
    write_json(tmp_path / "metrics/iterations/iter_0/eval.json", {"test": {"accuracy": 0.2, "stderr": 0.01}})
    params = {"recipe": "<b>sft</b>", "iterations": {"1": {"prev": 0}}}
    page = write_html_report(tmp_path / "out/report.html", root=tmp_path, params=params).read_text()
    assert page.count("<svg") == 1  # accuracy of the one evaluated iteration
    assert "&lt;b&gt;sft&lt;/b&gt;" in page and "<b>sft" not in page
    for note in ("not evaluated yet (no eval.json): iteration 1", "No comparison file given",
                 "pair yield: no label.json or pairs.json yet", "vote share vs correctness: no labels table",
                 "pair lengths: no pairs table", "no pairs table", "no labels table", "no audit results"):
        assert note in page, note


def test_many_distinct_vote_shares_fall_into_tenths():
    records = [(1, share / 16, 2, 1) for share in range(1, 17)]  # k=16: 16 distinct shares
    labels, centres, by_iteration = _vote_bins(records)
    assert len(labels) == 10 and labels[0] == "0.0–0.1" and centres[9] == pytest.approx(0.95)
    assert by_iteration[1][9] == [4, 2]  # 15/16 and 16/16 (1.0 joins the last bin)


def test_chromium_renders_the_page(project):
    if find_chromium() is None:
        pytest.skip("Chromium is not installed")
    page = build(project)
    png = screenshot(page, project / "shots/report.png", width=1000, height=1600)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1000, 1600)  # the IHDR chunk: width, height
    assert len(data) > 20_000  # plots drawn, not a blank page
    dom = dump_dom(page)
    assert dom.count("<svg") == len(PLOTS) and dom.count("<table") == 6
    for heading in ("Iterations", "Plots", "Preference pairs", "Answer status", "Audit gates"):
        assert f"<h2>{heading}</h2>" in dom
    assert "Test accuracy per iteration" in dom  # SVG text as parsed into the document


def test_browser_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setattr("factory.browser.shutil.which", lambda name: None)
    (tmp_path / "page.html").write_text("<p>hi</p>")
    with pytest.raises(BrowserError, match="Chromium not found"):
        dump_dom(tmp_path / "page.html")
    with pytest.raises(BrowserError, match="no such file"):
        screenshot(tmp_path / "missing.html", tmp_path / "x.png")


def test_report_shows_each_iterations_precondition_and_its_signals(project):
    tables = Tables(build(project).read_text())
    assert tables.starting(["iteration", "recipe", "signal"]) == [
        ["iteration", "recipe", "signal", "value", "threshold", "holds"],
        ["1", "dpo_st", "pass_at_n", "0.6667", "0.0000", "holds"]]
    assert tables.starting(["iteration", "pass_at_1"]) == [
        ["iteration", "pass_at_1", "pass_at_2", "solved_fraction", "majority_accuracy_gold", "majority_gold_problems"],
        ["0", "", "", "", "", ""], ["1", "0.5000", "0.6667", "0.7500", "0.2500", "4"]]

"""One self-contained HTML page per run: figures, plots and tables a reviewer can open offline.

    write_html_report("report.html", params=load_params("params.yaml"),
                      compare_files=["bench/results/compare-recipes-2seeds.json"])

The page needs no network and no JavaScript: plots are inline SVG drawn by
matplotlib, with a fixed hash salt and no date, so the same inputs give the
same bytes (the file can be a DVC output). Figures come from the stages'
metrics files (`factory.report`), row-level views from the DuckDB catalog
(`factory.audit`), recipe comparisons from `factory compare` JSON files. A
missing piece becomes a note in the page, not an error: a report is most
useful when a run is half done.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from factory.audit import catalog, query, views
from factory.io import write_text
from factory.report import SIGNALS, iteration_numbers, iteration_row
from factory.schema import ANSWER_STATUSES

_SVG_STYLE = {
    "svg.hashsalt": "factory-html-report",  # element ids from content, not from a random salt
    "svg.fonttype": "none",  # text stays text: smaller, selectable, searchable in the DOM
    "font.family": "sans-serif",
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
# Dublin Core fields matplotlib writes by default; None leaves them out (a date or version would break determinism).
_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_FIGSIZE = (6.4, 4.2)
_MAX_SHARE_LEVELS = 12  # more distinct vote shares than this (large k): bins of 0.1
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 24px auto;
       max-width: 1240px; padding: 0 16px; color: #1b1f24; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.meta { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #ffebe9; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; } figure svg { width: 100%; height: auto; }
figcaption { color: #57606a; font-size: 13px; }
.note { color: #6e5600; background: #fff8c5; border: 1px solid #eac54f; padding: 6px 10px; border-radius: 4px; }
"""


def write_html_report(
    out_path: str | Path,
    *,
    root: str | Path = ".",
    metrics_dir: str | Path = "metrics/iterations",
    params: dict,
    compare_files: Sequence[str | Path] = (),
) -> Path:
    """Write the run's report page atomically; returns its path."""
    numbers = iteration_numbers(params)
    metrics = Path(root) / metrics_dir
    rows, unevaluated = [], []
    for k in numbers:
        try:
            rows.append(iteration_row(metrics / f"iter_{k}", k))
        except FileNotFoundError:
            unevaluated.append(k)
    comparisons = {Path(p).stem: json.loads(Path(p).read_text()) for p in compare_files}
    con = catalog(root, iterations=numbers)
    present = set(views(con))

    recipe = str(params.get("recipe", "?"))
    parts = [
        f"<h1>Run report: {_e(recipe)}</h1>",
        f'<p class="meta">recipe {_e(recipe)} · iterations {_e(", ".join(map(str, numbers)))}'
        f" · metrics from {_e(Path(metrics_dir).as_posix())}</p>",
        "<h2>Iterations</h2>",
        _iteration_table(rows),
        "<h2>Preconditions</h2>",
        _preconditions_table(rows),
    ]
    if unevaluated:
        parts.append(_note(f"not evaluated yet (no eval.json): iteration {', '.join(map(str, unevaluated))}"))
    parts += [
        "<h2>Plots</h2>",
        '<div class="plots">',
        _accuracy_plot(rows, comparisons, recipe),
        _yield_plot(rows),
        _vote_plot(con, present),
        _length_plot(con, present),
        "</div>",
        "<h2>Preference pairs</h2>",
        _pairs_table(con, present),
        "<h2>Answer status</h2>",
        _status_table(con, present),
        "<h2>Audit gates</h2>",
        _audit_table(metrics, numbers),
    ]
    con.close()
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Run report: {_e(recipe)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    write_text(out_path, page)
    return Path(out_path)


def _e(value: object) -> str:
    return html.escape(str(value))


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _cell(value: object, digits: int = 4) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.{digits}f}</td>'
    return f"<td>{_e(value)}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, digits: dict[str, int] | None = None,
           failed: Sequence[bool] = ()) -> str:
    """An HTML table; cells escaped, numbers right-aligned (floats to 4 places unless `digits` names the column);
    rows flagged in `failed` highlighted."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    places = [(digits or {}).get(h, 4) for h in headers]
    body = []
    for index, row in enumerate(rows):
        css = ' class="failed"' if index < len(failed) and failed[index] else ""
        body.append(f"<tr{css}>" + "".join(_cell(v, p) for v, p in zip(row, places)) + "</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def _with_stderr(row: dict, split: str) -> str | None:
    if split not in row:
        return None
    stderr = row.get(f"{split}_stderr")
    return f"{row[split]:.4f} ± {stderr:.4f}" if stderr is not None else f"{row[split]:.4f}"


def _iteration_table(rows: list[dict]) -> str:
    if not rows:
        return _note("no iteration has been evaluated yet")
    figures = ["recipe", "sample_accuracy", "solved_fraction", "majority_accuracy", "pairs", "pair_yield"]
    shown = [f for f in figures if any(f in r for r in rows)]
    splits = [s for s in ("test", "test_ood") if any(s in r for r in rows)]
    return _table(["iteration", *splits, *shown],
                  [[r["iteration"], *(_with_stderr(r, s) for s in splits), *(r.get(f) for f in shown)] for r in rows])


def _preconditions_table(rows: list[dict]) -> str:
    """Each iteration's recipe precondition as `factory train` checked it, then every signal measured."""
    checked = [r for r in rows if "precondition_signal" in r]
    verdict = {True: "holds", False: "fails", None: "unmeasured"}
    parts = [_table(["iteration", "recipe", "signal", "value", "threshold", "holds"],
                    [[r["iteration"], r.get("recipe"), r["precondition_signal"], r["precondition_value"],
                      r["precondition_threshold"], verdict[r["precondition_holds"]]] for r in checked],
                    failed=[r["precondition_holds"] is False for r in checked])
             if checked else _note("no iteration's training checked a precondition yet")]
    passes = sorted({c for r in rows for c in r if c.startswith("pass_at_")}, key=lambda c: int(c.rsplit("_", 1)[1]))
    columns = passes + [c for c in ("solved_fraction", *SIGNALS) if any(c in r for r in rows)]
    if columns:
        parts.append(_table(["iteration", *columns], [[r["iteration"], *(r.get(c) for c in columns)] for r in rows]))
        parts.append(_note("signals: pass@k over problems with a gold answer (solved fraction: over all); the "
                           "majority vote's accuracy on gold problems (ScPO); the self-evaluation AUC, correct vs "
                           "wrong terminal nodes (MCTS-DPO); the PRM's held-out accuracy and the majority-class "
                           "baseline it must beat (SIPF); wrong step-controlled continuations per parent (SCDPO). "
                           "An empty cell was not measured."))
    return "\n".join(parts)


def _figure(name: str, caption: str, draw: Callable) -> str:
    """`draw(fig)` on a fresh matplotlib figure, inlined as SVG with ids unique to this figure."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_SVG_STYLE):
        figure = Figure(figsize=_FIGSIZE, layout="constrained")
        draw(figure)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata=_NO_METADATA)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: HTML has its own
    svg = re.sub(r'\s+xmlns(?::xlink)?="[^"]*"', "", svg, count=2)  # the HTML parser puts <svg> in the SVG namespace
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{name}-\1"', svg)  # matplotlib's ids repeat across figures
    svg = re.sub(r'(href="#|url\(#)', rf"\1{name}-", svg)
    return f'<figure id="{name}">\n{svg}\n<figcaption>{_e(caption)}</figcaption>\n</figure>'


def _integer_ticks(ax, values: Iterable[int]) -> None:
    ax.set_xticks(sorted(set(values)))


def _accuracy_plot(rows: list[dict], comparisons: dict[str, dict], recipe: str) -> str:
    run = [r for r in rows if "test" in r]
    lines = []  # (file stem, recipe, seeds, [(iteration, mean, stderr)])
    for stem, comparison in sorted(comparisons.items()):
        accuracy = comparison.get("summary", {}).get("test", {}).get("accuracy", {})
        for name, by_iteration in sorted(accuracy.items()):
            points = sorted((int(key.removeprefix("iter_")), mean, stderr)
                            for key, (mean, stderr) in by_iteration.items())
            lines.append((stem, name, len(comparison.get("runs", {}).get(name, {})), points))
    if not run and not lines:
        return _note("accuracy: no evaluation and no comparison file")

    def draw(fig):
        ax = fig.add_subplot()
        recipes = sorted({name for _, name, _, _ in lines})
        colours = {name: f"C{i % 10}" for i, name in enumerate(recipes)}
        stems = sorted(comparisons)
        for index, (stem, name, seeds, points) in enumerate(lines):
            offset = (index - (len(lines) - 1) / 2) * 0.025  # keep error bars of one iteration apart
            style = stems.index(stem) % 3
            ax.errorbar([k + offset for k, _, _ in points], [m for _, m, _ in points], yerr=[s for _, _, s in points],
                        color=colours[name], linestyle=("--", ":", "-.")[style], marker="os^"[style], markersize=4,
                        capsize=3, linewidth=1.2, label=f"{name} · {stem} ({seeds} seeds)")
        if run:
            ax.errorbar([r["iteration"] for r in run], [r["test"] for r in run],
                        yerr=[r.get("test_stderr", 0.0) for r in run], color="black", marker="o", linewidth=2.2,
                        capsize=4, label=f"this run ({recipe})", zorder=5)
        _integer_ticks(ax, [r["iteration"] for r in run] + [k for *_, points in lines for k, _, _ in points])
        ax.set(title="Test accuracy per iteration", xlabel="iteration", ylabel="accuracy (test)")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)

    caption = "Accuracy on the test split; error bars: ± stderr (this run: over problems; comparisons: over seeds)."
    if not comparisons:
        caption += " No comparison file given."
    return _figure("accuracy", caption, draw)


def _yield_plot(rows: list[dict]) -> str:
    series = {"pair_yield": "pair yield (problems with a pair / problems seen)",
              "solved_fraction": "solved fraction (problems solved at least once)"}
    present = {key: [(r["iteration"], r[key]) for r in rows if key in r] for key in series}
    if not any(present.values()):
        return _note("pair yield: no label.json or pairs.json yet")

    def draw(fig):
        ax = fig.add_subplot()
        for key, points in present.items():
            if points:
                ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=series[key])
        _integer_ticks(ax, [k for points in present.values() for k, _ in points])
        ax.set(title="Pair yield and solved fraction per iteration", xlabel="iteration",
               ylabel="share of sampled problems", ylim=(0, 1))
        ax.legend(fontsize=8)

    return _figure("pair-yield", "Share of the sampled problems that produced a preference pair, and that were "
                                 "solved by at least one sample.", draw)


def _vote_bins(records: list[tuple[int, float, int, int]]) -> tuple[list[str], list[float], dict[int, dict]]:
    """Group (iteration, share, n, correct) into bins: the distinct k-fractions when few, else tenths."""
    shares = sorted({share for _, share, _, _ in records})
    if len(shares) <= _MAX_SHARE_LEVELS:
        labels, centres, key = [f"{s:g}" for s in shares], shares, shares.index
    else:
        labels = [f"{b / 10:.1f}–{(b + 1) / 10:.1f}" for b in range(10)]
        centres, key = [(b + 0.5) / 10 for b in range(10)], lambda share: min(int(share * 10), 9)
    by_iteration: dict[int, dict] = {}
    for iteration, share, n, correct in records:
        totals = by_iteration.setdefault(iteration, {}).setdefault(key(share), [0, 0])
        totals[0] += n
        totals[1] += correct
    return labels, centres, by_iteration


def _vote_plot(con, present: set[str]) -> str:
    if "labels" not in present:
        return _note("vote share vs correctness: no labels table")
    _, records = query(con, """
        SELECT l.iteration, round(l.vote_share, 4) AS share, count(*) AS n, sum(l.correct::INTEGER) AS correct
        FROM labels l JOIN files f ON f.path = l.file
        WHERE f.stage = 'label' AND l.vote_share IS NOT NULL AND l.correct IS NOT NULL
        GROUP BY ALL ORDER BY ALL""")
    if not records:
        return _note("vote share vs correctness: no label has both a vote share and a gold judgement")
    labels, centres, by_iteration = _vote_bins(records)
    iterations = sorted(by_iteration)
    gap = min((b - a for a, b in zip(centres, centres[1:])), default=0.2)
    width = 0.8 * gap / len(iterations)

    def draw(fig):
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="accuracy = vote share")
        for index, iteration in enumerate(iterations):
            bins = sorted(by_iteration[iteration].items())
            xs = [centres[b] + (index - (len(iterations) - 1) / 2) * width for b, _ in bins]
            ys = [correct / n for _, (n, correct) in bins]
            bars = ax.bar(xs, ys, width=width, label=f"iteration {iteration}", color=f"C{index % 10}", alpha=0.85)
            ax.bar_label(bars, labels=[f"n={n}" for _, (n, _) in bins], fontsize=8, rotation=90, padding=2)
        ax.set_xticks(centres, labels)
        ax.set(title="Accuracy of a sample by its answer's vote share", xlabel="vote share of the sample's answer",
               ylabel="accuracy (mean of correct)", ylim=(0, 1.15), xlim=(centres[0] - gap, centres[-1] + gap / 2))
        ax.legend(fontsize=8, loc="upper left")

    return _figure("vote-share", "Labels of each iteration's sampling round, with a gold answer; n: samples per bin. "
                                 "Bars near the diagonal: the vote share is a calibrated confidence.", draw)


_PAIR_WORDS = """
    SELECT iteration, recipe, problem_id, weight, len(string_split_regex(trim(chosen), '\\s+')) AS chosen_words,
           len(string_split_regex(trim(rejected), '\\s+')) AS rejected_words
    FROM pairs"""


def _length_plot(con, present: set[str]) -> str:
    if "pairs" not in present:
        return _note("pair lengths: no pairs table")
    _, rows = query(con, f"SELECT chosen_words, rejected_words, iteration FROM ({_PAIR_WORDS}) ORDER BY ALL")
    if not rows:
        return _note("pair lengths: the pairs tables are empty")
    chosen, rejected = [r[0] for r in rows], [r[1] for r in rows]
    iterations = sorted({r[2] for r in rows})
    low, high = min(chosen + rejected), max(chosen + rejected)
    step = max(1, (high - low + 1) // 40)  # at most about 40 bins of whole words, centred on them
    edges = [edge - 0.5 for edge in range(low, high + step + 1, step)]

    def draw(fig):
        from matplotlib.ticker import MaxNLocator

        ax = fig.add_subplot()
        for values, name, colour in ((chosen, "chosen", "C2"), (rejected, "rejected", "C3")):
            mean = sum(values) / len(values)
            ax.hist(values, bins=edges, alpha=0.45, color=colour, label=f"{name} (mean {mean:.1f} words)")
            ax.hist(values, bins=edges, histtype="step", color=colour, linewidth=1.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title="Length of chosen vs rejected rationales", xlabel="words", ylabel="pairs")
        ax.legend(fontsize=8)

    return _figure("pair-lengths", f"Word counts of {len(rows)} pairs, pooled over iteration "
                                   f"{', '.join(map(str, iterations))}.", draw)


def _pairs_table(con, present: set[str]) -> str:
    if "pairs" not in present:
        return _note("no pairs table")
    _, rows = query(con, f"""
        SELECT iteration, recipe, count(*) AS pairs, count(DISTINCT problem_id) AS problems, avg(weight),
               avg(chosen_words), avg(rejected_words)
        FROM ({_PAIR_WORDS}) GROUP BY ALL ORDER BY ALL""")
    if not rows:
        return _note("the pairs tables are empty")
    return _table(["iteration", "recipe", "pairs", "problems", "mean weight", "mean chosen words",
                   "mean rejected words"], rows, digits={"mean chosen words": 1, "mean rejected words": 1})


def _status_table(con, present: set[str]) -> str:
    if "labels" not in present:
        return _note("no labels table")
    _, rows = query(con, """
        SELECT l.iteration, CASE f.stage WHEN 'label' THEN 'sampling' ELSE 'second round (' || f.stage || ')' END,
               l.answer_status, count(*)
        FROM labels l JOIN files f ON f.path = l.file
        GROUP BY ALL ORDER BY ALL""")
    if not rows:
        return _note("the labels tables are empty")
    found = {status for *_, status, _ in rows}
    statuses = [s for s in ANSWER_STATUSES if s in found] + sorted(found - set(ANSWER_STATUSES))
    counts: dict[tuple, dict[str, int]] = {}
    for iteration, round_name, status, n in rows:
        counts.setdefault((iteration, round_name), {})[status] = n
    return _table(["iteration", "round", *statuses, "total"],
                  [[k, r, *(c.get(s, 0) for s in statuses), sum(c.values())] for (k, r), c in counts.items()])


def _audit_table(metrics: Path, numbers: Sequence[int]) -> str:
    rows, failed = [], []
    for k in numbers:
        path = metrics / f"iter_{k}" / "audit.json"
        if not path.exists():
            continue
        audit = json.loads(path.read_text())
        for name, check in sorted(audit.get("checks", {}).items()):
            violations = check.get("violations", 0)
            rows.append([k, "passed" if audit.get("passed") else "FAILED", name, violations, check.get("description")])
            failed.append(bool(violations))
    if not rows:
        return _note("no audit results: no iteration has an audit.json")
    return _table(["iteration", "gate", "check", "violations", "description"], rows, failed=failed)

"""The bench scripts keep up with the code they time: a small data-plane run, both sides identical.

Benchmarks are run by hand, so nothing else would notice a schema change that breaks one.
"""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_plane_bench_gives_identical_outputs_on_both_sides(tmp_path, capsys):
    data_plane = load_script("data_plane")
    figures_file = tmp_path / "data_plane.json"
    assert data_plane.main(["--problems", "300", "--repeats", "2", "--json", str(figures_file)]) == 0
    assert "outputs identical" in capsys.readouterr().out
    figures = json.loads(figures_file.read_text())
    assert figures["identical"] and figures["samples"] == 3000 and figures["repeats"] == 2
    for side in ("factory", "baseline"):
        assert [set(run) for run in figures["runs"][side]] == [{"label", "filter", "pairs", "cpu"}] * 2


def test_data_plane_bench_refuses_zero_repeats(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script("data_plane").main(["--problems", "10", "--repeats", "0"])
    assert exit_.value.code == 2 and "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_data_plane_bench_input_covers_every_kind_of_sample():
    data_plane = load_script("data_plane")
    problems, samples = data_plane.synthetic_input(200, 10, seed=1)
    again = data_plane.synthetic_input(200, 10, seed=1)
    assert problems.equals(again[0]) and samples.equals(again[1])  # deterministic from the seed
    texts = samples.column("text").to_pylist()
    assert any("<<" in text and "####" in text for text in texts)
    assert samples.column("finish_reason").to_pylist().count("length") > 0  # truncated samples
    assert len(set(texts)) < len(texts)  # exact duplicates

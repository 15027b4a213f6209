"""code_version hashes the code a stage ran (the factory/train modules it imported), and every output
records the library versions that made it (issue 21: same bytes anywhere, and a difference explained)."""

import importlib.metadata
import json
import shlex
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from factory import lineage

ROOT = Path(__file__).resolve().parent.parent

# Writes one problems table with a copy of the package, then prints its provenance and the loaded sources.
WRITE = """
import json, sys
from factory.lineage import loaded_sources, read_provenance, write_table
from factory.schema import from_rows
row = {"problem_id": "p-1", "question": "What is 2+2?", "gold_answer": "4", "source": "test", "split": "train"}
out = write_table(from_rows([row], "problems"), sys.argv[1], kind="problems", stage="problems", params={"seed": 1})
print(json.dumps({"provenance": read_provenance(out), "loaded": [str(p) for p in loaded_sources()],
                  "torch_imported": "torch" in sys.modules}))
"""


def copy_package(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for package in ("factory", "train"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def write_with(src: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", WRITE, str(out)], cwd=src, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_code_version_covers_only_the_modules_that_ran(tmp_path):
    src = copy_package(tmp_path)
    first = write_with(src, tmp_path / "a.parquet")
    loaded = {Path(p).relative_to(src).as_posix() for p in first["loaded"]}  # the copy ran, not the checkout
    assert {"factory/__init__.py", "factory/lineage.py", "factory/schema.py"} <= loaded
    assert "factory/export.py" not in loaded and not any(p.startswith("train/") for p in loaded)

    # Same command, same code: the same code version and the same bytes.
    again = write_with(src, tmp_path / "b.parquet")
    assert again["provenance"] == first["provenance"]
    assert (tmp_path / "b.parquet").read_bytes() == (tmp_path / "a.parquet").read_bytes()

    # An edit to modules the writer never imported (another stage's code, training code) changes nothing.
    for unrelated in ("factory/export.py", "train/__init__.py"):
        with open(src / unrelated, "a") as handle:
            handle.write("\n# an unrelated edit\n")
    unrelated = write_with(src, tmp_path / "c.parquet")
    assert (tmp_path / "c.parquet").read_bytes() == (tmp_path / "a.parquet").read_bytes()
    assert unrelated["provenance"]["code_version"] == first["provenance"]["code_version"]

    # An edit to code that ran changes the code version, and so the bytes.
    with open(src / "factory/schema.py", "a") as handle:
        handle.write("\n# an edit to code the writer runs\n")
    edited = write_with(src, tmp_path / "d.parquet")
    assert edited["provenance"]["code_version"] != first["provenance"]["code_version"]
    assert (tmp_path / "d.parquet").read_bytes() != (tmp_path / "a.parquet").read_bytes()


def test_versions_are_recorded_without_importing_torch(tmp_path):
    record = write_with(copy_package(tmp_path), tmp_path / "p.parquet")
    versions = record["provenance"]["versions"]
    assert set(versions) == {"python", "torch", "transformers", "trl", "datasets", "tokenizers", "duckdb",
                             "pyarrow", "numpy", "factory"}
    assert versions["pyarrow"] == importlib.metadata.version("pyarrow")
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert not record["torch_imported"]


def test_code_version_stays_out_of_the_model_id(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    ids = set()
    for version in ("0.1.0+aaaaaaaaaaaa", "0.1.0+bbbbbbbbbbbb"):
        monkeypatch.setattr(lineage, "code_version", lambda version=version: version)
        record = lineage.write_model_lineage(model, stage="warmup", parent=None, data={}, params={})
        assert record["code_version"] == version
        ids.add(record["model_id"])
    assert ids == {lineage.model_id(model)}


def test_loaded_sources_are_project_modules_only():
    sources = lineage.loaded_sources()
    assert sources == sorted(sources, key=lambda p: p.relative_to(ROOT).as_posix())
    assert all(p.relative_to(ROOT).parts[0] in ("factory", "train") for p in sources)
    assert ROOT / "factory" / "lineage.py" in sources


def test_dataset_card_shows_the_library_versions(tmp_path):
    from test_export import build_project

    from factory.export import export_dataset

    project = build_project(tmp_path / "project")
    export_dataset(tmp_path / "hub", root=project, tables=("problems", "pairs"))
    card = (tmp_path / "hub" / "README.md").read_text()
    versions = lineage.library_versions()
    line = next(line for line in card.splitlines() if line.startswith("Library versions that wrote"))
    assert f"torch {versions['torch']}" in line and f"trl {versions['trl']}" in line
    assert f"python {versions['python']}" in line and f"factory {versions['factory']}" in line


# Runs the `factory` command with the given arguments, then prints the sources it loaded.
RUN_COMMAND = """
import json, sys
from factory.cli import main
from factory.lineage import loaded_sources
status = main(sys.argv[1:])
print(json.dumps({"status": status, "loaded": [str(p) for p in loaded_sources()]}))
"""


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage["deps"] if dep.split("/")[0] in ("factory", "train")}


def covers(deps: set[str], source: str) -> bool:
    return any(source == dep or source.startswith(dep + "/") for dep in deps)


def test_each_stage_declares_the_code_its_command_loads(tmp_path):
    """DVC re-runs a stage when a dependency changes; code_version changes when a loaded module does. If a
    stage loaded a module it did not declare, `dvc status` would call it up to date after an edit to that
    module while a fresh clone's run wrote other bytes (what CI's check of dvc.lock caught)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {name: stage.get("do", stage) for name, stage in stages.items()}
    # The problems stage runs for real (it is cheap): what it loads must be within what it declares.
    problems = shlex.split(commands["problems"]["cmd"])
    assert problems[0] == "factory"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["problems"]["arith"]["sizes"] = {name: 2 for name in params["problems"]["arith"]["sizes"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", RUN_COMMAND, *problems[1:]], cwd=tmp_path, env=env,
                          check=True, capture_output=True, text=True)
    ran = json.loads(done.stdout.strip().splitlines()[-1])
    assert ran["status"] in (0, None) and (tmp_path / "data" / "problems.parquet").exists()
    loaded = {Path(p).relative_to(ROOT).as_posix() for p in ran["loaded"]}
    assert loaded and {p for p in loaded if not covers(code_deps(commands["problems"]), p)} == set()
    # Every command validates the whole params file, importing each section's settings class from both
    # packages, so every stage that runs `factory` must declare both.
    for name, command in commands.items():
        if command["cmd"].split()[0] == "factory":
            assert {"factory", "train"} <= code_deps(command), name

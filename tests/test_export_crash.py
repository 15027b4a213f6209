"""Killed anywhere, resumed identical: `factory export` SIGKILLed while it replaces an earlier export leaves the
old or the new export (never a half of one), a re-run writes the bytes of an uninterrupted export, and files the
exporter did not write (a `.git/`, the user's own) survive re-export. Stale temp files of killed writes go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_export import build_project

import factory.export as export
from factory.export import ExportError, export_dataset, push_dataset, recover_export
from factory.io import write_text

OLD_TABLES = ("problems", "pairs", "votes")
NEW_TABLES = ("problems", "pairs", "labels")
USER_FILES = {".git/config": "[core]\n", ".git/objects/ab/cdef": "blob", ".gitattributes": "*.parquet lfs\n",
              "notes.txt": "my notes", "pairs/my_extra.md": "mine, inside a config folder"}

# Runs one export in a child process that kills itself (SIGKILL) when the export reaches step argv[4].
CHILD = """
import os, signal, sys
import factory.export as export
out, root, tables, step, exchange = sys.argv[1:6]
def reached(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
export._reached = reached
if exchange == "no":
    export._exchange = lambda a, b: False
export.export_dataset(out, root=root, tables=tuple(tables.split(",")))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(project root, {path: bytes} of an uninterrupted export of NEW_TABLES, same for OLD_TABLES)."""
    base = tmp_path_factory.mktemp("crash")
    root = build_project(base / "project")
    return root, exporter_files(base / "new", root, NEW_TABLES), exporter_files(base / "old", root, OLD_TABLES)


def exporter_files(out: Path, root: Path, tables) -> dict[str, bytes]:
    export_dataset(out, root=root, tables=tables)
    return snapshot(out)


def snapshot(out: Path) -> dict[str, bytes]:
    """The files the export in `out` says it wrote, with their bytes; every one of them must be there."""
    files = json.loads((out / "lineage.json").read_text())["files"]
    return {name: (out / name).read_bytes() for name in files}


def with_user_files(out: Path) -> None:
    for name, text in USER_FILES.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / "empty_dir").mkdir()


def assert_user_files(out: Path) -> None:
    assert {name: (out / name).read_text() for name in USER_FILES} == USER_FILES
    assert (out / "empty_dir").is_dir()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def killed_export(out: Path, root: Path, step: str, *, exchange: bool = True) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(out), str(root), ",".join(NEW_TABLES), step,
                             "yes" if exchange else "no"], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


@pytest.mark.parametrize(("step", "exchange"), [
    ("building", True), ("staged", True), ("ready", True), ("swapped", True),
    ("ready", False), ("aside", False), ("swapped", False),
])
def test_killed_export_leaves_old_or_new_and_a_rerun_matches(project, tmp_path, step, exchange):
    root, new, old = project
    out = tmp_path / "hub"
    export_dataset(out, root=root, tables=OLD_TABLES)
    with_user_files(out)
    killed_export(out, root, step, exchange=exchange)
    expected = {"building": [".hub.export-tmp-"], "staged": [".hub.export-tmp-"], "ready": [".hub.export-new"],
                "aside": [".hub.export-new", ".hub.export-old"],  # the fallback: the old set aside
                "swapped": [".hub.export-new" if exchange else ".hub.export-old"]}  # the old, swapped out
    assert [name.rstrip("0123456789") for name in leftovers(out)] == expected[step]
    if exchange or step != "aside":  # only between the two renames of the fallback is `out` missing
        assert snapshot(out) in (old, new)
        assert_user_files(out)
    with export._export_lock(out):
        recover_export(out)  # what the next export or push does first
    assert snapshot(out) == (new if step in ("swapped", "aside") else old)
    assert_user_files(out)
    assert leftovers(out) == []

    export_dataset(out, root=root, tables=NEW_TABLES)
    assert snapshot(out) == new
    assert_user_files(out)
    assert leftovers(out) == []
    written = set(new) | set(USER_FILES) | {"empty_dir"}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or not any(p.iterdir())} <= written


def test_first_export_killed_before_it_is_in_place(project, tmp_path):
    root, new, _ = project
    out = tmp_path / "hub"
    killed_export(out, root, "building")
    assert not out.exists() and len(leftovers(out)) == 1  # the dead build, removed by the next run
    killed_export(out, root, "ready")
    assert not out.exists()
    export_dataset(out, root=root, tables=NEW_TABLES)
    assert snapshot(out) == new and leftovers(out) == []


def test_export_killed_from_outside_once_it_is_building(project, tmp_path):
    """Not at a chosen step: SIGKILL as soon as the new export's build folder appears, then a little later."""
    root, new, old = project
    for delay in (0.0, 0.3, 1.0):
        out = tmp_path / f"hub-{delay}"
        export_dataset(out, root=root, tables=OLD_TABLES)
        with_user_files(out)
        process = subprocess.Popen([sys.executable, "-m", "factory.cli", "export", str(out), "--root", str(root),
                                    "--tables", ",".join(NEW_TABLES)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not leftovers(out) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert snapshot(out) in (old, new)
        assert_user_files(out)
        export_dataset(out, root=root, tables=NEW_TABLES)
        assert snapshot(out) == new and leftovers(out) == []
        assert_user_files(out)


def test_reexport_keeps_git_and_user_files_and_replaces_its_own(project, tmp_path):
    root, new, _ = project
    out = tmp_path / "hub"
    export_dataset(out, root=root, tables=OLD_TABLES)
    with_user_files(out)
    (out / "README.md").write_text("edited by hand")  # the exporter's file: the next export replaces it
    (out / "votes" / "notes.md").write_text("about votes")  # the user's, in a folder the next export drops
    (out / "link").symlink_to("notes.txt")
    export_dataset(out, root=root, tables=NEW_TABLES)
    assert snapshot(out) == new
    assert_user_files(out)
    assert sorted(p.name for p in (out / "votes").iterdir()) == ["notes.md"]
    assert (out / "link").is_symlink() and (out / "link").read_text() == "my notes"

    (out / "sketch.parquet").write_bytes(b"mine")
    lineage = json.loads((out / "lineage.json").read_text())
    lineage["files"].remove("labels/iter_1.parquet")  # as if an earlier export had not written it
    (out / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(ExportError, match="labels/iter_1.parquet: not written by the earlier export"):
        export_dataset(out, root=root, tables=NEW_TABLES)
    assert (out / "labels/iter_1.parquet").read_bytes() == new["labels/iter_1.parquet"]  # nothing was touched
    assert (out / "sketch.parquet").read_bytes() == b"mine" and leftovers(out) == []


def test_export_made_before_the_files_list_is_still_replaceable(project, tmp_path):
    """Older exports' lineage.json has no `files`: their splits' paths, README.md and lineage.json are theirs."""
    root, new, _ = project
    out = tmp_path / "hub"
    export_dataset(out, root=root, tables=OLD_TABLES)
    lineage = json.loads((out / "lineage.json").read_text())
    del lineage["files"]
    (out / "lineage.json").write_text(json.dumps(lineage))
    (out / "notes.txt").write_text("mine")
    export_dataset(out, root=root, tables=NEW_TABLES)
    assert snapshot(out) == new and (out / "notes.txt").read_text() == "mine"
    assert not (out / "votes").exists()


def test_push_finishes_an_interrupted_swap_first(project, tmp_path, monkeypatch):
    import huggingface_hub

    root, new, _ = project
    out = tmp_path / "hub"
    export_dataset(out, root=root, tables=OLD_TABLES)
    killed_export(out, root, "aside", exchange=False)
    assert not out.exists()
    uploaded = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, **kwargs):
            uploaded.append(snapshot(Path(kwargs["folder_path"])))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    push_dataset(out, "me/data", token="hf_x")
    assert uploaded == [new] and leftovers(out) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "table.parquet"
    dead, live = dead_pid(), os.getppid()
    stale = tmp_path / f".table.parquet.tmp-{dead}"
    busy = tmp_path / f".table.parquet.tmp-{live}"
    other = tmp_path / f".other.parquet.tmp-{dead}"
    for path in (stale, busy, other):
        path.write_text("partial")
    write_text(target, "done")
    assert target.read_text() == "done"
    assert not stale.exists()  # its writer is dead
    assert busy.exists()  # a live process's write in progress: never touched
    assert other.exists()  # another file's: cleaned when that file is written
    write_text(tmp_path / "other.parquet", "x")
    assert not other.exists()


def test_stale_export_builds_are_removed_but_not_a_live_ones(project, tmp_path):
    root = project[0]
    out = tmp_path / "hub"
    dead = tmp_path / f".hub.export-tmp-{dead_pid()}"
    live = tmp_path / f".hub.export-tmp-{os.getppid()}"
    for folder in (dead, live):
        (folder / "pairs").mkdir(parents=True)
        (folder / "pairs" / "iter_1.parquet").write_bytes(b"partial")
    export_dataset(out, root=root, tables=("pairs",))
    assert not dead.exists() and live.exists()

"""Hub export: a small hand-built project exported, loaded back with datasets, its card read; the upload faked."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from factory.export import ExportError, export_dataset, public_remote, push_dataset
from factory.lineage import write_table
from factory.schema import from_rows

TEST_QUESTION = "Mia has 12 marbles and buys 7 more marbles at the store today. How many marbles does she have now?"
MODELS = {  # folder: (model_id, stage, parent)
    "models/base": ("m-base", "base", None),
    "models/iter_0": ("m-warmup", "warmup", "m-base"),
    "models/iter_1/dpo": ("m-dpo1", "dpo", "m-warmup"),
    "models/iter_1": ("m-iter1", "train:dpo_st", "m-warmup"),
}
SECRET = "hf_secret_token_do_not_leak"


def question(i: int) -> str:
    return f"Tom has {i} apples and finds {i + 3} more apples under the old tree. How many apples does he have?"


def problems_rows() -> list[dict]:
    rows = [{"problem_id": f"p-{i}", "question": question(i), "gold_answer": str(2 * i + 3), "source": "arith",
             "split": split, "gold_rationale": "r" if split == "train" else None}
            for i, split in enumerate(["train", "train", "answers", "answers", "answers", "test"])]
    rows.append({"problem_id": "p-leak", "question": TEST_QUESTION, "gold_answer": "19", "source": "arith",
                 "split": "answers"})
    rows.append({"problem_id": "p-test", "question": TEST_QUESTION, "gold_answer": "19", "source": "arith",
                 "split": "test"})
    return rows


def write_iteration(root: Path, k: int, model_id: str, *, self_train_model: str | None = None) -> None:
    """One iteration's tables, each with provenance; computed tables name their inputs (their fingerprints)."""
    folder = root / f"data/iter_{k}"
    problems = root / "data/problems.parquet"

    def samples(path: Path, model: str, n: int) -> Path:
        rows = [{"sample_id": f"s-{k}-{model}-{i}", "problem_id": f"p-{2 + i % 3}", "iteration": k, "model_id": model,
                 "generator": "hf", "sample_index": i, "seed": 0, "temperature": 0.7, "top_p": 1.0,
                 "max_new_tokens": 64, "calculator": True, "text": f"step {i}\n#### {i}", "n_tokens": 5,
                 "finish_reason": "stop"} for i in range(n)]
        return write_table(from_rows(rows, "samples"), path, kind="samples", stage="sample",
                           inputs={"problems": problems}, model_id=model)

    def labels(path: Path, samples_path: Path, n: int) -> Path:
        rows = [{"sample_id": f"s-{k}-{i}", "problem_id": "p-2", "answer_status": "correct", "n_steps": 1,
                 "calc_total": 1, "calc_wrong": 0, "calc_invalid": 0} for i in range(n)]
        return write_table(from_rows(rows, "labels"), path, kind="labels", stage="label",
                           inputs={"problems": problems, "samples": samples_path})

    sampled = samples(folder / "samples.parquet", model_id, 4)
    labelled = labels(folder / "labels.parquet", sampled, 4)
    inputs = {"samples": sampled, "labels": labelled}
    write_table(from_rows([{"problem_id": "p-2", "n_samples": 4, "n_answered": 4, "n_answers": 1, "top_answer": "7",
                            "top_votes": 4, "top_share": 1.0, "tied": False, "entropy": 0.0}], "votes"),
                folder / "votes.parquet", kind="votes", stage="label", inputs=inputs)
    write_table(from_rows([{"pair_id": f"pair-{k}-{i}", "problem_id": "p-2", "iteration": k, "recipe": "dpo_st",
                            "prompt": "q", "chosen": "good", "rejected": "bad", "weight": 1.0} for i in range(k + 1)],
                          "pairs"), folder / "pairs.parquet", kind="pairs", stage="pairs", inputs=inputs,
                params={"model": str(root / f"models/iter_{k - 1}")})  # as given on the command line
    write_table(from_rows([{"row_id": f"s-{k}-9", "table": "samples", "stage": "filter", "filter": "length",
                            "reason": "too long", "row": "{}"}], "dropped"),
                folder / "dropped.parquet", kind="dropped", stage="filter", inputs=inputs)
    if self_train_model:
        second = samples(folder / "self_train/samples.parquet", self_train_model, 3)
        labels(folder / "self_train/labels.parquet", second, 3)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def build_project(root: Path, *, git: bool = True) -> Path:
    """problems, two iterations (the first with a second round), model lineage, params.yaml, dvc.lock."""
    problems = root / "data/problems.parquet"
    write_table(from_rows(problems_rows(), "problems"), problems, kind="problems", stage="problems")
    write_table(from_rows([], "dropped"), root / "data/problems.dropped.parquet", kind="dropped", stage="problems")
    write_iteration(root, 1, "m-warmup", self_train_model="m-dpo1")
    write_iteration(root, 2, "m-iter1")
    for folder, (model_id, stage, parent) in MODELS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "lineage.json").write_text(json.dumps(
            {"model_id": model_id, "stage": stage, "parent": parent, "params": {"base_model": "tiny"}}))
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"recipe": "dpo_st", "iterations": {"1": {"prev": 0}, "2": {"prev": 1}}, "sample": {"n": 4},
         "eval": {"splits": ["test"]}, "audit": {"ngram": 8}}))
    outs = {"problems": ["data/problems.parquet"], "sample@1": ["data/iter_1/samples.parquet"],
            "pairs@1": ["data/iter_1/pairs.parquet"], "pairs@2": ["data/iter_2/pairs.parquet"],
            "train@1": ["data/iter_1/self_train"]}
    lock = {"schema": "2.0", "stages": {stage: {"cmd": f"factory {stage}", "outs": [
        {"path": p, "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir" if p.endswith("self_train")
         else md5(root / p)} for p in paths]} for stage, paths in outs.items()}}
    lock["stages"]["pairs@2"]["outs"][0]["md5"] = "f" * 32  # a file changed after dvc.lock was written
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    if git:
        run = lambda *args: subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)  # noqa: E731
        run("init", "-q")
        run("add", "-A")
        run("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "run")
        run("remote", "add", "origin", f"https://someone:{SECRET}@github.com/owner/factory.git")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(project root, export folder, returned lineage), exported once for the module."""
    base = tmp_path_factory.mktemp("export")
    project = build_project(base / "project")
    out = base / "hub"
    return project, out, export_dataset(out, root=project)


def load(out: Path, config: str | None = None) -> dict[str, int]:
    import datasets

    loaded = datasets.load_dataset(str(out), config, cache_dir=str(out.parent / "hf_cache"))
    assert all("file" not in split.column_names for split in loaded.values())
    return {name: split.num_rows for name, split in loaded.items()}


def test_every_config_loads_with_its_splits_and_rows(exported):
    _, out, _ = exported
    assert load(out) == {"iter_1": 2, "iter_2": 3}  # pairs, the default config
    assert load(out, "problems") == {"train": 2, "answers": 4, "test": 2}
    assert load(out, "samples") == {"iter_1": 4, "iter_1_self_train": 3, "iter_2": 4}
    assert load(out, "labels") == {"iter_1": 4, "iter_1_self_train": 3, "iter_2": 4}
    assert load(out, "dropped") == {"iter_1": 1, "iter_2": 1}  # the empty problems split is left out
    assert load(out, "votes") == {"iter_1": 1, "iter_2": 1}
    assert load(out, "pairs_chat") == {"iter_1": 2, "iter_2": 3}  # TRL's conversational format (test_export_chat)
    assert load(out, "sft_chat") == {"gold": 2}  # no kept samples in this project


def test_card_names_lineage_without_machine_paths(exported):
    project, out, lineage = exported
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert [c["config_name"] for c in front["configs"] if c.get("default")] == ["pairs"]
    assert front["license"] == "mit" and "text-generation" in front["task_categories"]
    for text in (card, (out / "lineage.json").read_text()):
        assert str(project.parent) not in text and "/tmp" not in text and "/work" not in text
        assert str(Path.home()) not in text and SECRET not in text
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert lineage["git"] == {"revision": revision, "dirty": False, "remote": "https://github.com/owner/factory.git"}
    assert (f"git clone https://github.com/owner/factory.git factory && cd factory && git checkout {revision} "
            "&& pip install --require-hashes -r requirements.lock && pip install --no-deps -e . && dvc repro") in card
    for model_id in ("m-warmup", "m-dpo1", "m-iter1"):
        assert f"`{model_id}`" in card
    assert "models/iter_1/dpo (`m-dpo1`, dpo) ← models/iter_0 (`m-warmup`, warmup) ← models/base (`m-base`, base)" \
        in card
    assert "| samples/iter_1 | sample@1 | `m-warmup` |" in card
    assert "| pairs/iter_1 | pairs@1 | `m-warmup`* |" in card  # computed: traced to the samples it derives from
    assert f"`{md5(project / 'data/iter_1/samples.parquet')}`" in card
    assert "in folder data/iter_1/self_train" in card
    assert "**Warning:** data/iter_2/pairs.parquet differs from dvc.lock" in card
    assert ("1 of 6 problems outside the test splits (test) share at least 80% of a test question's word 8-grams "
            "(answers: 1).") in card
    assert "Empty, so not exported: dropped/problems" in card
    by_split = {(s["config"], s["split"]): s for s in lineage["splits"]}
    assert by_split["samples", "iter_1_self_train"]["models"] == ["m-dpo1"]
    assert by_split["pairs", "iter_1"]["dvc_lock"]["matches"] is True
    assert lineage["decontamination"]["contaminated_by_split"] == {"answers": 1}
    assert by_split["pairs", "iter_2"]["provenance"]["params"]["model"] == "models/iter_1"
    assert "audit" not in lineage["params"] and json.loads((out / "lineage.json").read_text()) == lineage


def test_export_replaces_an_earlier_export_but_no_other_folder(exported, tmp_path):
    project = exported[0]
    again = tmp_path / "again"
    export_dataset(again, root=project, tables=("pairs", "votes"))
    export_dataset(again, root=project, tables=("pairs",))
    assert sorted(p.name for p in again.iterdir()) == ["README.md", "lineage.json", "pairs"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_dataset(tmp_path / "mine", root=project)
    with pytest.raises(ExportError, match="no eval table.*tables found: dropped, labels"):
        export_dataset(tmp_path / "new", root=project, tables=("eval",))


def test_without_git_the_card_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    project = build_project(tmp_path / "project", git=False)
    lineage = export_dataset(tmp_path / "hub", root=project, tables=("problems", "pairs"))
    assert lineage["git"] == {"revision": None, "dirty": None, "remote": None}
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "no git revision" in card and "requirements.lock && pip install --no-deps -e . && dvc repro" in card


@pytest.mark.parametrize(("url", "public"), [
    (f"https://user:{SECRET}@github.com/o/r.git", "https://github.com/o/r.git"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ("/work/main", None),
    ("file:///srv/repo.git", None),
    (None, None),
])
def test_public_remote_drops_credentials_and_local_paths(url, public):
    assert public_remote(url) == public


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls (the network is not reachable)."""

    calls: list = []

    def __init__(self, token=None):
        RecordingApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))


def test_push_uploads_the_folder_and_never_shows_the_token(exported, monkeypatch, capsys):
    import huggingface_hub

    _, out, lineage = exported
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    RecordingApi.calls = []
    assert push_dataset(out, "me/reasoning", private=True) == "https://huggingface.co/datasets/me/reasoning"
    init, create, upload = RecordingApi.calls
    assert init == ("init", SECRET)
    assert create == ("create_repo", "me/reasoning", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert upload[1] | {"commit_message": None} == {"folder_path": str(out), "repo_id": "me/reasoning",
                                                     "repo_type": "dataset", "revision": None, "commit_message": None}
    assert lineage["git"]["revision"][:12] in upload[1]["commit_message"]

    RecordingApi.calls = []
    url = push_dataset(out, "me/reasoning", token="hf_other", revision="v1")
    assert url.endswith("/tree/v1") and RecordingApi.calls[2][0] == "create_branch"
    assert RecordingApi.calls[3][1]["revision"] == "v1"
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert all(SECRET.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_push_without_a_token_is_a_clear_error(exported, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ExportError, match="no Hugging Face token: set HF_TOKEN"):
        push_dataset(exported[1], "me/reasoning")
    with pytest.raises(ExportError, match="not an export"):
        push_dataset(exported[0], "me/reasoning", token="x")

"""Hub sharing: the project's tables as a Hub dataset folder with a card, and its upload.

`export_dataset` writes one Parquet file per table and split
(`problems/<split>.parquet` by the problems' own `split` column,
`<table>/iter_<k>.parquet` per iteration, `<table>/iter_<k>_self_train.parquet`
for the second round under `data/iter_k/self_train/`), a README.md whose YAML
front matter declares them as configs (what the Hub viewer and
`datasets.load_dataset` read) and whose text says where every split came from,
and lineage.json with the same facts for machines. Everything in the folder is
published, so it names only paths relative to the project root.

Eval predictions are opt-in (`tables=(..., "eval")`): they are model outputs on
the test splits, and a default export that people train on wholesale should not
carry test-set generations.

Two more configs carry the training data in TRL's conversational format, so a
dataset made with one model trains a model with another chat template (the
`pairs` config's `prompt` is text rendered with the producing model's template):

- `pairs_chat/<split>.parquet`, one split per `pairs` split: `prompt` (the raw
  question as a user message), `chosen` and `rejected` (one assistant message
  each), exactly TRL's explicit-prompt conversational preference columns, so
  `DPOTrainer(train_dataset=load_dataset(DIR, "pairs_chat", split="iter_1"))`
  renders them with the trained model's own template; plus `question`,
  `prefix`, `prefix_steps`, `weight`, `chosen_open`, `rejected_open` and the
  pairs' ids.
- `sft_chat`: `messages` (user question, assistant rationale), TRL's
  conversational language-modeling format. Split `gold`: the `train` split's
  gold rationales (the warm-up's data); `iter_k`: iteration k's kept samples
  labelled correct; `iter_k_self_train`: the correct samples the train
  stage kept (the second round; for the self_train recipe, pooled with the
  first), so `split="gold+iter_k_self_train"` is what DPO-ST's and
  self-training's SFT step of iteration k trained on (train/iteration.py
  `self_training_examples`).

Step-level pairs (scdpo, mcts_dpo: a non-null `prefix_steps`) share their first
steps, which `pairs` appends to the rendered prompt. In `pairs_chat` the shared
steps (`prefix`) open both assistant messages: chosen = prefix + chosen
continuation, rejected = prefix + rejected continuation. TRL cannot take them
in the prompt: its DPOTrainer renders a prompt with `add_generation_prompt`,
so a prompt ending with an assistant message becomes a closed assistant turn
followed by a second one. Inside one assistant turn the text is what the
producing model saw, and DPO's log-ratio margin is unchanged: the prefix
tokens have the same context and log-probabilities on both sides, so they
cancel (terms that are not a chosen-minus-rejected difference, such as an NLL
term on chosen or length normalisation, do count them). The prefix is
recovered exactly: the pairs stage records the hash of its prompt rendered for
the question "{question}" (`prompt_format`), and the export finds the template
that hashes to it. `chosen_open`/`rejected_open` mark a tree-search step with
more steps to come (train/dpo.py `open_ended`): a chat template closes every
assistant turn, so train those sides without the end-of-turn token, or leave
them out.

Texts are what the models wrote: samples are decoded without special tokens,
so no end-of-turn token is part of a `chosen`, `rejected` or `messages` text.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import yaml

from factory.audit import TableFile, catalog, discover, model_records, sql_literal, views
from factory.ids import content_hash, file_fingerprint
from factory.io import remove_stale, write_json, write_text
from factory.lineage import dvc_lock_entry, dvc_lock_outputs

DEFAULT_TABLES = ("problems", "samples", "labels", "pairs", "votes", "dropped", "pairs_chat", "sft_chat")
# Configs made from other tables (TRL's conversational format): the tables each needs.
DERIVED = {"pairs_chat": ("pairs", "problems"), "sft_chat": ("problems",)}
QUESTION_SLOT = "{question}"  # the question the pairs stage renders its prompt format with (factory.cli cmd_pairs)
GOLD_SPLIT = "train"  # the problems split whose gold rationales are SFT data (train/sft.py gold_examples)
_QUESTIONS = "(SELECT problem_id, any_value(question) AS question FROM problems GROUP BY problem_id)"
DEFAULT_CONFIG = "pairs"
EXPORT_MARKER = "factory.export"  # in lineage.json: the folder is an export, safe to replace
DEFAULT_TEST_SPLITS = ("test", "test_ood")  # when params.yaml has no eval.splits
HUB_SPLIT = re.compile(r"\w+(\.\w+)*")
_ITER_FOLDER = re.compile(r"iter_\d+")
_SCP_REMOTE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@github.com:owner/repo.git

TABLE_DESCRIPTIONS = {
    "problems": "The task: one row per problem, in the split its `split` column names.",
    "samples": "Rationales sampled with the calculator: `iter_k` from the model iteration k starts from, "
               "`iter_k_self_train` the recipe's second round of sampling in iteration k.",
    "kept": "The samples that passed the filters.",
    "labels": "One row per sample: its final answer, the answer's status against gold, calculator checks and votes.",
    "votes": "One row per sampled problem: the majority vote over its samples' final answers.",
    "pairs": "Preference pairs for DPO (prompt, chosen, rejected, weight); a null `chosen_sample_id` marks the "
             "gold rationale, unless `chosen_node_id` names the search-tree step it came from (mcts_dpo).",
    "dropped": "Every row a filter removed, with the filter, the reason and the whole row as JSON.",
    "eval": "Each iteration's model's predictions on the test splits (`iter_k`: the model of iteration k).",
    "pairs_chat": "The `pairs` in TRL's conversational preference format, for a model with any chat template: "
                  "`prompt` is the raw question as a user message, `chosen` and `rejected` one assistant message "
                  "each (what the model wrote, no end-of-turn token). A step-level pair's shared steps (`prefix`, "
                  "`prefix_steps` of them) open both assistant messages: TRL renders a prompt ending with an "
                  "assistant message as a closed turn, and DPO's margin is unchanged because the shared tokens "
                  "cancel. `chosen_open`/`rejected_open` mark a search-tree step with more to come: train it "
                  "without the end-of-turn token the template adds, or leave it out.",
    "sft_chat": "SFT data in TRL's conversational format: `messages` is the question as a user message and a "
                "rationale as the assistant's. `gold`: the train split's gold rationales (the warm-up's data); "
                "`iter_k`: iteration k's kept samples labelled correct; `iter_k_self_train`: those the train stage "
                "kept (its second round), so `split=\"gold+iter_k_self_train\"` is what iteration k's SFT step "
                "trained on.",
}
PROBLEM_SPLITS = {
    "train": "gold rationales (the warm-up's SFT data)",
    "dev": "model selection",
    "answers": "final answers only: the sampling pool",
    "unlabeled": "questions only",
    "test": "held-out evaluation",
    "test_ood": "held-out evaluation, longer problems than training",
}


class ExportError(ValueError):
    """The export or upload cannot proceed; the message says what to change."""


@dataclass
class Split:
    """One exported Parquet file and where its rows came from."""

    config: str
    name: str
    source: TableFile
    where: str = ""  # SQL filter on the source (problems: its split)
    query: str = ""  # derived configs: the SELECT that makes the rows
    inputs: list[str] = field(default_factory=list)  # derived configs: the files the rows are made from
    rows: int = 0
    models: list[str] = field(default_factory=list)  # the models whose generations the rows are or derive from
    traced: bool = False  # models found through the inputs' fingerprints, not the file's own model_id
    dvc: dict | None = None

    @property
    def path(self) -> str:
        return f"{self.config}/{self.name}.parquet"


def export_dataset(
    out_dir: str | Path,
    *,
    root: str | Path = ".",
    tables: Sequence[str] = DEFAULT_TABLES,
    iterations: Iterable[int] | None = None,
    decontamination: dict | None = None,
) -> dict:
    """Write the Hub dataset folder `out_dir` (see the module docstring); returns what lineage.json holds.

    `decontamination` is a report to publish as is; without it, one is computed
    from the problems (word n-grams shared with test questions, as the audit does).

    An earlier export in `out_dir` is replaced as a whole: the new one is built beside it and swapped in
    (killed at any point, the folder is the complete old or new export, and the next run finishes or
    undoes the swap: `recover_export`). Only the files the earlier export wrote (lineage.json `files`) are
    replaced; anything else in the folder (a `.git/`, `.gitattributes`, the user's notes) is carried over.
    """
    root = Path(root)
    out = Path(out_dir).absolute()
    with _export_lock(out):
        recover_export(out)
        return _export(out, root, tables, iterations, decontamination)


def _export(out: Path, root: Path, tables: Sequence[str], iterations: Iterable[int] | None,
            decontamination: dict | None) -> dict:
    """export_dataset's work, under its lock: build the new export beside `out`, then swap it in."""
    previous = _check_replaceable(out)
    files = discover(root, iterations=iterations)
    by_view: dict[str, list[TableFile]] = {}
    for table_file in files:
        if table_file.view:
            by_view.setdefault(table_file.view, []).append(table_file)
    missing = list(dict.fromkeys(needed for t in tables for needed in DERIVED.get(t, (t,)) if needed not in by_view))
    if missing:
        raise ExportError(f"no {', '.join(missing)} table under {root / 'data'}; "
                          f"tables found: {', '.join(sorted(by_view)) or 'none'}")
    params = _load_params(root)
    git = _git_facts(root)  # before anything is written: a new folder inside the repo would read as dirty
    con = catalog(root, iterations=iterations)
    splits = _plan_splits(con, root, tables, by_view)

    staging = out.with_name(f"{_staging_prefix(out)}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for split in splits:
            split.rows = _copy(con, root, by_view.get(split.config, []), split, staging / split.path)
            if not split.rows:  # datasets cannot load an empty split: leave it out and say so
                (staging / split.path).unlink()
            _reached("building")
        empty = [s for s in splits if not s.rows]
        splits = [s for s in splits if s.rows]
        _trace(root, splits, files)
        if decontamination is None:
            decontamination = _decontamination(con, params)
        models = _ancestry(root)
        lineage = json.loads(_scrub(json.dumps(_lineage(splits, empty, models, params, git, decontamination, con)),
                                  root))
        lineage["files"] = sorted([*(s.path for s in splits), "README.md", "lineage.json"])  # what to replace
        write_json(staging / "lineage.json", lineage)
        write_text(staging / "README.md", _scrub(_card(splits, models, lineage, staging), root))
        if previous is not None:
            _carry_over(out, staging, previous, set(lineage["files"]))
        _reached("staged")
        ready = _ready(out)
        staging.rename(ready)  # complete: from here a restart finishes the swap or keeps the old export
        _reached("ready")
        _swap(out, ready)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return lineage


# Beside an export folder NAME while it is replaced (all removed or renamed in by `recover_export`):
# `.NAME.export-tmp-PID` the new export being built, `.NAME.export-new` the complete new export (or, after
# an atomic exchange, the old one), `.NAME.export-old` the old export set aside (when exchange is unsupported).
def _staging_prefix(out: Path) -> str:
    return f".{out.name}.export-tmp-"


def _ready(out: Path) -> Path:
    return out.with_name(f".{out.name}.export-new")


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.export-old")


def _reached(step: str) -> None:
    """A named step of the replacement (building, staged, ready, aside, swapped): tests kill the process here."""


@contextlib.contextmanager
def _export_lock(out: Path):
    """One export or recovery of a folder at a time: flock on the folder's parent (no lock file is left)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


def _swap(out: Path, ready: Path) -> None:
    """Put the complete export `ready` in place of `out`, then remove the old one.

    With an atomic exchange `out` is always a complete export; otherwise it is missing for a moment
    (old set aside, new not yet renamed in), and `recover_export` finishes the swap after a kill there.
    """
    if not out.exists():
        ready.rename(out)
        return
    if _exchange(ready, out):  # `ready` now holds the old export
        _reached("swapped")
        shutil.rmtree(ready)
        return
    aside = _aside(out)
    out.rename(aside)
    _reached("aside")
    ready.rename(out)
    _reached("swapped")
    shutil.rmtree(aside)


def recover_export(out: str | Path) -> None:
    """Finish or undo a replacement of export `out` that was killed midway, and remove dead builds.

    Afterwards `out` is the complete old or the complete new export (or absent, if there was none):
    a complete new one not yet swapped in is dropped while the old one stands (the interrupted export
    is simply run again), and finished when the old one was already set aside. Call under `_export_lock`.
    """
    out = Path(out).absolute()
    remove_stale(out.parent, _staging_prefix(out))
    remove_stale(out.parent, f".{out.name}.tmp-")  # a build by the export before it named them export-tmp
    ready, aside = _ready(out), _aside(out)
    if out.exists():
        # `ready`: the new export, not yet swapped in, or the old one, swapped out; `aside`: the old one
        for leftover in (ready, aside):
            if leftover.exists():
                shutil.rmtree(leftover)
    elif ready.exists():  # killed between setting the old export aside and renaming the new one in
        ready.rename(out)
        if aside.exists():
            shutil.rmtree(aside)
    elif aside.exists():  # the old export set aside with no new one to take its place: put it back
        aside.rename(out)


def _written(lineage: dict) -> set[str]:
    """The files an export wrote (relative paths): its `files`, or for an export made before it listed
    them, its splits' files, README.md and lineage.json."""
    if isinstance(lineage.get("files"), list):
        return set(lineage["files"])
    return {"README.md", "lineage.json", *(s["path"] for s in lineage.get("splits") or [] if "path" in s)}


def _carry_over(out: Path, staging: Path, previous: set[str], new: set[str]) -> None:
    """Everything in the earlier export `out` it did not write itself (a `.git/`, `.gitattributes`, notes)
    goes into the new export at the same place, as hard links (copies where links are not possible); the
    earlier export's own files are not carried. A file of the user's where the new export writes one is
    an error: the export never deletes what it did not write."""
    for folder, dirs, names in os.walk(out):
        here = Path(folder)
        relative = here.relative_to(out)
        links = [d for d in dirs if (here / d).is_symlink()]  # a link to a folder: carried as a link
        dirs[:] = [d for d in dirs if d not in links]
        if not dirs and not names and not links and relative != Path("."):
            (staging / relative).mkdir(parents=True, exist_ok=True)  # an empty folder of the user's
        for name in names + links:
            path = (relative / name).as_posix()
            if path in previous:
                continue
            if path in new:
                raise ExportError(f"{out / path}: not written by the earlier export, but this export writes it; "
                                  "move it away and export again")
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(here / name, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(here / name, target, follow_symlinks=False)


def push_dataset(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload an exported folder as the Hub dataset `repo_id`; returns its URL. The token is never shown."""
    import huggingface_hub

    folder = Path(folder)
    with _export_lock(folder.absolute()):
        recover_export(folder)  # an export killed while it replaced this folder: finished or undone
    if not (folder / "README.md").is_file() or not (folder / "lineage.json").is_file():
        raise ExportError(f"{folder}: not an export (no README.md and lineage.json); run the export first")
    token = token or huggingface_hub.get_token()  # HF_TOKEN, else the token `hf auth login` saved
    if not token:
        raise ExportError("no Hugging Face token: set HF_TOKEN to a write token "
                          "(https://huggingface.co/settings/tokens) or log in with `hf auth login`")
    git = json.loads((folder / "lineage.json").read_text()).get("git") or {}
    message = f"factory export at {(git.get('revision') or 'an unversioned tree')[:12]}"
    if git.get("dirty"):
        message += " (with uncommitted changes)"
    api = huggingface_hub.HfApi(token=token)
    url = str(api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True))
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset", revision=revision,
                      commit_message=message)
    return f"{url}/tree/{revision}" if revision else url


def _split_name(table_file: TableFile) -> str:
    """`iter_<k>` plus any subfolder below it (`iter_1_self_train`); outside iterations, the file's first name part."""
    parts = PurePosixPath(table_file.path).parts
    if table_file.iteration is None:
        return _hub_name(parts[-1].split(".")[0])
    at = max(i for i, part in enumerate(parts) if _ITER_FOLDER.fullmatch(part))
    return _hub_name("_".join((f"iter_{table_file.iteration}", *parts[at + 1:-1])))


def _hub_name(name: str) -> str:
    """A Hub split name (`\\w+(\\.\\w+)*`): any other run of characters becomes '_'."""
    cleaned = re.sub(r"\W+", "_", name).strip("_")
    if not HUB_SPLIT.fullmatch(cleaned):
        raise ExportError(f"cannot make a Hub split name of {name!r}")
    return cleaned


def _check_replaceable(out: Path) -> set[str] | None:
    """Only an empty folder or an earlier export may be replaced; the files the earlier export wrote (the
    empty set for an empty folder; None for none): those are replaced, anything else in it is kept."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    marker = out / "lineage.json"
    try:
        lineage = json.loads(marker.read_text()) if marker.is_file() else {}
    except (ValueError, OSError):
        lineage = {}
    if not isinstance(lineage, dict) or lineage.get("exported_by") != EXPORT_MARKER:
        if any(out.iterdir()):
            raise ExportError(f"{out}: not empty and not an earlier export; choose a new or empty folder")
        return set()
    return _written(lineage)


def _plan_splits(con, root: Path, tables: Sequence[str], by_view: dict[str, list[TableFile]]) -> list[Split]:
    """One Split per table and split name; two files claiming one split name is an error."""
    splits: dict[tuple[str, str], Split] = {}
    for table in tables:
        if table == "pairs_chat":
            planned = [_pairs_chat_split(con, root, f, by_view["problems"]) for f in by_view["pairs"]]
        elif table == "sft_chat":
            planned = _sft_chat_splits(con, root, by_view)
        elif table == "problems":
            planned = []
            for table_file in by_view[table]:
                location = sql_literal(str(root / table_file.path))
                values = [row[0] for row in con.execute(  # in the table's own order (train, dev, ...)
                    f"SELECT split FROM read_parquet({location}, file_row_number = true) "
                    "GROUP BY split ORDER BY min(file_row_number)").fetchall()]
                planned += [Split(table, _hub_name(v), table_file, f"split = {sql_literal(v)}") for v in values]
        else:
            planned = [Split(table, _split_name(table_file), table_file) for table_file in by_view[table]]
        for split in planned:
            if (table, split.name) in splits:
                raise ExportError(f"{table}: {splits[table, split.name].source.path} and {split.source.path} "
                                  f"would both be split {split.name!r}")
            splits[table, split.name] = split
    return list(splits.values())


def _prompt_template(con, location: str, table_file: TableFile) -> str | None:
    """The pairs file's prompt for the question "{question}": what its provenance's `prompt_format` hashes.

    A pair's prompt is that template with the question in place of "{question}", plus the shared steps of
    a step-level pair; the template is the text around one occurrence of the question and the first part
    of what follows it whose hash is `prompt_format`. Without a recorded `prompt_format` (files not made by
    `factory pairs`), a whole-solution pair's prompt with its question cut out is taken as the template.
    """
    expected = ((table_file.provenance or {}).get("params") or {}).get("prompt_format")
    rows = con.execute(
        f"SELECT p.prompt, q.question, p.prefix_steps IS NOT NULL FROM read_parquet({location}) p "
        f"JOIN {_QUESTIONS} q USING (problem_id) ORDER BY p.prefix_steps IS NOT NULL LIMIT 20").fetchall()
    for prompt, question, step_level in rows:
        at = prompt.find(question) if question else -1
        while at >= 0:
            head, rest = prompt[:at], prompt[at + len(question):]
            if expected is None:
                if not step_level:
                    return head + QUESTION_SLOT + rest
            else:
                for end in range(len(rest) + 1):
                    if content_hash(head + QUESTION_SLOT + rest[:end]) == expected:
                        return head + QUESTION_SLOT + rest[:end]
            at = prompt.find(question, at + 1)
    return None


def _pairs_chat_split(con, root: Path, table_file: TableFile, problems: list[TableFile]) -> Split:
    """The pairs file's rows in TRL's conversational preference format (see the module docstring)."""
    location = sql_literal(str(root / table_file.path))
    unknown = con.execute(f"SELECT pair_id, problem_id FROM read_parquet({location}) "
                          f"WHERE problem_id NOT IN (SELECT problem_id FROM problems) LIMIT 1").fetchone()
    if unknown:
        raise ExportError(f"{table_file.path}: pair {unknown[0]} has problem {unknown[1]}, which is not in the "
                          "problems table: its question is unknown")
    steps = con.execute(f"SELECT count(*) FROM read_parquet({location}) WHERE prefix_steps IS NOT NULL").fetchone()[0]
    prefix = "''"
    if steps:
        template = _prompt_template(con, location, table_file)
        if template is None:
            raise ExportError(f"{table_file.path}: its step-level pairs end the prompt with their shared steps, but "
                              "the question prompt they were rendered with is unknown (no `prompt_format` in its "
                              "provenance that a prompt starts with); leave pairs_chat out (--tables)")
        rendered = f"replace({sql_literal(template)}, {sql_literal(QUESTION_SLOT)}, q.question)"
        bad = con.execute(f"SELECT p.pair_id FROM read_parquet({location}) p JOIN {_QUESTIONS} q "
                          f"USING (problem_id) WHERE p.prefix_steps IS NOT NULL AND NOT starts_with(p.prompt, "
                          f"{rendered}) LIMIT 1").fetchone()
        if bad:
            raise ExportError(f"{table_file.path}: pair {bad[0]}'s prompt does not start with its question rendered "
                              f"as the file's other prompts are ({template!r}): its shared steps cannot be cut out")
        prefix = f"CASE WHEN p.prefix_steps IS NULL THEN '' ELSE substr(p.prompt, length({rendered}) + 1) END"
    # open-ended: a search-tree step with more to come (train/dpo.py `open_ended`)
    query = f"""
        WITH rows AS (
            SELECT p.*, q.question, {prefix} AS prefix
            FROM read_parquet({location}, file_row_number = true) p JOIN {_QUESTIONS} q USING (problem_id)
        )
        SELECT pair_id, problem_id, iteration, recipe,
               [{{'role': 'user', 'content': question}}] AS prompt,
               [{{'role': 'assistant', 'content': prefix || chosen}}] AS chosen,
               [{{'role': 'assistant', 'content': prefix || rejected}}] AS rejected,
               question, prefix, prefix_steps, weight,
               chosen_node_id IS NOT NULL AND ends_with(chosen, chr(10)) AS chosen_open,
               rejected_node_id IS NOT NULL AND ends_with(rejected, chr(10)) AS rejected_open,
               chosen_sample_id, rejected_sample_id, chosen_node_id, rejected_node_id
        FROM rows ORDER BY file_row_number"""
    return Split("pairs_chat", _split_name(table_file), table_file, query=query,
                 inputs=[table_file.path, *(f.path for f in problems)])


def _messages(question: str, answer: str) -> str:
    return f"[{{'role': 'user', 'content': {question}}}, {{'role': 'assistant', 'content': {answer}}}]"


def _sft_chat_splits(con, root: Path, by_view: dict[str, list[TableFile]]) -> list[Split]:
    """`gold` from the problems, and one split per kept-samples file: its samples labelled correct."""
    problems = by_view["problems"]
    gold = Split("sft_chat", "gold", problems[0], inputs=[f.path for f in problems], query=f"""
        SELECT {_messages("question", "gold_rationale")} AS messages, question, problem_id,
               CAST(NULL AS VARCHAR) AS sample_id, CAST(NULL AS INTEGER) AS iteration,
               CAST(NULL AS VARCHAR) AS model_id
        FROM problems WHERE split = {sql_literal(GOLD_SPLIT)} AND gold_rationale IS NOT NULL""")
    splits = [gold]
    if "labels" not in by_view:  # nothing says which kept samples are correct
        return splits
    for table_file in by_view.get("kept", []):
        location = sql_literal(str(root / table_file.path))
        splits.append(Split("sft_chat", _split_name(table_file), table_file,
                            inputs=[table_file.path, *(f.path for f in problems + by_view["labels"])], query=f"""
            SELECT {_messages("q.question", "k.text")} AS messages, q.question, k.problem_id, k.sample_id,
                   CAST(k.iteration AS INTEGER) AS iteration, k.model_id
            FROM read_parquet({location}, file_row_number = true) k JOIN {_QUESTIONS} q USING (problem_id)
            WHERE k.sample_id IN (SELECT sample_id FROM labels WHERE correct)
            ORDER BY k.file_row_number"""))
    return splits


def _copy(con, root: Path, members: list[TableFile], split: Split, target: Path) -> int:
    """COPY the split's rows to `target`; the columns are the union over the table's files, so every split
    of a config has one schema (datasets reads the features from the first file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if split.query:
        return con.execute(f"COPY ({split.query}) TO {sql_literal(str(target))} (FORMAT parquet, COMPRESSION zstd)"
                           ).fetchone()[0]
    sources = ", ".join(sql_literal(str(root / m.path)) for m in members)
    conditions = [f"filename = {sql_literal(str(root / split.source.path))}"] + ([split.where] if split.where else [])
    return con.execute(
        f"COPY (SELECT * EXCLUDE (filename) FROM read_parquet([{sources}], union_by_name = true, filename = true) "
        f"WHERE {' AND '.join(conditions)}) TO {sql_literal(str(target))} (FORMAT parquet, COMPRESSION zstd)"
    ).fetchone()[0]


def _trace(root: Path, splits: list[Split], files: list[TableFile]) -> None:
    """Each split's models and dvc.lock record.

    A table computed without a model (labels, votes, pairs, dropped) gets the
    models of the generated rows it derives from: its inputs, found by the
    fingerprints its provenance records.
    """
    by_fingerprint = {file_fingerprint(root / f.path): f for f in files}
    outputs = dvc_lock_outputs(root)
    for split in splits:
        seen, todo, models = {split.source.path}, [split.source], set()
        while todo:
            provenance = todo.pop().provenance or {}
            if provenance.get("model_id"):
                models.add(provenance["model_id"])
                continue
            for fingerprint in provenance.get("inputs", {}).values():
                upstream = by_fingerprint.get(fingerprint)
                if upstream and upstream.path not in seen:
                    seen.add(upstream.path)
                    todo.append(upstream)
        split.models = sorted(models)
        split.traced = bool(models) and not (split.source.provenance or {}).get("model_id")
        split.dvc = _dvc_record(root, split.source.path, outputs)


def _dvc_record(root: Path, path: str, outputs: dict[str, dict]) -> dict | None:
    """dvc.lock's stage and md5 of a source file; for a file inside an output folder, its md5 from the folder's
    manifest in the DVC cache (when the cache holds it) and the folder's md5."""
    entry = dvc_lock_entry(path, outputs)
    if entry is None:
        return None
    record = {"stage": entry["stage"], "out": entry["out"], "md5": entry["md5"]}
    if entry["out"] != path:
        record["out_md5"], record["md5"] = entry["md5"], None
        manifest = root / ".dvc" / "cache" / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
        if manifest.is_file():
            relative = PurePosixPath(path).relative_to(entry["out"]).as_posix()
            record["md5"] = next((item["md5"] for item in json.loads(manifest.read_text())
                                  if item["relpath"] == relative), None)
    if record["md5"]:
        record["matches"] = hashlib.md5((root / path).read_bytes()).hexdigest() == record["md5"]
    return record


def _ancestry(root: Path) -> dict[str, dict]:
    """model_id -> its record and `ancestry`: its own folder first, then each parent's, back to the base."""
    records = {}
    for record in model_records(root):
        records.setdefault(record["model_id"], record)
    models = {}
    for model_id, record in records.items():
        chain, current = [], model_id
        while current and current not in chain:
            chain.append(current)
            current = (records.get(current) or {}).get("parent")
        models[model_id] = {"path": record["path"], "stage": record["stage"], "parent": record["parent"],
                            "code_version": record["code_version"], "params": json.loads(record["params"]),
                            "ancestry": chain}
    return models


def _describe_model(model_id: str, models: dict[str, dict]) -> str:
    record = models.get(model_id)
    if record is None:
        return f"`{model_id}`" + ("" if model_id.startswith("hub:") else " (not under models/)")
    return f"{record['path']} (`{model_id}`, {record['stage']})"


def _chain(model_id: str, models: dict[str, dict]) -> str:
    chain = models[model_id]["ancestry"] if model_id in models else [model_id]
    return " ← ".join(_describe_model(m, models) for m in chain)


def _load_params(root: Path) -> dict:
    from factory.params import read_yaml

    path = root / "params.yaml"
    return (read_yaml(path.read_text()) or {}) if path.is_file() else {}


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def public_remote(url: str | None) -> str | None:
    """A clone URL safe to publish: credentials removed; None for a local path (a machine path)."""
    if not url:
        return None
    if _SCP_REMOTE.match(url):
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http", "ssh", "git") or not parts.hostname:
        return None
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    if parts.scheme == "ssh" and parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _git_facts(root: Path) -> dict:
    revision = _git(root, "rev-parse", "HEAD")
    return {
        "revision": revision,
        "dirty": bool(_git(root, "status", "--porcelain")) if revision else None,
        "remote": public_remote(_git(root, "remote", "get-url", "origin")) if revision else None,
    }


# The README's main-job command: the pinned environment (requirements.lock), then the pipeline.
INSTALL_AND_REPRO = "pip install --require-hashes -r requirements.lock && pip install --no-deps -e . && dvc repro"


def _regenerate(git: dict) -> str:
    if not git["revision"]:
        return f"{INSTALL_AND_REPRO}  # in a copy of the project (it was not a git repository)"
    clone = git["remote"] or "<this repository>"
    return f"git clone {clone} factory && cd factory && git checkout {git['revision']} && {INSTALL_AND_REPRO}"


def _test_splits(params: dict) -> list[str]:
    return list((params.get("eval") or {}).get("splits") or DEFAULT_TEST_SPLITS)


def _decontamination(con, params: dict) -> dict:
    """How many problems outside the test splits share at least `max_ngram_overlap` of some test question's
    word n-grams (the thresholds of params `audit`, as audits/decontamination.sql uses them)."""
    audit = params.get("audit") or {}
    ngram, threshold = int(audit.get("ngram", 8)), float(audit.get("max_ngram_overlap", 0.8))
    test_splits = _test_splits(params)
    report = {"ngram": ngram, "min_overlap": threshold, "test_splits": test_splits}
    if "problems" not in views(con):
        return report | {"summary": "not computed: no problems table"}
    test_list = "[" + ", ".join(sql_literal(s) for s in test_splits) + "]"
    checked, contaminated, by_split = con.execute(f"""
        WITH grams AS (
            SELECT problem_id, split, list_contains({test_list}, split) AS is_test,
                   list_distinct(ngrams(question, {ngram})) AS g
            FROM problems
        ),
        test AS (SELECT problem_id, unnest(g) AS gram, len(g) AS total FROM grams WHERE is_test),
        train AS (SELECT problem_id, split, unnest(g) AS gram FROM grams WHERE NOT is_test),
        hits AS (
            SELECT DISTINCT train.problem_id, any_value(train.split) AS split
            FROM test JOIN train USING (gram)
            GROUP BY train.problem_id, test.problem_id
            HAVING count(*) / any_value(test.total) >= {threshold}
        )
        SELECT (SELECT count(*) FROM grams WHERE NOT is_test),
               (SELECT count(DISTINCT problem_id) FROM hits),
               (SELECT coalesce(map_from_entries(list((split, n))), MAP {{}})
                FROM (SELECT split, count(DISTINCT problem_id) AS n FROM hits GROUP BY split))
    """).fetchone()
    summary = (f"{contaminated:,} of {checked:,} problems outside the test splits ({', '.join(test_splits)}) share "
               f"at least {threshold:.0%} of a test question's word {ngram}-grams"
               + (f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(by_split.items()))})." if by_split else "."))
    return report | {"checked": checked, "contaminated": contaminated, "contaminated_by_split": dict(by_split),
                     "summary": summary}


def _license(sources: list[str], models: dict[str, dict]) -> tuple[str, str]:
    """MIT only when nothing third-party went in: the problems are factory's own synthetic `arith` task and
    every model was trained from scratch here ("tiny"); otherwise the sources' terms decide."""
    local_models = all(m["params"].get("base_model", "tiny") == "tiny" for m in models.values() if m["stage"] == "base")
    if sources == ["arith"] and local_models:
        return "mit", ("The problems are generated by factory's synthetic `arith` task and every text by models "
                       "trained from scratch on them, all by the MIT-licensed factory code.")
    return "other", (f"The problems come from {', '.join(sources) or 'unknown sources'}"
                     + ("" if local_models else " and the samples from a pretrained base model")
                     + ": their terms apply.")


def _lineage(splits: list[Split], empty: list[Split], models: dict[str, dict], params: dict, git: dict,
             decontamination: dict, con) -> dict:
    sources = ([row[0] for row in con.execute("SELECT DISTINCT source FROM problems ORDER BY 1").fetchall()]
               if "problems" in views(con) else [])
    license_id, license_reason = _license(sources, models)
    exported = {s.config for s in splits}
    used = {m for s in splits for model_id in s.models for m in (models.get(model_id) or {}).get("ancestry", [])}
    return {
        "exported_by": EXPORT_MARKER,
        "git": git,
        "regenerate": _regenerate(git),
        "recipe": params.get("recipe"),
        "params": {k: v for k, v in params.items() if k != "audit" and (k != "eval" or "eval" in exported)},
        "problem_sources": sources,
        "license": {"id": license_id, "reason": license_reason},
        "decontamination": decontamination,
        "splits": [{
            "config": s.config, "split": s.name, "path": s.path, "rows": s.rows, "source": s.source.path,
            "stage": (s.dvc or {}).get("stage") or (s.source.provenance or {}).get("stage"),
            "code_version": (s.source.provenance or {}).get("code_version"),
            "models": s.models, "models_traced_through_inputs": s.traced,
            "dvc_lock": s.dvc, "provenance": s.source.provenance,
            **({"derived_from": s.inputs} if s.query else {}),
        } for s in splits],
        "empty": [{"config": s.config, "split": s.name, "source": s.source.path} for s in empty],
        "models": {model_id: record for model_id, record in models.items() if model_id in used},
    }


def _scrub(text: str, root: Path) -> str:
    """Machine paths out: the project root becomes relative, the home folder '~'."""
    for path in {str(root.resolve()), str(root.absolute())}:
        text = text.replace(path + "/", "").replace(path, ".")
    home = str(Path.home())
    return text.replace(home, "~") if home != "/" else text


def _type_name(data_type) -> str:
    import pyarrow as pa

    return f"list<{data_type.value_type}>" if pa.types.is_list(data_type) else str(data_type)


def _columns(split: Split, folder: Path) -> str:
    """The table's declared columns and types (factory.schema), then any extra ones its files carry."""
    import pyarrow.parquet as pq

    from factory.schema import TABLES

    kind = None if split.query else (split.source.provenance or {}).get("table", split.config)
    declared = list(TABLES[kind]) if kind in TABLES else []
    names = {f.name for f in declared}
    extra = [f for f in pq.read_schema(folder / split.path) if f.name not in names]
    return ", ".join(f"`{f.name}` ({_type_name(f.type)})" for f in declared + extra)


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _card(splits: list[Split], models: dict[str, dict], lineage: dict, folder: Path) -> str:
    """README.md: the Hub's configs in the front matter, then what, how many, from where, and how to remake it."""
    configs: dict[str, list[Split]] = {}
    for split in splits:
        configs.setdefault(split.config, []).append(split)
    default = DEFAULT_CONFIG if DEFAULT_CONFIG in configs else next(iter(configs))
    others = [name for name in configs if name != default]
    front = {
        "license": lineage["license"]["id"],
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "reasoning", "preference", "dpo"],
        "configs": [{"config_name": name, **({"default": True} if name == default else {}),
                     "data_files": [{"split": s.name, "path": s.path} for s in members]}
                    for name, members in configs.items()],
    }
    iterations = sorted({s.source.iteration for s in splits if s.source.iteration is not None})
    sources = lineage["problem_sources"]
    problems = ("synthetic GSM8K-format arithmetic word problems (`arith`)" if sources == ["arith"]
                else "problems from " + (_and([f"`{s}`" for s in sources]) or "the project"))
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        "# factory reasoning data" + (f": recipe `{lineage['recipe']}`" if lineage["recipe"] else ""), "",
        f"Tables from one run of the factory pipeline (versioned DVC stages writing Parquet) on {problems}"
        + (f", iteration{'s' if len(iterations) > 1 else ''} {_and([str(i) for i in iterations])}" if iterations
           else "") + f": {_and([f'`{name}`' for name in configs])}, one config each. Every split names the stage, "
        "code version and model that made it (Lineage), and how to make it again.", "",
        "```python", "from datasets import load_dataset", "",
        f'{default} = load_dataset("<repo_id>")  # the default config',
        *([f'{others[0]} = load_dataset("<repo_id>", "{others[0]}")'
           + (f"  # or {', '.join(others[1:])}" if others[1:] else "")] if others else []),
        "```", "",
        *_chat_usage(configs),
        f"**License:** `{lineage['license']['id']}`. {lineage['license']['reason']}", "",
        "## Tables", "",
    ]
    for name, members in configs.items():
        lines += [f"### `{name}`" + (" (default)" if name == default else ""), "",
                  TABLE_DESCRIPTIONS.get(name, ""), "", f"Columns: {_columns(members[0], folder)}.", ""]
        if name == "problems":
            lines += ["| split | rows | what |", "|---|---:|---|"]
            lines += [f"| {s.name} | {s.rows:,} | {PROBLEM_SPLITS.get(s.name, '')} |" for s in members]
        else:
            lines += ["| split | rows |", "|---|---:|"] + [f"| {s.name} | {s.rows:,} |" for s in members]
        lines.append("")
    if lineage["empty"]:
        lines += ["Empty, so not exported: " + ", ".join(f"{e['config']}/{e['split']} ({e['source']})"
                                                         for e in lineage["empty"]) + ".", ""]
    lines += _lineage_section(splits, models, lineage)
    if lineage["params"]:
        lines += ["## Params", "", "<details><summary>The params.yaml sections that shaped these tables</summary>",
                  "", "```yaml", yaml.dump(lineage["params"], Dumper=_ParamsDumper, sort_keys=False).rstrip(),
                  "```", "", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def _chat_usage(configs: dict[str, list[Split]]) -> list[str]:
    """How the conversational configs train a model with its own chat template (TRL)."""
    lines = []
    if "pairs_chat" in configs:
        split = configs["pairs_chat"][-1].name
        lines += [f'pairs = load_dataset("<repo_id>", "pairs_chat", split="{split}")',
                  "DPOTrainer(model=model, args=DPOConfig(output_dir=\"dpo\"), train_dataset=pairs,",
                  "           processing_class=tokenizer).train()  # rendered with the tokenizer's chat template"]
    if "sft_chat" in configs:
        names = [s.name for s in configs["sft_chat"]]
        rounds = [n for n in names if n.endswith("_self_train")] or [n for n in names if n != "gold"]
        split = "+".join(["gold", rounds[-1]] if rounds and "gold" in names else names[:1])
        lines += [f'sft = load_dataset("<repo_id>", "sft_chat", split="{split}")',
                  "# the loss on the rationale only, as factory's SFT: prompt-completion",
                  'sft = sft.map(lambda r: {"prompt": r["messages"][:1], "completion": r["messages"][1:]}, '
                  'remove_columns=["messages"])',
                  "SFTTrainer(model=model, args=SFTConfig(output_dir=\"sft\"), train_dataset=sft,",
                  "           processing_class=tokenizer).train()"]
    if not lines:
        return []
    return ["To train a model with another chat template, `pairs_chat` and `sft_chat` hold the same data in TRL's "
            "conversational format (messages, not text rendered with the producing model's template):", "",
            "```python", "from datasets import load_dataset",
            "from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer", "", *lines, "```", ""]


class _ParamsDumper(yaml.SafeDumper):
    """Block mappings, flow lists: params.yaml's own look."""


_ParamsDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def _lineage_section(splits: list[Split], models: dict[str, dict], lineage: dict) -> list[str]:
    git = lineage["git"]
    revision = (f"`{git['revision']}`" + (", with uncommitted changes (dirty)" if git["dirty"] else "")
                if git["revision"] else "no git revision (the project was not a git repository)")
    lines = ["## Lineage", "",
             f"Made at git revision {revision}" + (f", recipe `{lineage['recipe']}`" if lineage["recipe"] else "")
             + ". Stage: the DVC stage that wrote the source file. Model: the model that generated the rows "
               "(*: for a computed table, the model of the samples it derives from). md5: the source file's, "
               "from dvc.lock.", "",
             "| split | stage | model | code version | source | dvc.lock md5 |",
             "|---|---|---|---|---|---|"]
    for split in splits:
        provenance = split.source.provenance or {}
        stage = (split.dvc or {}).get("stage") or provenance.get("stage", "—")
        model = ", ".join(f"`{m}`" + ("*" if split.traced else "") for m in split.models) or "—"
        lines.append(f"| {split.config}/{split.name} | {stage} | {model} | {provenance.get('code_version', '—')} | "
                     f"{split.source.path} | {_md5_cell(split.dvc)} |")
    used = sorted({m for s in splits for m in s.models}, key=lambda m: (models.get(m) or {}).get("path", m))
    if used:
        lines += ["", "The models, each with its ancestry (← parent):", ""]
        lines += [f"- {_chain(m, models)}" for m in used]
    lines += _versions_lines(splits)
    lines += ["", "### Reproduce", "", "```bash", lineage["regenerate"], "```", "",
              "`dvc repro` writes dvc.lock with the md5 of every file it makes: compare them with the table above "
              "(other hardware or library versions may change the bytes)."]
    if git["dirty"]:
        lines.append("\nThe run's workspace had uncommitted changes, so that revision's code may differ from the "
                     "code versions above.")
    differing = sorted({s.source.path for s in splits if (s.dvc or {}).get("matches") is False})
    if differing:
        lines.append(f"\n**Warning:** {_and(differing)} differ{'s' if len(differing) == 1 else ''} from "
                     "dvc.lock's record: not what that revision's pipeline wrote.")
    decontamination = lineage["decontamination"]
    lines += ["", "### Decontamination", "",
              decontamination.get("summary") or "\n".join(f"- {k}: {v}" for k, v in decontamination.items()), ""]
    return lines


def _versions_lines(splits: list[Split]) -> list[str]:
    """The library versions that wrote the source files (factory.lineage.library_versions), one line per set."""
    groups: dict[str, list[str]] = {}
    for split in splits:
        versions = (split.source.provenance or {}).get("versions")
        if versions:
            text = ", ".join(f"{name} {version or '—'}" for name, version in versions.items())
            groups.setdefault(text, []).append(f"{split.config}/{split.name}")
    if not groups:
        return []
    if len(groups) == 1:
        return ["", f"Library versions that wrote the source files: {next(iter(groups))}."]
    return ["", "Library versions that wrote the source files:", ""] + [
        f"- {_and(names)}: {text}" for text, names in groups.items()]


def _md5_cell(record: dict | None) -> str:
    if record is None:
        return "—"
    if record["md5"] is None:
        return f"in folder {record['out']} (`{record['out_md5']}`)"
    return f"`{record['md5']}`" + ("" if record.get("matches", True) else " (differs from the file)")

"""The export's conversational configs: a dataset made with one model trains a model with another chat template.

The project is test_export's, plus an iteration made by the real stages: samples decoded by the project's
decoder (a scripted model that writes each rationale and then its EOS), `factory label`, `factory filter` and
`factory pairs --recipe scdpo` with the tiny model's tokenizer (prompt "Question: ...\\nAnswer:\\n"), and a
second round of samples under self_train/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_decoding import ScriptedLM
from test_export import build_project

from factory.cli import main
from factory.export import ExportError, export_dataset
from factory.generators.decoding import DecodingConfig, generate
from factory.ids import content_hash
from factory.lineage import write_table
from factory.schema import from_rows

# ChatML, as SmolLM2 and Qwen write it (without their default system prompt).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY_MARKERS = ("Question:", "Answer:", "</s>")  # the producing model's template: its user turn and EOS
FIRST_ROUND = {  # (problem, sample index): rationale; p-2's gold answer is 7, p-3's 9
    ("p-2", 0): "Tom has 2 apples.\nHe finds 5 more, so 2+5=<<2+5=7>>7 apples.\n#### 7",
    ("p-2", 1): "Tom has 2 apples.\nHe finds 5 more, so 2+5=<<2+5=8>>8 apples.\n#### 8",  # wrong at step 1
    ("p-3", 0): "He has 3+6=<<3+6=9>>9 apples.\n#### 9",
    ("p-3", 1): "He has 3*6=<<3*6=18>>18 apples.\n#### 18",
}
SECOND_ROUND = {
    ("p-2", 2): "He had 2 apples and found 5: 2+5=<<2+5=7>>7.\n#### 7",
    ("p-4", 0): "He has 4+7=<<4+7=12>>12 apples.\n#### 12",  # gold 11
}


def decoded(tokenizer, scripts: list[str]) -> list[str]:
    """What the project's decoder records when a model writes each script and then EOS."""
    config = DecodingConfig(temperature=0.0, max_new_tokens=64, calculator=False)
    return [generate(ScriptedLM(tokenizer, [script]), tokenizer, ["Q"], [0], config, show_progress=False)[0].text
            for script in scripts]


def write_samples(path: Path, scripts: dict, tokenizer, problems: Path, stage: str) -> None:
    rows = [{"sample_id": f"s-3-{problem}-{index}", "problem_id": problem, "iteration": 3, "model_id": "m-iter2",
             "generator": "hf", "sample_index": index, "seed": 0, "temperature": 0.7, "top_p": 1.0,
             "max_new_tokens": 64, "calculator": False, "text": text, "n_tokens": 20, "finish_reason": "stop"}
            for (problem, index), text in zip(scripts, decoded(tokenizer, list(scripts.values())))]
    write_table(from_rows(rows, "samples"), path, kind="samples", stage=stage, inputs={"problems": problems},
                model_id="m-iter2")


def factory(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory, tiny_model_dir):
    """(project root, export folder, lineage, the tiny model's folder)."""
    model_dir, tokenizer = tiny_model_dir
    base = tmp_path_factory.mktemp("chat")
    root = build_project(base / "project")
    shutil.copytree(model_dir, root / "models/tiny")
    problems, data = root / "data/problems.parquet", root / "data/iter_3"
    params = base / "params.yaml"  # near-duplicates stay: the pairs rules need both sides
    params.write_text(yaml.safe_dump({"filter": {"dedup_threshold": 0.99}}))
    write_samples(data / "samples.parquet", FIRST_ROUND, tokenizer, problems, "sample")
    factory("label", data / "samples.parquet", "--problems", problems, "--out", data / "labels.parquet")
    factory("filter", data / "samples.parquet", "--labels", data / "labels.parquet", "--out", data / "kept.parquet",
            "--dropped", data / "dropped.parquet", "--params", params)
    factory("pairs", "--recipe", "scdpo", "--problems", problems, "--samples", data / "kept.parquet",
            "--labels", data / "labels.parquet", "--model", root / "models/tiny", "--iteration", 3,
            "--out", data / "pairs.parquet", "--params", params)
    work = data / "self_train"
    write_samples(work / "samples.parquet", SECOND_ROUND, tokenizer, problems, "train")
    factory("label", work / "samples.parquet", "--problems", problems, "--out", work / "labels.parquet")
    factory("filter", work / "samples.parquet", "--labels", work / "labels.parquet", "--out", work / "kept.parquet",
            "--dropped", work / "dropped.parquet", "--params", params)
    out = base / "hub"
    return root, out, export_dataset(out, root=root), root / "models/tiny"


def load(out: Path, config: str, split: str):
    import datasets

    return datasets.load_dataset(str(out), config, split=split, cache_dir=str(out.parent / "hf_cache"))


def chatml_tokenizer(model_dir: Path):
    """The tiny model's tokenizer with another model's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = CHATML
    return tokenizer


def trl_columns(row: dict) -> dict:
    return {key: row[key] for key in ("prompt", "chosen", "rejected")}


def test_pairs_chat_renders_in_another_models_chat_template(chat_export):
    from trl.data_utils import apply_chat_template, is_conversational

    root, out, _, model_dir = chat_export
    pairs = {r["pair_id"]: r for r in pq.read_table(root / "data/iter_3/pairs.parquet").to_pylist()}
    rows = load(out, "pairs_chat", "iter_3").to_list()
    assert sorted(r["pair_id"] for r in rows) == sorted(pairs) and len(rows) == 3
    assert sum(r["prefix_steps"] is not None for r in rows) == 1  # the calculator-located step pair
    tokenizer = chatml_tokenizer(model_dir)
    for row in rows:
        pair = pairs[row["pair_id"]]
        assert is_conversational(row)
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]
        assert row["question"] in pair["prompt"] and not any(m in row["question"] for m in TINY_MARKERS)
        assert pair["prompt"].endswith(row["prefix"]) and (row["prefix"] == "") == (row["prefix_steps"] is None)
        assert row["chosen"] == [{"role": "assistant", "content": row["prefix"] + pair["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": row["prefix"] + pair["rejected"]}]
        rendered = apply_chat_template(trl_columns(row), tokenizer)  # what TRL's DPOTrainer feeds the model
        assert rendered["prompt"] == f"<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n"
        assert rendered["chosen"] == row["prefix"] + pair["chosen"] + "<|im_end|>\n"
        assert rendered["rejected"] == row["prefix"] + pair["rejected"] + "<|im_end|>\n"
        whole = rendered["prompt"] + rendered["chosen"]
        assert whole.count("<|im_start|>assistant") == 1  # the shared steps and the rest: one assistant turn
        assert not any(marker in whole + rendered["rejected"] for marker in TINY_MARKERS)
    step = next(r for r in rows if r["prefix_steps"] is not None)
    assert step["prefix"] == "Tom has 2 apples.\n" and step["prefix_steps"] == 1
    assert "Tom has 2 apples.\nHe finds 5 more, so 2+5=<<2+5=7>>7 apples.\n#### 7<|im_end|>" in \
        apply_chat_template(trl_columns(step), tokenizer)["chosen"]


def test_pairs_chat_in_the_producing_template_is_the_pairs_text(chat_export):
    """Nothing is lost: rendered with the template that made them, the rows are the pairs' own sequences."""
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    root, out, _, model_dir = chat_export
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pairs = {r["pair_id"]: r for r in pq.read_table(root / "data/iter_3/pairs.parquet").to_pylist()}
    for row in load(out, "pairs_chat", "iter_3"):
        pair = pairs[row["pair_id"]]
        rendered = apply_chat_template(trl_columns(row), tokenizer)
        assert rendered["prompt"] + rendered["chosen"] == pair["prompt"] + pair["chosen"] + tokenizer.eos_token
        assert rendered["prompt"] + rendered["rejected"] == pair["prompt"] + pair["rejected"] + tokenizer.eos_token
        assert rendered["prompt"] + row["prefix"] == pair["prompt"]  # the pairs' prompt ends with the shared steps


def test_sft_chat_is_gold_and_the_correct_kept_samples(chat_export):
    root, out, _, _ = chat_export
    splits = {name: load(out, "sft_chat", name).to_list() for name in ("gold", "iter_3", "iter_3_self_train")}
    questions = {r["problem_id"]: r["question"] for r in pq.read_table(root / "data/problems.parquet").to_pylist()}
    assert [(r["problem_id"], r["sample_id"]) for r in splits["gold"]] == [("p-0", None), ("p-1", None)]
    assert [r["sample_id"] for r in splits["iter_3"]] == ["s-3-p-2-0", "s-3-p-3-0"]  # the wrong ones are left out
    assert [r["sample_id"] for r in splits["iter_3_self_train"]] == ["s-3-p-2-2"]
    texts = {**dict(zip([f"s-3-{p}-{i}" for p, i in FIRST_ROUND], FIRST_ROUND.values())),
             **dict(zip([f"s-3-{p}-{i}" for p, i in SECOND_ROUND], SECOND_ROUND.values()))}
    for row in (r for rows in splits.values() for r in rows):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": questions[row["problem_id"]]} and row["question"] == user["content"]
        assert assistant["role"] == "assistant" and not any(m in assistant["content"] for m in TINY_MARKERS)
        if row["sample_id"]:  # what the model wrote, without the EOS it ended with
            assert assistant["content"] == texts[row["sample_id"]] and row["model_id"] == "m-iter2"
    recipe_set = load(out, "sft_chat", "gold+iter_3_self_train")  # DPO-ST's SFT data of iteration 3
    assert recipe_set["sample_id"] == [None, None, "s-3-p-2-2"]


def test_card_and_lineage_describe_the_conversational_configs(chat_export):
    _, out, lineage, _ = chat_export
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    configs = {c["config_name"]: [f["split"] for f in c["data_files"]] for c in front["configs"]}
    assert configs["pairs_chat"] == configs["pairs"] == ["iter_1", "iter_2", "iter_3"]
    assert configs["sft_chat"] == ["gold", "iter_3", "iter_3_self_train"]
    assert [c["config_name"] for c in front["configs"] if c.get("default")] == ["pairs"]
    assert "### `pairs_chat`" in card and "### `sft_chat`" in card
    assert "`prompt` (list<struct<role: string, content: string>>)" in card and "`prefix` (string)" in card
    assert 'load_dataset("<repo_id>", "pairs_chat", split="iter_3")' in card
    assert 'load_dataset("<repo_id>", "sft_chat", split="gold+iter_3_self_train")' in card
    by_split = {(s["config"], s["split"]): s for s in lineage["splits"]}
    assert by_split["pairs_chat", "iter_3"]["derived_from"] == ["data/iter_3/pairs.parquet", "data/problems.parquet"]
    assert by_split["pairs_chat", "iter_3"]["models"] == by_split["pairs", "iter_3"]["models"]
    assert by_split["sft_chat", "iter_3_self_train"]["source"] == "data/iter_3/self_train/kept.parquet"
    assert "derived_from" not in by_split["pairs", "iter_3"]
    assert json.loads((out / "lineage.json").read_text()) == lineage


def write_pairs(root: Path, rows: list[dict], template: str | None) -> None:
    base = {"problem_id": "p-2", "iteration": 4, "recipe": "mcts_dpo", "weight": 1.0}
    params = {"prompt_format": content_hash(template)} if template else {}
    write_table(from_rows([base | r for r in rows], "pairs"), root / "data/iter_4/pairs.parquet", kind="pairs",
                stage="pairs", params=params)


def test_tree_step_pairs_keep_their_path_and_mark_open_ended_steps(tmp_path):
    """mcts_dpo: the prompt ends with the node's path, the sides are single steps, the open ones marked."""
    from train.dpo import open_ended

    root = build_project(tmp_path / "project", git=False)
    template = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"  # a ChatML model's prompt
    question = next(r["question"] for r in pq.read_table(root / "data/problems.parquet").to_pylist()
                    if r["problem_id"] == "p-2")
    rendered = template.replace("{question}", question)
    rows = [
        {"pair_id": "pair-root", "prompt": rendered, "chosen": "2+5=<<2+5=7>>7\n", "rejected": "2*5=<<2*5=10>>10\n",
         "prefix_steps": 0, "chosen_node_id": "n-1", "rejected_node_id": "n-2"},
        {"pair_id": "pair-deep", "prompt": rendered + "2+5=<<2+5=7>>7\n", "chosen": "#### 7", "rejected": "Then 1.\n",
         "prefix_steps": 1, "chosen_node_id": "n-3", "rejected_node_id": "n-4"},
    ]
    write_pairs(root, rows, template)
    export_dataset(tmp_path / "hub", root=root, tables=("pairs_chat",))
    exported = {r["pair_id"]: r for r in pq.read_table(tmp_path / "hub/pairs_chat/iter_4.parquet").to_pylist()}
    assert exported["pair-root"]["prefix"] == "" and exported["pair-deep"]["prefix"] == "2+5=<<2+5=7>>7\n"
    assert exported["pair-deep"]["rejected"] == [{"role": "assistant", "content": "2+5=<<2+5=7>>7\nThen 1.\n"}]
    for row in rows:
        for side in ("chosen", "rejected"):
            assert exported[row["pair_id"]][f"{side}_open"] == open_ended(row, side)
    assert [exported["pair-deep"][f"{s}_open"] for s in ("chosen", "rejected")] == [False, True]


def test_step_pairs_whose_prompt_cannot_be_cut_are_refused(tmp_path):
    root = build_project(tmp_path / "project", git=False)
    step = {"pair_id": "pair-s", "prompt": "Q: x\nstep\n", "chosen": "a", "rejected": "b", "prefix_steps": 1}
    write_pairs(root, [step], None)  # no prompt_format recorded, and the question is not in the prompt
    with pytest.raises(ExportError, match="iter_4/pairs.parquet: its step-level pairs .* leave pairs_chat out"):
        export_dataset(tmp_path / "hub", root=root, tables=("pairs_chat",))
    question = pq.read_table(root / "data/problems.parquet").column("question")[2].as_py()
    template = "Q: {question}\nA:\n"
    write_pairs(root, [step | {"prompt": f"Q: {question}\nA:\nstep\n"},
                       step | {"pair_id": "pair-t", "prompt": f"Q: {question}\nB:\nstep\n"}], template)
    with pytest.raises(ExportError, match="pair pair-t's prompt does not start with its question rendered"):
        export_dataset(tmp_path / "hub", root=root, tables=("pairs_chat",))
    export_dataset(tmp_path / "hub", root=root, tables=("pairs",))  # the pairs themselves still export


def pair_ids_with_prefix(out: Path) -> list[str]:
    return [r["pair_id"] for r in load(out, "pairs_chat", "iter_3") if r["prefix"]]


def test_trl_would_split_a_prompt_ending_with_an_assistant_message_into_two_turns(chat_export):
    """Why the shared steps open the assistant messages instead of ending the prompt (see factory/export.py)."""
    from trl.data_utils import apply_chat_template

    tokenizer = chatml_tokenizer(chat_export[3])
    in_prompt = {"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "step 1\n"}],
                 "chosen": [{"role": "assistant", "content": "good"}],
                 "rejected": [{"role": "assistant", "content": "bad"}]}
    rendered = apply_chat_template(in_prompt, tokenizer)
    assert rendered["chosen"].startswith("<|im_end|>\n<|im_start|>assistant\n")  # the turn closes after the steps
    # DPOTrainer tokenizes the prompt with add_generation_prompt: a second assistant turn opens after the steps
    assert tokenizer.apply_chat_template(in_prompt["prompt"], tokenize=False, add_generation_prompt=True).endswith(
        "step 1\n<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_one_dpo_step_on_pairs_chat_with_another_template(chat_export, tmp_path):
    """TRL's DPOTrainer takes the exported pairs as they are and trains the tiny model under ChatML."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from train.common import cpu_safe_settings

    _, out, _, model_dir = chat_export
    tokenizer = chatml_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=3, learning_rate=1e-3,
                     max_length=256, logging_steps=1, **cpu_safe_settings())
    trainer = DPOTrainer(model=model, args=args, train_dataset=load(out, "pairs_chat", "iter_3"),
                         processing_class=tokenizer)
    first = trainer.train_dataset[0]
    assert tokenizer.decode(first["prompt_ids"]).startswith("<|im_start|>user\nTom has")
    assert tokenizer.decode(first["chosen_ids"]).endswith("#### 7<|im_end|>\n")
    # The step pair's shared steps are the same tokens on both sides, so they cancel in DPO's margin.
    step = next(r for r in trainer.train_dataset if r["pair_id"] == pair_ids_with_prefix(out)[0])
    shared = tokenizer("Tom has 2 apples.\n", add_special_tokens=False)["input_ids"]
    assert step["chosen_ids"][:len(shared)] == step["rejected_ids"][:len(shared)] == shared
    assert step["chosen_ids"][len(shared):] != step["rejected_ids"][len(shared):]
    trainer.train()
    assert any(not p.detach().equal(before[name]) for name, p in model.named_parameters())
    assert trainer.state.log_history[0]["loss"] > 0

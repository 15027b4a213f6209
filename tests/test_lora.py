"""LoRA through peft: one optimizer step each of SFT, DPO and ORPO on SmolLM2-135M, and on the tiny model.

What must hold: the adapters train (the merged model differs from the start, in the adapted linear layers
only: embeddings and norms are untouched), the saved folder is a plain model (no peft modules, no adapter
files) that `load_model` reads like any other, its lineage records the LoRA settings, and DPO's reference
is the starting model (the base with its adapters off).
"""

import json

import pytest
import yaml

from factory.cli import main as cli
from factory.lineage import model_id, write_table
from factory.modeling import format_prompt, load_model
from factory.params import ParamsError, section
from factory.schema import from_rows
from train.common import LoRASettings
from train.dpo import DPOTrainConfig
from train.iteration import SelfTrainConfig
from train.orpo import ORPORunConfig
from train.sft import SFTRunConfig, WarmupConfig, train_sft

pytestmark = pytest.mark.slow

LORA = LoRASettings(enabled=True, r=4, alpha=8, dropout=0.0)
QUESTIONS = ["Mia has 5 marbles. She buys 7 more. How many marbles does Mia have?",
             "Tom has 3 boxes with 4 pens in each box. How many pens does Tom have?"]
RIGHT = ["Mia has 5+7=<<5+7=12>>12 marbles.\n#### 12", "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12"]
WRONG = ["Mia has 5*7=<<5*7=35>>35 marbles.\n#### 35", "Tom has 3+4=<<3+4=7>>7 pens.\n#### 7"]


def pair_rows(tokenizer) -> list[dict]:
    return [{"prompt": format_prompt(tokenizer, q), "chosen": c, "rejected": r, "pair_id": f"pair-{i}",
             "problem_id": f"p-{i}", "iteration": 1, "recipe": "dpo_st", "chosen_sample_id": None,
             "rejected_sample_id": f"s-{i}", "weight": 1.0} for i, (q, c, r) in enumerate(zip(QUESTIONS, RIGHT, WRONG))]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(folder, model, tokenizer): SmolLM2 loaded once, the start every test compares with."""
    model, tokenizer = load_model(smollm2_dir)
    return smollm2_dir, model, tokenizer


def assert_plain_lora_merged(before, out_dir) -> None:
    """`out_dir` is a plain model folder whose adapted linear weights, and only those, moved from `before`'s."""
    import torch

    assert not (out_dir / "adapter_config.json").exists() and (out_dir / "config.json").exists()
    after, _ = load_model(out_dir)
    assert type(after) is type(before)
    assert not [name for name, _ in after.named_modules() if "lora" in name.lower()]
    start, end = before.state_dict(), after.state_dict()
    assert sorted(end) == sorted(start)
    changed = {name for name in end if not torch.equal(end[name], start[name])}
    assert changed, "the LoRA step changed nothing"
    assert all(name.endswith("_proj.weight") for name in changed), sorted(changed)  # "all-linear" but the head
    assert any(".self_attn." in name for name in changed) and any(".mlp." in name for name in changed)


def test_lora_is_off_by_default_and_read_from_each_trainers_params():
    from pathlib import Path

    params = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    for name, cls in [("warmup", WarmupConfig), ("self_train", SelfTrainConfig), ("dpo", DPOTrainConfig),
                      ("orpo", ORPORunConfig)]:
        config = section(params, name, cls)
        assert config.lora == cls().lora == LoRASettings()  # params.yaml agrees with the dataclass default
        assert not config.lora.enabled and config.lora.peft_config() is None
    config = section({"dpo": {"lora": {"enabled": True, "r": 8, "target_modules": ["q_proj", "v_proj"]}}},
                     "dpo", DPOTrainConfig)
    assert config.lora == LoRASettings(enabled=True, r=8, target_modules=("q_proj", "v_proj"))
    peft = config.lora.peft_config()
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, sorted(peft.target_modules)) == (8, 32, 0.05,
                                                                                          ["q_proj", "v_proj"])
    assert LoRASettings(enabled=True).peft_config().target_modules == "all-linear"
    with pytest.raises(ParamsError, match="'lora'.*unknown key.*'rank'"):
        section({"dpo": {"lora": {"rank": 8}}}, "dpo", DPOTrainConfig)
    with pytest.raises(ParamsError, match="r >= 1"):
        section({"orpo": {"lora": {"r": 0}}}, "orpo", ORPORunConfig)


def test_sft_lora_step_on_smollm2_saves_a_merged_plain_model(smollm2, tmp_path):
    from factory.modeling import count_parameters

    smollm2_dir, start, _ = smollm2
    examples = [{"question": q, "rationale": r} for q, r in zip(QUESTIONS, RIGHT)]
    dev = [{"problem_id": "d-0", "question": QUESTIONS[0], "gold_answer": "12", "split": "dev"}]
    config = SFTRunConfig(learning_rate=1e-3, batch_size=2, warmup_steps=0, dev_max_new_tokens=1, lora=LORA)
    summary = train_sft(model_dir=smollm2_dir, examples=examples, dev=dev, out_dir=tmp_path / "sft", config=config,
                        max_steps=1, score_every_steps=1)
    assert summary["steps"] == 1 and summary["parameters"] == count_parameters(start)  # the base's, no adapters
    assert_plain_lora_merged(start, tmp_path / "sft")


def test_dpo_lora_step_on_smollm2_records_lora_in_its_lineage(smollm2, tmp_path):
    smollm2_dir, start, tokenizer = smollm2
    pairs_path = tmp_path / "pairs.parquet"
    write_table(from_rows(pair_rows(tokenizer), "pairs"), pairs_path, kind="pairs", stage="pairs")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dpo": {"epochs": 1, "batch_size": 2, "max_length": 64, "warmup_steps": 0,
                                              "learning_rate": 1e-3, "lora": {"enabled": True, "r": 4, "alpha": 8}}}))
    out = tmp_path / "dpo"
    assert cli(["dpo", "--pairs", str(pairs_path), "--model", str(smollm2_dir), "--out", str(out),
                "--params", str(params)]) == 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["model_id"] == model_id(out) != lineage["parent"] == model_id(smollm2_dir)
    assert lineage["params"]["dpo"]["lora"] == {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.05,
                                                "target_modules": "all-linear"}
    assert lineage["metrics"]["steps"] == 1
    # Step 1 is scored before its update: fresh adapters change nothing, so policy and reference agree.
    assert lineage["metrics"]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert_plain_lora_merged(start, out)


def test_orpo_lora_step_on_smollm2(smollm2, tmp_path):
    from train.orpo import main

    smollm2_dir, start, tokenizer = smollm2
    config = ORPORunConfig(learning_rate=1e-3, epochs=1, batch_size=2, max_length=64, warmup_steps=0, lora=LORA)
    summary = main(pairs=pair_rows(tokenizer), model_dir=smollm2_dir, out_dir=tmp_path / "orpo", config=config)
    assert summary["steps"] == 1 and summary["pairs"] == 2 and summary["config"]["lora"]["enabled"] is True
    assert_plain_lora_merged(start, tmp_path / "orpo")


def test_dpo_reference_under_lora_is_the_base_with_adapters_off(tiny_model_dir, tmp_path, monkeypatch):
    """Adapters that start non-zero make the starting policy differ from the base; the reference must be the base.

    With the adapters left on, the precomputed reference would equal the step-1 policy and every reward be 0.
    """
    import torch
    from peft import LoraConfig

    import train.dpo

    folder, tokenizer = tiny_model_dir
    references = []
    base, _ = load_model(folder)

    def random_adapters(self):
        return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear",
                          init_lora_weights=False)  # B random, not 0: the adapters change the model from the start

    trainer_class = train.dpo._weighted_dpo_trainer

    def recording_trainer():
        cls = trainer_class()

        class Recording(cls):
            def compute_ref_log_probs(self, model, inputs):
                ref = super().compute_ref_log_probs(model, inputs)
                with torch.no_grad():  # the same batch through the plain base model, outside the trainer
                    base_logps = self.completion_logps(base.to(inputs["input_ids"].device), inputs).chunk(2)
                references.append((ref, base_logps))
                return ref

        return Recording

    monkeypatch.setattr(LoRASettings, "peft_config", random_adapters)
    monkeypatch.setattr(train.dpo, "_weighted_dpo_trainer", recording_trainer)
    config = DPOTrainConfig(epochs=1, batch_size=2, max_length=64, warmup_steps=0, lora=LORA)
    summary = train.dpo.main(pairs=pair_rows(tokenizer), model_dir=folder, out_dir=tmp_path / "dpo", config=config)
    assert summary["steps"] == 1 and len(references) == 1
    (ref_chosen, ref_rejected), (base_chosen, base_rejected) = references[0]
    assert torch.allclose(ref_chosen, base_chosen, atol=1e-5) and torch.allclose(ref_rejected, base_rejected, atol=1e-5)
    step = next(e for e in summary["log_history"] if "rewards/chosen" in e)
    assert abs(step["rewards/chosen"]) > 1e-4  # the policy (adapters on) is not its reference
    assert_plain_lora_merged(base, tmp_path / "dpo")


def test_sft_lora_on_the_tiny_model_keeps_the_best_adapters(tiny_model_dir, tmp_path):
    """Dev scoring at every step snapshots only the adapters and restores the best before merging."""
    folder, _ = tiny_model_dir
    start, _ = load_model(folder)
    examples = [{"question": q, "rationale": r} for q, r in zip(QUESTIONS, RIGHT)]
    dev = [{"problem_id": "d-0", "question": QUESTIONS[0], "gold_answer": "12", "split": "dev"}]
    config = SFTRunConfig(learning_rate=1e-2, batch_size=2, warmup_steps=0, dev_max_new_tokens=4, lora=LORA)
    summary = train_sft(model_dir=folder, examples=examples, dev=dev, out_dir=tmp_path / "sft", config=config,
                        max_steps=2, score_every_steps=1)
    assert summary["steps"] == 2 and [h["step"] for h in summary["curve"]] == [1, 2]
    assert_plain_lora_merged(start, tmp_path / "sft")

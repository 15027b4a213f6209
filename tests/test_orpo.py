"""ORPO smoke tests: a real TRL ORPOTrainer run on a tiny model and hand-made pairs."""

import math

import pytest

from factory.modeling import format_prompt, load_model
from train.orpo import ORPORunConfig, _orpo_trainer, main

pytestmark = pytest.mark.slow

# Large steps so 2 epochs on 8 pairs move a random model measurably; the defaults are for real runs.
FAST = ORPORunConfig(learning_rate=3e-3, epochs=2, batch_size=4, warmup_steps=0, max_length=128)


def question(a: int) -> str:
    return f"Mia has {a} marbles. She buys 7 more. How many marbles does Mia have?"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def pairs(base):
    _, tokenizer = base
    return [
        {
            "pair_id": f"pair-{a}",
            "weight": 1.0,
            "prompt": format_prompt(tokenizer, question(a)),
            "chosen": f"Mia has {a}+7=<<{a}+7={a + 7}>>{a + 7} marbles.\n#### {a + 7}",
            "rejected": f"Mia has {a}*7=<<{a}*7={a * 7}>>{a * 7} marbles.\n#### {a * 7}",
        }
        for a in range(2, 10)
    ]


def completion_logps(model, tokenizer, prompt: str, completion: str) -> list[float]:
    """Per-token log-probs of `completion` + EOS after `prompt` (the tokens ORPO trains)."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt ends on a token boundary
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, V): position t predicts token t+1
    logps = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].tolist()


def mean_margin(model_dir, pairs) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) under the model in `model_dir`."""
    model, tokenizer = load_model(model_dir)
    margins = [sum(completion_logps(model, tokenizer, p["prompt"], p["chosen"]))
               - sum(completion_logps(model, tokenizer, p["prompt"], p["rejected"])) for p in pairs]
    return sum(margins) / len(margins)


def test_orpo_trains_and_prefers_chosen(base, pairs, tmp_path):
    import torch

    folder, tokenizer = base
    too_long = {**pairs[0], "prompt": format_prompt(tokenizer, question(3) * 12)}  # > 128 tokens: no completion left
    summary = main(pairs=[*pairs, too_long], model_dir=folder, out_dir=tmp_path / "orpo", config=FAST)
    assert summary["pairs"] == 8 and summary["pairs_dropped"] == 1 and summary["steps"] == 4
    assert math.isfinite(summary["train_loss"]) and summary["config"]["beta"] == 0.1
    for key in ("reward_accuracy", "reward_margin", "log_odds_ratio", "log_odds_chosen", "nll_loss"):
        assert summary[key] is not None and math.isfinite(summary[key]), key

    before, _ = load_model(folder)
    after, _ = load_model(tmp_path / "orpo")  # the saved model loads
    unchanged = [name for name, p in after.named_parameters() if torch.equal(p, before.state_dict()[name])]
    assert unchanged == []
    # What ORPO must do: raise the chosen completions' log-prob over the rejected ones'.
    start, end = mean_margin(folder, pairs), mean_margin(tmp_path / "orpo", pairs)
    assert end > start + 1.0, (start, end)


def test_explicit_prompts_are_used_verbatim_and_the_nll_is_on_the_completion_only(base, pairs, tmp_path):
    import torch
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from train.common import cpu_safe_settings

    folder, _ = base
    model, tokenizer = load_model(folder)
    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_length=128,
                      remove_unused_columns=False, **cpu_safe_settings())
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs[:3]])
    trainer = _orpo_trainer()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)

    # Tokenization: no chat template applied, no special token but the EOS after each completion, and the
    # labels mask exactly the prompt's tokens.
    row, p = trainer.train_dataset[0], pairs[0]
    prompt_ids = tokenizer(p["prompt"])["input_ids"]
    assert row["prompt_input_ids"] == prompt_ids
    assert row["chosen_input_ids"] == tokenizer(p["prompt"] + p["chosen"])["input_ids"] + [tokenizer.eos_token_id]
    assert row["chosen_labels"] == [-100] * len(prompt_ids) + row["chosen_input_ids"][len(prompt_ids):]

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        chosen_logps, rejected_logps, _, _, nll = trainer.concatenated_forward(model, batch)
        _, _, _, _, trl_nll = ORPOTrainer.concatenated_forward(trainer, model, batch)
    per_token = [completion_logps(model, tokenizer, q["prompt"], q[side]) for side in ("chosen", "rejected")
                 for q in pairs[:3]]
    chosen_tokens = [t for tokens in per_token[:3] for t in tokens]
    assert nll.item() == pytest.approx(-sum(chosen_tokens) / len(chosen_tokens), abs=1e-4)
    assert abs(trl_nll.item() - nll.item()) > 1e-3  # TRL's own term also covers the prompt
    # The odds-ratio term's log-probs are per-token means over each completion.
    means = [sum(tokens) / len(tokens) for tokens in per_token]
    assert torch.cat([chosen_logps, rejected_logps]).tolist() == pytest.approx(means, abs=1e-4)


def test_empty_pairs_are_refused(base, pairs, tmp_path):
    with pytest.raises(ValueError, match="ORPO needs preference pairs; got none"):
        main(pairs=[], model_dir=base[0], out_dir=tmp_path / "orpo", config=FAST)
    with pytest.raises(ValueError, match="prompt of max_length 8 tokens or more"):
        main(pairs=pairs, model_dir=base[0], out_dir=tmp_path / "orpo",
             config=ORPORunConfig(max_length=8))
    assert not (tmp_path / "orpo").exists()


@pytest.mark.parametrize("field, value", [("beta", -0.1), ("learning_rate", 0.0), ("epochs", 0), ("batch_size", 0),
                                          ("max_length", 1), ("warmup_steps", -1)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match="orpo"):
        ORPORunConfig(**{field: value})

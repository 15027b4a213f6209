"""DPO smoke tests: a real TRL run on a tiny model and 8 hand-made pairs, library and CLI."""

import json
import math

import pytest

from factory.cli import main as cli
from factory.lineage import model_id, write_table
from factory.modeling import TinyModelConfig, build_tiny_model, format_prompt, load_model, train_tokenizer
from factory.schema import from_rows
from train.dpo import DPOTrainConfig, main, weighted_dpo_nll_loss

pytestmark = pytest.mark.slow

TINY = TinyModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
# Large steps so 2 epochs on 8 pairs move a random model measurably; the defaults are for real runs.
FAST = DPOTrainConfig(learning_rate=3e-3, epochs=2, batch_size=4, warmup_steps=0)


def question(a: int) -> str:
    return f"Mia has {a} marbles. She buys 7 more. How many marbles does Mia have?"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved, untrained tiny model (folder) and its tokenizer."""
    texts = [f"{question(a)}\nMia has {a}+7=<<{a}+7={a + 7}>>{a + 7} marbles.\n#### {a + 7}" for a in range(20)]
    tokenizer = train_tokenizer(texts, TINY.vocab_size)
    folder = tmp_path_factory.mktemp("base")
    build_tiny_model(tokenizer, TINY).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def pairs(base):
    _, tokenizer = base
    return [
        {
            "prompt": format_prompt(tokenizer, question(a)),
            "chosen": f"Mia has {a}+7=<<{a}+7={a + 7}>>{a + 7} marbles.\n#### {a + 7}",
            "rejected": f"Mia has {a}*7=<<{a}*7={a * 7}>>{a * 7} marbles.\n#### {a * 7}",
        }
        for a in range(2, 10)
    ]


def completion_logps(model, tokenizer, prompt: str, completion: str) -> float:
    """Summed log-prob of `completion` (+ EOS, as TRL trains it) after `prompt`."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt ends on a token boundary
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, V): position t predicts token t+1
    logps = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].sum().item()


def mean_margin(model_dir, pairs) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) under the model in `model_dir`."""
    model, tokenizer = load_model(model_dir)
    margins = [completion_logps(model, tokenizer, p["prompt"], p["chosen"])
               - completion_logps(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)


def test_dpo_trains_every_parameter_and_prefers_chosen(base, pairs, tmp_path):
    import torch

    folder, _ = base
    summary = main(pairs=pairs, model_dir=folder, out_dir=tmp_path / "dpo", config=FAST)
    assert [e["loss"] for e in summary["log_history"] if "loss" in e]
    assert summary["train_loss"] is not None and summary["pairs"] == 8 and summary["steps"] == 4
    assert summary["reward_accuracy"] is not None and summary["config"]["beta"] == 0.1

    before, _ = load_model(folder)
    after, _ = load_model(tmp_path / "dpo")  # the saved model loads
    unchanged = [name for name, p in after.named_parameters() if torch.equal(p, before.state_dict()[name])]
    assert unchanged == []
    # What DPO must do: raise the chosen completions' log-prob over the rejected ones'.
    start, end = mean_margin(folder, pairs), mean_margin(tmp_path / "dpo", pairs)
    assert end > start + 1.0, (start, end)


def test_weighted_loss_matches_a_hand_computation():
    import torch

    # Two pairs: log-probs summed over completions of 2 and 3 tokens, weights 1 and 0.5, beta 0.5, alpha 1.
    args = [torch.tensor(v) for v in ([-4.0, -6.0], [-5.0, -3.0], [-4.5, -6.0], [-4.5, -3.5], [2.0, 3.0], [1.0, 0.5])]
    # Pair 1: margin (−4+4.5) − (−5+4.5) = 1, DPO loss log(1+e^−0.5); NLL/|c| = 4/2.
    # Pair 2: margin (−6+6) − (−3+3.5) = −0.5, DPO loss log(1+e^0.25); NLL/|c| = 6/3.
    by_hand = (1.0 * (math.log(1 + math.exp(-0.5)) + 2.0) + 0.5 * (math.log(1 + math.exp(0.25)) + 2.0)) / 1.5
    assert weighted_dpo_nll_loss(*args, beta=0.5, alpha=1.0).item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(2.591364, abs=1e-6)
    # alpha 0 leaves the weighted DPO loss alone.
    dpo_only = (math.log(1 + math.exp(-0.5)) + 0.5 * math.log(1 + math.exp(0.25))) / 1.5
    assert weighted_dpo_nll_loss(*args, beta=0.5, alpha=0.0).item() == pytest.approx(dpo_only, rel=1e-6)


def test_zero_weights_give_zero_loss_and_no_gradient():
    import torch

    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    loss = weighted_dpo_nll_loss(chosen, torch.tensor([-5.0, -3.0]), torch.tensor([-4.5, -6.0]),
                                 torch.tensor([-4.5, -3.5]), torch.tensor([2.0, 3.0]), torch.zeros(2),
                                 beta=0.1, alpha=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(chosen.grad, torch.zeros(2))


def test_pair_weights_reach_the_trainer(base, pairs, tmp_path):
    """Pairs that all weigh 0 leave every parameter as it was: the weights are in the loss TRL optimises."""
    import torch

    folder, _ = base
    summary = main(pairs=[{**p, "weight": 0.0} for p in pairs], model_dir=folder, out_dir=tmp_path / "dpo",
                   config=FAST)
    assert summary["steps"] == 4
    before, _ = load_model(folder)
    after, _ = load_model(tmp_path / "dpo")
    assert all(torch.equal(p, before.state_dict()[name]) for name, p in after.named_parameters())
    with pytest.raises(ValueError, match="negative weight"):
        main(pairs=[{**p, "pair_id": "pair-x", "weight": -1.0} for p in pairs], model_dir=folder,
             out_dir=tmp_path / "bad", config=FAST)


def test_reference_log_probs_are_computed_once_before_training(base, pairs, tmp_path, monkeypatch):
    """One no-grad pass over the pairs before the first step; the epochs reuse it (no reference forward after)."""
    import torch

    import train.dpo

    forwards = []  # True for a training forward, False for a reference (no-grad) one
    load = train.dpo.load_model

    def load_and_count(path):
        model, tokenizer = load(path)
        model.register_forward_pre_hook(lambda module, args: forwards.append(torch.is_grad_enabled()))
        return model, tokenizer

    monkeypatch.setattr(train.dpo, "load_model", load_and_count)
    main(pairs=pairs, model_dir=base[0], out_dir=tmp_path / "dpo", config=FAST)  # 8 pairs, batches of 4, 2 epochs
    assert forwards == [False] * 2 + [True] * 4


def test_completion_log_probs_match_trl_fused_head_and_unpadded_scoring(base, pairs):
    """The CPU path (log_softmax over the logits) scores what TRL's fused LM head scores, padding aside."""
    from types import SimpleNamespace

    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from train.dpo import _weighted_dpo_trainer

    folder, _ = base
    model, tokenizer = load_model(folder)
    add_fused_lm_head(model)
    examples = []
    for p in pairs[:3]:
        prompt_ids = tokenizer(p["prompt"])["input_ids"]
        completion = {side: tokenizer(p["prompt"] + p[side] + tokenizer.eos_token)["input_ids"][len(prompt_ids):]
                      for side in ("chosen", "rejected")}
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": completion["chosen"],
                         "rejected_ids": completion["rejected"]})
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    score = _weighted_dpo_trainer().completion_logps
    with torch.no_grad():
        plain = score(SimpleNamespace(fused_lm_head=False), model, batch)
        fused = score(SimpleNamespace(fused_lm_head=True), model, batch)
    one_by_one = [completion_logps(model, tokenizer, p["prompt"], p[side])
                  for side in ("chosen", "rejected") for p in pairs[:3]]
    assert torch.allclose(plain, fused, atol=1e-4)
    assert plain.tolist() == pytest.approx(one_by_one, abs=1e-4)


def test_empty_pairs_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="needs preference pairs; got none"):
        main(pairs=[], model_dir=base[0], out_dir=tmp_path / "dpo", config=FAST)


def test_cli_dpo_writes_lineage_with_the_base_model_as_parent(base, pairs, tmp_path, capsys):
    folder, _ = base
    rows = [{**p, "pair_id": f"pair-{i}", "problem_id": f"p-{i}", "iteration": 1, "recipe": "dpo_st",
             "chosen_sample_id": None, "rejected_sample_id": f"s-{i}", "weight": 1.0} for i, p in enumerate(pairs)]
    pairs_path = tmp_path / "pairs.parquet"
    write_table(from_rows(rows, "pairs"), pairs_path, kind="pairs", stage="pairs")
    params = tmp_path / "params.yaml"
    params.write_text("dpo:\n  epochs: 1\n  batch_size: 8\n  warmup_steps: 0\n")
    out = tmp_path / "iter_1_dpo"
    assert cli(["dpo", "--pairs", str(pairs_path), "--model", str(folder), "--out", str(out),
                "--params", str(params)]) == 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["parent"] == model_id(folder)
    assert lineage["model_id"] == model_id(out) != lineage["parent"]
    assert lineage["params"]["dpo"]["epochs"] == 1 and lineage["metrics"]["pairs"] == 8
    assert list(lineage["data"]) == ["pairs"]
    assert f"{out}: model {lineage['model_id']}" in capsys.readouterr().out


def _plain_logps(model, tokenizer, prompt: str, completion: str) -> float:
    """Summed log-prob of `completion` alone (no EOS) after `prompt`."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logps = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :].sum().item()


def test_open_ended_tree_steps_are_scored_without_the_appended_eos(base, pairs):
    """A tree-search step with more to come (mcts_dpo) must not teach EOS: its appended EOS leaves the mask."""
    from types import SimpleNamespace

    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from train.dpo import _weighted_dpo_trainer, drop_appended_eos, open_ended

    folder, _ = base
    model, tokenizer = load_model(folder)
    steps = [{"prompt": p["prompt"], "chosen": p["chosen"].split("\n")[0] + "\n",
              "rejected": p["rejected"].split("\n")[0] + "\n", "chosen_node_id": "n-c", "rejected_node_id": "n-r"}
             for p in pairs[:3]]
    assert all(open_ended(s, "chosen") and open_ended(s, "rejected") for s in steps)
    assert not open_ended(pairs[0], "chosen")  # a whole rationale, and no tree node: EOS stays
    examples = []
    for s in steps:
        prompt_ids = tokenizer(s["prompt"])["input_ids"]
        examples.append({side + "_ids": tokenizer(s["prompt"] + s[side] + tokenizer.eos_token)["input_ids"][
            len(prompt_ids):] for side in ("chosen", "rejected")} | {"prompt_ids": prompt_ids})
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    drop_appended_eos(batch, list(range(6)), tokenizer.eos_token_id)
    with torch.no_grad():
        scored = _weighted_dpo_trainer().completion_logps(SimpleNamespace(fused_lm_head=False), model, batch)
    expected = [_plain_logps(model, tokenizer, s["prompt"], s[side]) for side in ("chosen", "rejected") for s in steps]
    assert scored.tolist() == pytest.approx(expected, abs=1e-4)


def test_the_trainer_drops_eos_only_for_open_ended_sides(base, pairs, tmp_path, monkeypatch):
    import train.dpo

    calls = []
    drop = train.dpo.drop_appended_eos
    monkeypatch.setattr(train.dpo, "drop_appended_eos", lambda batch, rows, eos: (calls.append(rows),
                                                                                   drop(batch, rows, eos)))
    mixed = [dict(p, chosen=p["chosen"].split("\n")[0] + "\n", chosen_node_id="n-c", rejected_node_id="n-r")
             if i % 2 else p for i, p in enumerate(pairs)]
    main(pairs=mixed, model_dir=base[0], out_dir=tmp_path / "dpo", config=FAST)
    # The reference pass (2 batches, in order) and the policy's 4 (shuffled): only chosen rows (0-3) lose their
    # EOS, 4 open-ended chosen sides per pass over the data.
    assert calls[:2] == [[1, 3], [1, 3]]
    assert all(row < 4 for rows in calls for row in rows) and sum(map(len, calls)) == 4 * 3

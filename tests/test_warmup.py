"""Warm-up SFT smoke test: a real TRL run on a tiny model and a handful of arith problems."""

import pytest

from factory.lineage import model_id
from factory.modeling import TinyModelConfig, load_model
from factory.problems.arith import ArithConfig, generate_problems
from train.sft import WarmupConfig, main

pytestmark = pytest.mark.slow

TINY = TinyModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       max_length=384)


@pytest.fixture(scope="module")
def problems():
    sizes = {"train": 48, "dev": 16, "answers": 8, "unlabeled": 8, "test": 8, "test_ood": 8}
    return generate_problems(ArithConfig(seed=3, sizes=sizes))


def test_warmup_trains_saves_and_reports_a_curve(problems, tmp_path):
    config = WarmupConfig(max_epochs=2, patience=5, batch_size=16, warmup_steps=2, dev_max_new_tokens=24)
    summary = main(problems=problems, out_dir=tmp_path / "iter_0", config=config, tiny=TINY)
    assert [h["epoch"] for h in summary["curve"]] == [1, 2]
    assert all(h["train_loss"] is not None for h in summary["curve"])
    assert 0.0 <= summary["dev_accuracy"] <= 1.0 and summary["train_problems"] == 48
    model, tokenizer = load_model(tmp_path / "iter_0")
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    assert model_id(tmp_path / "iter_0").startswith("m-")


def test_warmup_changes_the_weights_and_is_deterministic(problems, tmp_path):
    import torch

    from factory.modeling import build_tiny_model, train_tokenizer
    from train.sft import _tiny_tokenizer_texts

    config = WarmupConfig(max_epochs=1, batch_size=16, warmup_steps=2, dev_max_new_tokens=8)
    initial = build_tiny_model(train_tokenizer(_tiny_tokenizer_texts(problems), TINY.vocab_size), TINY)
    for run in ("a", "b"):
        main(problems=problems, out_dir=tmp_path / run, config=config, tiny=TINY)
    trained, _ = load_model(tmp_path / "a")
    changed = [name for name, p in trained.named_parameters()
               if not torch.equal(p, initial.state_dict()[name])]
    assert len(changed) == len(list(trained.parameters()))
    # Same params and seed, same bytes: DVC's cache can hit.
    assert model_id(tmp_path / "a") == model_id(tmp_path / "b")


def test_warmup_needs_train_and_dev(problems, tmp_path):
    with pytest.raises(ValueError, match="split 'train' with gold_rationale"):
        main(problems=[p for p in problems if p["split"] != "train"], out_dir=tmp_path / "m",
             config=WarmupConfig(), tiny=TINY)
    with pytest.raises(ValueError, match="split 'dev'"):
        main(problems=[p for p in problems if p["split"] != "dev"], out_dir=tmp_path / "m",
             config=WarmupConfig(), tiny=TINY)

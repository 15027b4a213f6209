"""Warm-up SFT smoke test: a real TRL run on a tiny model and a handful of arith problems."""

import dataclasses

import pytest

from factory.lineage import model_id
from factory.modeling import TinyModelConfig, format_prompt, load_model
from factory.problems.arith import ArithConfig, generate_problems
from train.sft import (
    SFTRunConfig,
    WarmupConfig,
    _tiny_tokenizer_texts,
    build_base,
    dev_problems,
    gold_examples,
    main,
    train_sft,
)
from train.pretrain import PretrainConfig, check_disjoint, corpus

pytestmark = pytest.mark.slow

TINY = TinyModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       max_length=384)


@pytest.fixture(scope="module")
def problems():
    sizes = {"train": 48, "dev": 16, "answers": 8, "unlabeled": 8, "test": 8, "test_ood": 8}
    return generate_problems(ArithConfig(seed=3, sizes=sizes))


@pytest.fixture(scope="module")
def base(problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    build_base(problems=problems, base_model="tiny", tiny=TINY, out_dir=out)
    return out


def test_warmup_trains_saves_and_reports_a_curve(problems, base, tmp_path):
    config = WarmupConfig(max_epochs=2, patience=5, batch_size=16, warmup_steps=2, dev_max_new_tokens=24)
    summary = main(problems=problems, base_dir=base, out_dir=tmp_path / "iter_0", config=config)
    assert [(h["epoch"], h["step"]) for h in summary["curve"]] == [(1, 3), (2, 6)]
    assert all(h["train_loss"] is not None for h in summary["curve"])
    assert 0.0 <= summary["dev_accuracy"] <= 1.0 and summary["train_problems"] == 48 and summary["steps"] == 6
    model, tokenizer = load_model(tmp_path / "iter_0")
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    assert model_id(tmp_path / "iter_0").startswith("m-")


def test_warmup_changes_the_weights_and_is_deterministic(problems, base, tmp_path):
    import torch

    config = WarmupConfig(max_epochs=1, batch_size=16, warmup_steps=2, dev_max_new_tokens=8)
    initial, _ = load_model(base)
    for run in ("a", "b"):
        main(problems=problems, base_dir=base, out_dir=tmp_path / run, config=config)
    trained, _ = load_model(tmp_path / "a")
    changed = [name for name, p in trained.named_parameters()
               if not torch.equal(p, initial.state_dict()[name])]
    assert len(changed) == len(list(trained.parameters()))
    # Same params and seed, same bytes: DVC's cache can hit.
    assert model_id(tmp_path / "a") == model_id(tmp_path / "b")


def test_base_is_deterministic_and_its_tokenizer_never_sees_dev_or_test(problems, base, tmp_path):
    build_base(problems=problems, base_model="tiny", tiny=TINY, out_dir=tmp_path / "again")
    assert model_id(tmp_path / "again") == model_id(base)
    texts = _tiny_tokenizer_texts(problems)
    held_out = [p["question"] for p in problems if p["split"] in ("dev", "test", "test_ood")]
    assert not set(held_out) & set(texts)


def test_fixed_step_sft_scores_every_k_steps_and_keeps_the_best(problems, base, tmp_path):
    examples = gold_examples(problems)
    summary = train_sft(model_dir=base, examples=examples, dev=dev_problems(problems, "dev"),
                        out_dir=tmp_path / "m", config=SFTRunConfig(batch_size=16, warmup_steps=0,
                                                                   dev_max_new_tokens=8),
                        max_steps=5, score_every_steps=2)
    assert [h["step"] for h in summary["curve"]] == [2, 4, 5] and summary["steps"] == 5
    best = max(summary["curve"], key=lambda h: h["dev_accuracy"])
    assert summary["best_step"] == best["step"]


def test_warmup_needs_train_and_dev(problems, base, tmp_path):
    with pytest.raises(ValueError, match="split 'train' with gold_rationale"):
        main(problems=[p for p in problems if p["split"] != "train"], base_dir=base, out_dir=tmp_path / "m",
             config=WarmupConfig())
    with pytest.raises(ValueError, match="split 'dev'"):
        main(problems=[p for p in problems if p["split"] != "dev"], base_dir=base, out_dir=tmp_path / "m",
             config=WarmupConfig())


def test_saved_model_does_not_record_how_its_tokenizer_was_loaded(base, tmp_path):
    """HF_HUB_OFFLINE=1 loads set `local_files_only`; saved, it would change the model_id with the environment."""
    import json

    from train.common import save_model_atomically

    ids = []
    for offline in (True, False):
        model, tokenizer = load_model(base)
        tokenizer.init_kwargs["local_files_only"] = offline
        out = save_model_atomically(model, tokenizer, tmp_path / str(offline))
        assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
        ids.append(model_id(out))
    assert ids[0] == ids[1]


PRETRAIN = PretrainConfig(steps=4, problems=16, arithmetic=4, batch_size=4, warmup_steps=0)


def test_pretraining_corpus_is_seeded_and_disjoint_from_the_task(problems, base):
    _, tokenizer = load_model(base)
    task = {p["question"] for p in problems}
    documents = corpus(PRETRAIN, tokenizer, task)
    assert documents == corpus(PRETRAIN, tokenizer, task) and len(documents) == 20
    assert not any(question in document for question in task for document in documents)
    chats = [d for d in documents if "####" in d]
    assert len(chats) == 16 and all(d.startswith(format_prompt(tokenizer, "")[:5]) for d in chats)
    assert corpus(dataclasses.replace(PRETRAIN, seed=1), tokenizer, task) != documents
    with pytest.raises(ValueError, match=r"pretrain.families shares \['shop'\] with problems.arith.families"):
        check_disjoint(PRETRAIN, ("collect", "shop"))
    check_disjoint(PRETRAIN, ("collect",))


def test_bad_pretrain_params_name_the_file_section_and_key():
    from factory.params import ParamsError, section

    for values, message in (({"families": ["shop", "shoe"]}, r"key 'families': unknown \['shoe'\]; choose from"),
                            ({"families": []}, "key 'families': unknown empty list"),
                            ({"min_steps": 3, "max_steps": 2}, "keys 'min_steps', 'max_steps': need 1 <= min_steps "
                                                               "<= max_steps <= 8, got 3, 2"),
                            ({"min_steps": 0}, "keys .min_steps., .max_steps.: need 1 <= min_steps"),
                            ({"max_distractors": -1}, "key 'max_distractors': must be >= 0")):
        with pytest.raises(ParamsError, match=r"^my/params.yaml: section 'pretrain'[:,] " + message):
            section({"pretrain": values}, "pretrain", PretrainConfig, path="my/params.yaml")


def test_pretrained_base_is_trained_deterministic_and_recorded(problems, base, tmp_path):
    summaries = [build_base(problems=problems, base_model="tiny", tiny=TINY, out_dir=tmp_path / name,
                            pretraining=PRETRAIN, task_families=("collect",)) for name in ("a", "b")]
    assert summaries[0] == summaries[1] and summaries[0]["pretrain_steps"] == 4
    assert summaries[0]["pretrain_documents"] == 20 and summaries[0]["pretrain_final_loss"] is not None
    assert model_id(tmp_path / "a") == model_id(tmp_path / "b") != model_id(base)
    assert not list(tmp_path.glob(".*checkpoints*"))  # cleaned up after itself
    random_weights = build_base(problems=problems, base_model="tiny", tiny=TINY, out_dir=tmp_path / "c",
                                pretraining=dataclasses.replace(PRETRAIN, steps=0), task_families=("shop",))
    assert "pretrain_steps" not in random_weights  # no corpus, so its families cannot clash with the task's

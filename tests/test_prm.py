"""Process reward model: step-end positions, a real training run on a learnable toy signal, batched scoring."""

import doctest
import random

import pytest

import train.prm
from factory.modeling import format_prompt, load_model
from train.prm import (PRMConfig, encode, heldout_problems, load_prm, path_reward, score_steps, step_text,
                       train_prm)

pytestmark = pytest.mark.slow

# Large steps so a few dozen updates move a random tiny model; the defaults are for real runs.
FAST = PRMConfig(max_steps=40, learning_rate=3e-3, batch_size=8, warmup_steps=0, max_length=256,
                 heldout_fraction=0.0)


def toy_examples(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """Samples of 2-3 steps; a step is bad exactly when it holds the wrong annotation <<2+2=5>>."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a = rng.randint(2, 20)
        steps = [f"Mia has {a} marbles."]
        for _ in range(rng.randint(1, 2)):
            steps.append(rng.choice(["Then 2+2=<<2+2=4>>4 more.", "Then 2+2=<<2+2=5>>5 more."]))
        labels = ["=5>>" not in s for s in steps]
        examples.append({"prompt": format_prompt(tokenizer, f"Mia has {a} marbles. How many?"), "steps": steps,
                         "labels": labels, "scores": [0.9 if good else 0.1 for good in labels]})
    return examples


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    folder, tokenizer = base
    out = tmp_path_factory.mktemp("prm") / "prm"
    examples = toy_examples(tokenizer, 48)
    return out, examples, train_prm(examples=examples, model_dir=folder, out_dir=out, config=FAST)


def test_doctests():
    assert doctest.testmod(train.prm).failed == 0


def test_labels_sit_on_the_token_that_ends_each_step(base):
    _, tokenizer = base
    prompt = format_prompt(tokenizer, "Ann had 20 coins.")
    steps = ["She kept 20-5=<<20-5=15>>15 coins.", "Then 15+2=<<15+2=17>>17 coins."]
    ids, positions = encode(tokenizer, prompt, steps)
    text, ends = step_text(prompt, steps)
    assert text == prompt + steps[0] + "\n" + steps[1] + "\n" and [text[e] for e in ends] == ["\n", "\n"]
    assert tokenizer.decode(ids) == text
    assert [tokenizer.decode(ids[p]) for p in positions] == ["\n", "\n"]
    assert positions[1] == len(ids) - 1
    # What precedes each labelled token is the step itself, and nothing of the next step.
    assert tokenizer.decode(ids[: positions[0] + 1]) == prompt + steps[0] + "\n"
    # Truncation drops the steps that end beyond max_length.
    _, cut = encode(tokenizer, prompt, steps, max_length=positions[1])
    assert cut == [positions[0], -1]


def test_step_ends_are_found_when_the_newline_merges_with_other_characters():
    """A BPE without pre-tokenization learns tokens like '.\\nThen': the label goes on the token holding the newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    texts = [f"Q\nMia has {a} marbles.\nThen she buys {b}.\nThen she has {a + b}.\n" for a in range(10)
             for b in range(10)]
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=290, special_tokens=["<pad>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    prompt, steps = "Q\n", ["Mia has 3 marbles.", "Then she buys 2.", "Then she has 5."]
    ids, positions = encode(tokenizer, prompt, steps)
    pieces = [tokenizer.decode(ids[p]) for p in positions]
    # ' marbles.\nThen she buys ', '.\nThen she has ', '.\n': the newline merged on both sides.
    assert pieces[0].startswith(" marbles.\nThen") and pieces[1].startswith(".\nThen"), pieces
    assert all("\n" in piece for piece in pieces) and positions[-1] == len(ids) - 1, pieces


def test_training_learns_which_steps_are_bad(trained):
    out, examples, summary = trained
    assert summary["examples"] == summary["examples_trained"] == 48
    assert summary["steps"] == sum(len(e["steps"]) for e in examples)
    positives = sum(sum(e["labels"]) for e in examples)
    assert summary["positive_share"] == round(positives / summary["steps"], 4)
    assert summary["steps_truncated"] == 0 and summary["config"]["head"] == "classification"
    assert summary["train_loss_end"] < summary["train_loss_start"] / 2, summary
    assert summary["train_accuracy_end"] >= 0.95 > summary["train_accuracy_start"], summary


def test_scores_one_per_step_and_separates_good_from_bad(trained, tmp_path):
    out, _, _ = trained
    held_out = toy_examples(load_prm(out)[1], 12, seed=1)
    scores = score_steps(out, [e["prompt"] for e in held_out], [e["steps"] for e in held_out], batch_size=5)
    assert [len(s) for s in scores] == [len(e["steps"]) for e in held_out]
    assert all(0.0 <= x <= 1.0 for row in scores for x in row)
    good = [x for e, row in zip(held_out, scores) for x, y in zip(row, e["labels"]) if y]
    bad = [x for e, row in zip(held_out, scores) for x, y in zip(row, e["labels"]) if not y]
    assert bad and min(good) > 0.5 > max(bad), (good, bad)
    assert score_steps(out, ["Q\n"], [[]]) == [[]]  # a sample with no steps has no scores


def test_scores_do_not_depend_on_batching_or_padding_side(trained):
    out, examples, _ = trained
    model, tokenizer = load_prm(out)
    short = examples[0]
    longer = [{"prompt": e["prompt"] + "Think twice about it. " * k, "steps": e["steps"] * 2}
              for k, e in enumerate(examples[1:4], start=1)]
    alone = score_steps((model, tokenizer), [short["prompt"]], [short["steps"]])[0]
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = score_steps((model, tokenizer), [e["prompt"] for e in longer] + [short["prompt"]],
                            [e["steps"] for e in longer] + [short["steps"]])
        assert batch[-1] == pytest.approx(alone, abs=1e-5)
        assert [len(s) for s in batch[:-1]] == [len(e["steps"]) for e in longer]


def test_regression_head_is_deterministic_and_scores_by_sigmoid(base, tmp_path):
    import torch

    folder, tokenizer = base
    examples = toy_examples(tokenizer, 8)
    config = PRMConfig(max_steps=3, learning_rate=3e-3, batch_size=4, warmup_steps=1, head="regression",
                       aggregate="min")
    first = train_prm(examples=examples, model_dir=folder, out_dir=tmp_path / "a", config=config)
    second = train_prm(examples=examples, model_dir=folder, out_dir=tmp_path / "b", config=config)
    assert {k: v for k, v in first.items() if k != "seconds_per_step"} == \
           {k: v for k, v in second.items() if k != "seconds_per_step"}
    a, b = load_prm(tmp_path / "a")[0], load_prm(tmp_path / "b")[0]
    assert a.config.num_labels == 1 and a.config.prm == {"head": "regression", "aggregate": "min", "max_length": 512}
    assert all(torch.equal(p, b.state_dict()[name]) for name, p in a.state_dict().items())
    scores = score_steps(tmp_path / "a", [examples[0]["prompt"]], [examples[0]["steps"]])[0]
    assert len(scores) == len(examples[0]["steps"]) and all(0.0 < x < 1.0 for x in scores)


def test_the_head_is_new_and_the_backbone_loads(base, trained):
    import torch

    folder, _ = base
    out, _, _ = trained
    fresh, _ = load_prm(folder, num_labels=2)
    causal, _ = load_model(folder)
    backbone = {k: v for k, v in causal.state_dict().items() if k.startswith("model.")}
    assert backbone and all(torch.equal(fresh.state_dict()[k], v) for k, v in backbone.items())
    with pytest.raises(ValueError, match="already has a token-classification head"):
        load_prm(out, num_labels=2)


def test_path_reward():
    assert path_reward([0.25, 0.75], "mean") == 0.5
    assert path_reward([0.25, 0.75], "min") == 0.25
    with pytest.raises(ValueError, match="aggregate must be one of"):
        path_reward([0.5], "product")


@pytest.mark.parametrize("field, value, message", [
    ("max_steps", 0, "prm.max_steps must be >= 1"),
    ("learning_rate", 0.0, "prm.learning_rate must be > 0"),
    ("batch_size", 0, "prm.batch_size must be >= 1"),
    ("max_length", 1, "prm.max_length must be >= 2"),
    ("warmup_steps", -1, "prm.warmup_steps must be >= 0"),
    ("head", "ranking", "prm.head must be one of"),
    ("aggregate", "max", "prm.aggregate must be one of"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        PRMConfig(**{field: value})


def test_bad_examples_are_refused(base, tmp_path):
    folder, tokenizer = base
    good = toy_examples(tokenizer, 1)[0]
    cases = [([], "needs labelled samples"),
             ([{**good, "labels": good["labels"][:-1]}], "steps but"),
             ([{**good, "scores": [1.5] * len(good["steps"])}], r"must lie in \[0, 1\]"),
             ([{**good, "steps": ["a\nb"] + good["steps"][1:]}], "one non-empty line")]
    for examples, message in cases:
        with pytest.raises(ValueError, match=message):
            train_prm(examples=examples, model_dir=folder, out_dir=tmp_path / "x", config=FAST)


@pytest.mark.parametrize("field, value, message", [
    ("heldout_fraction", 1.0, r"prm.heldout_fraction must be in \[0, 1\)"),
    ("eval_every", 0, "prm.eval_every must be >= 1"),
    ("patience", -1, "prm.patience must be >= 0"),
])
def test_early_stopping_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        PRMConfig(**{field: value})


def test_the_held_out_split_is_by_problem_and_deterministic_in_the_seed():
    examples = [{"problem_id": f"p-{i % 10}"} for i in range(40)]  # four samples of each of ten problems
    held = heldout_problems(examples, 0.2, seed=0)
    assert len(held) == 2 and held == heldout_problems(list(reversed(examples)), 0.2, seed=0)
    assert heldout_problems(examples, 0.2, seed=1) != held or heldout_problems(examples, 0.2, seed=2) != held
    assert heldout_problems(examples, 0.0, seed=0) == set()
    assert len(heldout_problems([{"problem_id": "p"}] * 3, 0.9, seed=0)) == 0  # one problem: it trains


def test_early_stopping_keeps_the_weights_of_the_lowest_held_out_loss(base, tmp_path):
    """Held-out problems whose labels contradict the training ones: the held-out loss rises as the PRM learns."""
    folder, tokenizer = base
    examples = [{**e, "problem_id": f"p-{i % 12}"} for i, e in enumerate(toy_examples(tokenizer, 48))]
    config = PRMConfig(max_steps=60, learning_rate=3e-3, batch_size=8, warmup_steps=0, max_length=256,
                       heldout_fraction=0.25, eval_every=5, patience=2)
    held = heldout_problems(examples, config.heldout_fraction, config.seed)
    flipped = [{**e, "labels": [not y for y in e["labels"]]} if e["problem_id"] in held else e for e in examples]
    summary = train_prm(examples=flipped, model_dir=folder, out_dir=tmp_path / "prm", config=config)
    assert len(held) == 3 and summary["heldout_examples"] == 12 and summary["examples_trained"] == 36
    curve = summary["curve"]
    assert [point["step"] for point in curve] == list(range(5, summary["stopped_at_step"] + 1, 5))
    lowest = min(curve, key=lambda point: point["heldout_loss"])
    assert summary["best_step"] == lowest["step"] and summary["heldout_loss"] == lowest["heldout_loss"]
    assert summary["stopped_at_step"] == summary["best_step"] + 2 * 5 < config.max_steps, summary
    assert summary["optimizer_steps"] == summary["stopped_at_step"]
    assert summary["heldout_accuracy"] < summary["heldout_majority_baseline"] < 1.0, summary
    # The saved model is the kept one: its held-out accuracy, measured again from disk, is the reported one.
    heldout = [e for e in flipped if e["problem_id"] in held]
    scores = score_steps(tmp_path / "prm", [e["prompt"] for e in heldout], [e["steps"] for e in heldout])
    right = [(x > 0.5) == y for e, row in zip(heldout, scores) for x, y in zip(row, e["labels"])]
    assert round(sum(right) / len(right), 4) == summary["heldout_accuracy"]

"""Step-level generation: the decoder's per-step temperature, SCDPO negatives, MC rollouts and their scores."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from factory.generators.decoding import (
    DecodingConfig,
    StepTemperature,
    _filtered_logits,
    counter_uniform,
    generate,
    token_texts,
)
from factory.generators.continuations import (
    StepsConfig,
    choose_rollout_samples,
    label_rows,
    mc_rollouts,
    prefix_text,
    step_controlled_negatives,
)
from factory.labelers.gold import gold_labels
from factory.labelers.process import error_drop_rate, rollout_scores
from factory.modeling import format_prompt
from factory.schema import from_rows
from factory.reasoning_steps import split_steps

BIAS, SEED = 4.0, 1  # a newline bias and a seed with which the tiny model writes several lines
QUESTION = "Ann had 20 coins and gave away 5. Then she found 2. How many coins?"
PARENT_TEXT = "She kept 20-5=<<20-5=15>>15 coins.\nThen 15+2=<<15+2=17>>17 coins.\nShe has 17.\n#### 17"


class NewlineBiased(torch.nn.Module):
    """The real tiny model with `bias` added to the logits of tokens holding a newline (so it writes lines).

    With `record` (a one-row batch), logs each call's last input token and the logits it returns.
    """

    def __init__(self, model, tokenizer, bias: float, record: bool = False):
        super().__init__()
        self.inner = model
        pieces = token_texts(tokenizer)
        self.newline = torch.tensor(["\n" in piece for piece in pieces]
                                    + [False] * (model.config.vocab_size - len(pieces)))
        self.bias, self.record, self.log = bias, record, []

    config = property(lambda self: self.inner.config)
    device = property(lambda self: self.inner.device)
    generation_config = property(lambda self: self.inner.generation_config)

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[..., self.newline] += self.bias
        if self.record:
            self.log.append((kwargs["input_ids"][:, -1].clone(), out.logits[:, -1, :].clone()))
        return out


def problem(gold: str, problem_id: str = "p-ann") -> dict:
    return {"problem_id": problem_id, "question": QUESTION, "gold_answer": gold, "split": "answers"}


def sample(sample_id: str, text: str = PARENT_TEXT, problem_id: str = "p-ann") -> dict:
    return {"sample_id": sample_id, "problem_id": problem_id, "iteration": 1, "model_id": "m-test",
            "generator": "hf", "sample_index": 0, "seed": 0, "temperature": 0.7, "top_p": 1.0,
            "max_new_tokens": 64, "calculator": True, "text": text, "n_tokens": 20, "finish_reason": "stop"}


# ---------------------------------------------------------------- the decoder's schedule


def test_step_temperature_schedule():
    schedule = StepTemperature(1.1, 0.1, 1.4)
    assert [schedule.at(i) for i in range(6)] == [1.1, 1.2, 1.3, 1.4, 1.4, 1.4]
    assert StepTemperature(0.5, 0.0, 0.5).at(10) == 0.5
    with pytest.raises(ValueError, match="max"):
        StepTemperature(1.2, 0.1, 1.0)


def test_each_step_is_sampled_at_its_scheduled_temperature(tiny_model):
    """Replays the decode by hand: token s = argmax(logits_s / T(lines completed) + noise(seed, s))."""
    model, tokenizer = tiny_model
    biased = NewlineBiased(model, tokenizer, bias=BIAS, record=True)
    schedule = StepTemperature(1.0, 1.0, 3.0)
    config = DecodingConfig(temperature=1.0, max_new_tokens=48, calculator=False)
    prompt = format_prompt(tokenizer, QUESTION)
    [completion] = generate(biased, tokenizer, [prompt], [SEED], config, show_progress=False,
                            step_temperature=schedule)
    fed = [int(token) for token, _ in biased.log[1:]]  # the token chosen at step s is fed at call s+1
    pieces = token_texts(tokenizer)
    written, used = "", []
    for step, (_, logits) in enumerate(biased.log):
        completed = len(split_steps(written.rsplit("\n", 1)[0])) if "\n" in written else 0
        temperature = schedule.at(completed)
        used.append(temperature)
        noise = -torch.log(-torch.log(counter_uniform(torch.tensor([SEED]), step, logits.shape[-1])))
        token = int((_filtered_logits(logits, config, torch.tensor([temperature])) + noise.float()).argmax(-1))
        if step < len(fed):
            assert token == fed[step], f"step {step}"
        written += pieces[token]
    assert len(biased.log) == completion.n_tokens
    assert len(set(used)) >= 3, "the test needs a row that writes several lines"


def test_a_constant_schedule_is_plain_sampling_and_a_rising_one_changes_later_steps(tiny_model):
    model, tokenizer = tiny_model
    biased = NewlineBiased(model, tokenizer, bias=BIAS)
    prompts = [format_prompt(tokenizer, q) for q in ["Mia has 12 marbles.", "Tom has 3 boxes.", QUESTION]] * 2
    seeds = list(range(6))
    config = DecodingConfig(temperature=1.1, max_new_tokens=40, batch_size=4)
    plain = generate(biased, tokenizer, prompts, seeds, config, show_progress=False)
    constant = generate(biased, tokenizer, prompts, seeds, config, show_progress=False,
                        step_temperature=StepTemperature(1.1, 0.0, 1.1))
    rising = generate(biased, tokenizer, prompts, seeds, config, show_progress=False,
                      step_temperature=StepTemperature(1.1, 1.0, 4.0))
    assert constant == plain
    for a, b in zip(plain, rising):  # step 0 is at 1.1 in both: the same first line, from the same noise
        assert a.text.split("\n")[0] == b.text.split("\n")[0]
    assert [a.text for a in plain] != [b.text for b in rising]


# ---------------------------------------------------------------- prefixes


@pytest.mark.parametrize("text", [
    PARENT_TEXT,
    "  a = 1\n\n\nb <<1+1=2>>2\n   \nc\n#### 2\n",
    "one line only",
    "x\r\ny\n#### 3 apples\nz",
])
def test_prefix_text_keeps_exactly_the_first_j_steps(text):
    steps = split_steps(text)
    for j in range(len(steps) + 1):
        prefix = prefix_text(text, j)
        assert text.startswith(prefix.rstrip("\n"))
        assert split_steps(prefix) == steps[:j]
        for more in ("", "garbage", "\n\nnew <<2*3=6>>6\n#### 6", "#### 9"):
            assert split_steps(prefix + more)[:j] == steps[:j]
    with pytest.raises(ValueError):
        prefix_text(text, len(steps) + 1)


def test_config_names_the_bad_field():
    StepsConfig()
    for field, value in [("cut", "all"), ("aggregate", "max"), ("attempts", 0), ("rollouts", 0),
                         ("temperature_max", 1.0), ("delimiter", ""), ("good_threshold", 1.0)]:
        with pytest.raises(ValueError, match=f"steps.{field}"):
            StepsConfig(**{field: value})


# ---------------------------------------------------------------- SCDPO negatives


def negatives(tiny_model, gold, **overrides):
    model, tokenizer = tiny_model
    parents = [sample("s-b"), sample("s-a"), sample("s-c", "one step only\n#### 17"), sample("s-d")]
    labels = [{"sample_id": "s-a", "correct": True}, {"sample_id": "s-b", "correct": True},
              {"sample_id": "s-c", "correct": True}, {"sample_id": "s-d", "correct": False}]
    settings = dict(max_new_tokens=12, batch_size=16, seed=3) | overrides
    config = StepsConfig(**settings)
    rows = step_controlled_negatives(model, tokenizer, [problem(gold)], parents, labels, config,
                                     model_id="m-test", iteration=2, show_progress=False)
    return rows, config, {p["sample_id"]: p for p in parents}


def test_negatives_keep_the_parents_first_steps_and_record_parent_cut_and_temperatures(tiny_model):
    rows, config, parents = negatives(tiny_model, "999999", cut="each", attempts=2, negatives_per_problem=9)
    from_rows(rows, "samples")  # valid rows
    # Parents: the correct ones with more than min_prefix_steps steps (s-c has one step, s-d is wrong).
    assert {r["parent_sample_id"] for r in rows} == {"s-a", "s-b"}
    # Every cut j in [1, n_steps-1] of each parent; all wrong at once, so one attempt each.
    assert sorted((r["parent_sample_id"], r["prefix_steps"], r["sample_index"]) for r in rows) == [
        ("s-a", 1, 0), ("s-a", 2, 0), ("s-b", 1, 0), ("s-b", 2, 0)]
    schedule = config.schedule()
    for row in rows:
        parent, j = parents[row["parent_sample_id"]], row["prefix_steps"]
        assert row["text"].startswith(prefix_text(parent["text"], j))
        assert split_steps(row["text"])[:j] == split_steps(parent["text"])[:j]
        generated = len(split_steps(row["text"])) - j
        assert row["step_temperatures"] == [schedule.at(i) for i in range(generated)]
        assert (row["generator"], row["temperature"], row["iteration"], row["model_id"]) == (
            "step_controlled", 1.1, 2, "m-test")
        assert row["n_tokens"] <= 12 and row["finish_reason"] in {"stop", "length"}
    assert len({r["sample_id"] for r in rows}) == len(rows)


def test_negatives_are_deterministic_and_keyed_by_their_request(tiny_model):
    first, _, _ = negatives(tiny_model, "17", attempts=3)
    again, _, _ = negatives(tiny_model, "17", attempts=3)
    assert first == again
    reseeded, _, _ = negatives(tiny_model, "17", attempts=3, seed=4)
    assert {r["sample_id"] for r in reseeded}.isdisjoint(r["sample_id"] for r in first)


def test_a_wrong_continuation_ends_its_retries_and_enough_negatives_end_the_problem(tiny_model):
    # Gold 999999: every continuation is wrong, so each parent (cut: random) gets exactly one attempt.
    rows, _, _ = negatives(tiny_model, "999999", cut="random", attempts=4, negatives_per_problem=5)
    assert sorted((r["parent_sample_id"], r["sample_index"]) for r in rows) == [("s-a", 0), ("s-b", 0)]
    assert all(r["prefix_steps"] in (1, 2) for r in rows)
    # One negative is enough for the problem: the first round already made two, nothing more is tried.
    rows, _, _ = negatives(tiny_model, "999999", cut="each", attempts=4, negatives_per_problem=1)
    assert len(rows) == 4 and {r["sample_index"] for r in rows} == {0}
    # parents_per_problem picks the first parents by sample_id.
    rows, _, _ = negatives(tiny_model, "999999", cut="each", parents_per_problem=1)
    assert {r["parent_sample_id"] for r in rows} == {"s-a"}


def test_correct_continuations_are_retried_until_a_wrong_one(tiny_model):
    # Two new tokens after a prefix ending "...17 coins.": often the answer is still 17 (correct), so retried.
    rows, config, _ = negatives(tiny_model, "17", cut="each", attempts=4, negatives_per_problem=9,
                                max_new_tokens=2)
    correct = gold_labels([r["text"] for r in rows], ["17"] * len(rows))["correct"]
    by_unit: dict[tuple, list] = {}
    for row, ok in zip(rows, correct):
        by_unit.setdefault((row["parent_sample_id"], row["prefix_steps"]), []).append((row["sample_index"], ok))
    assert len(by_unit) == 4
    for attempts in by_unit.values():
        assert [index for index, _ in attempts] == list(range(len(attempts)))  # rounds in order, none skipped
        assert all(ok for _, ok in attempts[:-1])  # retried only after a correct continuation
        assert attempts[-1][1] is False or len(attempts) == config.attempts
    assert any(len(attempts) > 1 for attempts in by_unit.values()), "no unit was retried"


# ---------------------------------------------------------------- MC rollouts


def test_rollouts_from_every_proper_prefix(tiny_model):
    model, tokenizer = tiny_model
    samples = [sample("s-a"), sample("s-b", "a <<2+3=5>>5\nb\n#### 5"), sample("s-c", "one\n#### 1"),
               sample("s-x", problem_id="p-nogold")]
    labels = [{"sample_id": "s-a", "correct": True}, {"sample_id": "s-b", "correct": False},
              {"sample_id": "s-c", "correct": False}, {"sample_id": "s-x", "correct": None}]
    problems = [problem("17"), {"problem_id": "p-nogold", "question": QUESTION, "gold_answer": None}]
    config = StepsConfig(rollouts=3, rollout_samples=0, max_new_tokens=8, batch_size=32)
    rows = mc_rollouts(model, tokenizer, problems, samples, labels, config, model_id="m-test", iteration=1,
                       show_progress=False)
    from_rows(rows, "samples")
    # (n_steps - 1) prefixes x M rollouts: s-a 2x3, s-b 1x3, s-c none; s-x has no gold.
    counts = Counter((r["parent_sample_id"], r["prefix_steps"]) for r in rows)
    assert counts == {("s-a", 1): 3, ("s-a", 2): 3, ("s-b", 1): 3}
    parents = {s["sample_id"]: s for s in samples}
    for row in rows:
        assert row["text"].startswith(prefix_text(parents[row["parent_sample_id"]]["text"], row["prefix_steps"]))
        assert (row["generator"], row["temperature"], row["step_temperatures"]) == ("rollout", 0.7, None)
    assert len({r["sample_id"] for r in rows}) == len(rows)
    again = mc_rollouts(model, tokenizer, problems, samples, labels, config, model_id="m-test", iteration=1,
                        show_progress=False)
    assert again == rows
    labelled = label_rows(rows, problems)
    assert [label["sample_id"] for label in labelled] == [r["sample_id"] for r in rows]
    assert all(label["correct"] is not None for label in labelled)


def test_rollout_budget_is_round_robin_over_problems():
    samples = [sample(f"s-{p}{i}", problem_id=f"p-{p}") for p in "ab" for i in range(3)]
    labels = [{"sample_id": s["sample_id"], "correct": True} for s in samples]
    chosen = choose_rollout_samples(samples, labels, StepsConfig(rollout_samples=3))
    assert [s["sample_id"] for s in chosen] == ["s-a0", "s-b0", "s-a1"]
    assert len(choose_rollout_samples(samples, labels, StepsConfig(rollout_samples=0))) == 6


# ---------------------------------------------------------------- process scores


def test_rollout_scores_from_hand_made_rollouts():
    samples = [sample("s-a"), sample("s-b", "a <<2+3=6>>6\nb\n#### 6"), sample("s-c", "one\n#### 1")]
    labels = [{"sample_id": "s-a", "problem_id": "p-ann", "correct": True},
              {"sample_id": "s-b", "problem_id": "p-ann", "correct": False},
              {"sample_id": "s-c", "problem_id": "p-ann", "correct": False}]
    outcomes = {("s-a", 1): [True, True, False, True], ("s-a", 2): [True, True, True, True],
                ("s-b", 1): [False, False, False, False]}
    rollouts, rollout_labels = [], []
    for (parent, p), results in outcomes.items():
        for m, ok in enumerate(results):
            rollouts.append({"sample_id": f"r-{parent}-{p}-{m}", "parent_sample_id": parent, "prefix_steps": p})
            rollout_labels.append({"sample_id": f"r-{parent}-{p}-{m}", "correct": ok})
    config = StepsConfig(rollouts=4, aggregate="min", good_threshold=0.0)
    table = rollout_scores(samples, labels, rollouts, rollout_labels, config, model_id="m-test")
    rows = table.to_pylist()
    assert [r["sample_id"] for r in rows] == ["s-a", "s-b", "s-c"]
    assert [r["step_scores"] for r in rows] == [[0.75, 1.0, 1.0], [0.0, 0.0], [0.0]]
    assert [r["step_labels"] for r in rows] == [[True, True, True], [False, False], [False]]
    assert [r["path_reward"] for r in rows] == [0.75, 0.0, 0.0]
    assert {(r["source"], r["n_rollouts"], r["model_id"]) for r in rows} == {("rollouts", 4, "m-test")}
    mean = rollout_scores(samples, labels, rollouts, rollout_labels, StepsConfig(rollouts=4), model_id="m")
    assert mean.column("path_reward").to_pylist()[0] == pytest.approx(2.75 / 3)
    with pytest.raises(ValueError, match="s-a: no rollouts from its first 2"):
        rollout_scores(samples, labels, rollouts[:4], rollout_labels, config, model_id="m-test")


def test_error_drop_rate_on_hand_made_rows():
    # Problem p: 1 of 4 samples correct, so s_{-1} = 0.25; problem q: 2 of 2, s_{-1} = 1.0.
    labels = [
        {"sample_id": "a", "problem_id": "p", "correct": False, "first_error_step": 1},  # drops at 1
        {"sample_id": "b", "problem_id": "p", "correct": False, "first_error_step": 2},  # drops at 0 (< 0.25)
        {"sample_id": "c", "problem_id": "p", "correct": False, "first_error_step": 0},  # rises: no drop
        {"sample_id": "d", "problem_id": "p", "correct": True, "first_error_step": None},  # not located
        {"sample_id": "e", "problem_id": "q", "correct": True, "first_error_step": 1},  # flat at 1.0
        {"sample_id": "f", "problem_id": "q", "correct": True, "first_error_step": 5},  # beyond its steps
    ]
    process = [
        {"sample_id": "a", "problem_id": "p", "step_scores": [0.5, 0.25, 0.0]},
        {"sample_id": "b", "problem_id": "p", "step_scores": [0.0, 0.0, 0.0]},
        {"sample_id": "c", "problem_id": "p", "step_scores": [0.5, 0.0]},
        {"sample_id": "d", "problem_id": "p", "step_scores": [1.0, 0.0]},
        {"sample_id": "e", "problem_id": "q", "step_scores": [1.0, 1.0, 1.0]},
        {"sample_id": "f", "problem_id": "q", "step_scores": [1.0]},
    ]
    result = error_drop_rate(from_rows([p | {"source": "rollouts", "path_reward": 0.0, "model_id": "m"}
                                        for p in process], "process"), labels)
    assert result == {"located": 4, "drop_at_or_before": 2, "rate": 0.5, "drop_exactly_at": 1, "no_drop": 2}
    assert error_drop_rate([], labels)["rate"] is None
    assert error_drop_rate(process, labels, rates={"p": 0.0, "q": 1.0})["drop_at_or_before"] == 1

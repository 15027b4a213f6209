"""The lean decoder: calculator forcing inside a batch, row-independent sampling, parity with HF generate."""

from types import SimpleNamespace

import pytest
import torch

from factory.calculator import check_annotations
from factory.generators.decoding import DecodingConfig, generate
from factory.modeling import format_prompt


class ScriptedLM(torch.nn.Module):
    """A stand-in LM whose row i writes scripts[i] (a text, or token ids) token by token, then EOS, whatever it is fed."""

    def __init__(self, tokenizer, scripts):
        super().__init__()
        self.scripts = [(s if isinstance(s, list) else tokenizer.encode(s, add_special_tokens=False))
                        + [tokenizer.eos_token_id] for s in scripts]
        self.vocab = len(tokenizer)
        self.step = 0
        self.generation_config = None
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for row in range(input_ids.shape[0]):
            script = self.scripts[row]
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return SimpleNamespace(logits=logits)


def test_calculator_overrides_a_wrong_result_in_one_row_without_stopping_the_batch(tiny_model):
    _, tokenizer = tiny_model
    scripts = ["Then 12+7=<<12+7=91>>91 marbles.\n#### 91", "She has 3 pens.\n#### 3"]
    config = DecodingConfig(temperature=0.0, max_new_tokens=40, batch_size=2)
    # Prompts of equal length keep the scripted rows in input order.
    off = generate(ScriptedLM(tokenizer, scripts), tokenizer, ["Q", "Q"], [0, 0],
                   DecodingConfig(temperature=0.0, max_new_tokens=40, calculator=False), show_progress=False)
    on = generate(ScriptedLM(tokenizer, scripts), tokenizer, ["Q", "Q"], [0, 0], config, show_progress=False)
    assert off[0].text == scripts[0] and check_annotations(off[0].text).wrong == 1
    assert "<<12+7=19>>" in on[0].text and check_annotations(on[0].text).wrong == 0
    assert on[0].forced_tokens == len(tokenizer.encode("19>>", add_special_tokens=False))
    assert on[1].text == scripts[1] and on[1].forced_tokens == 0
    assert on[1].finish_reason == "stop"


def test_a_prompt_ending_inside_an_annotation_is_completed_by_the_calculator(tiny_model):
    model, tokenizer = tiny_model
    prompt = format_prompt(tokenizer, "Mia has 12 marbles.") + "She has 12+7=<<12+7="
    [completion] = generate(model, tokenizer, [prompt], [3], DecodingConfig(temperature=1.0, max_new_tokens=8),
                            show_progress=False)
    assert completion.text.startswith("19>>")


def test_refused_expressions_are_left_to_the_model(tiny_model):
    model, tokenizer = tiny_model
    prompt = "x <<__import__('os')="
    [completion] = generate(model, tokenizer, [prompt], [3], DecodingConfig(temperature=1.0, max_new_tokens=4),
                            show_progress=False)
    assert completion.forced_tokens == 0


def test_sampling_is_row_independent_of_batch_size_and_order(tiny_model):
    model, tokenizer = tiny_model
    prompts = [format_prompt(tokenizer, q) for q in ["Mia has 12 marbles.", "Tom has 3 boxes.", "Ann had 20 coins."]]
    config = DecodingConfig(temperature=1.0, top_p=0.95, max_new_tokens=24, batch_size=3)
    together = generate(model, tokenizer, prompts, [11, 12, 13], config, show_progress=False)
    alone = generate(model, tokenizer, prompts[::-1], [13, 12, 11],
                     DecodingConfig(temperature=1.0, top_p=0.95, max_new_tokens=24, batch_size=1), show_progress=False)
    assert [c.text for c in together] == [c.text for c in alone[::-1]]
    reseeded = generate(model, tokenizer, prompts, [21, 22, 23], config, show_progress=False)
    assert [c.text for c in reseeded] != [c.text for c in together]


def test_greedy_decoding_matches_hf_generate(tiny_model):
    model, tokenizer = tiny_model
    prompts = [format_prompt(tokenizer, q) for q in ["Mia has 12 marbles. She buys 7 more.", "Tom has 3 boxes."]]
    ours = generate(model, tokenizer, prompts, [0, 0],
                    DecodingConfig(max_new_tokens=16, calculator=False, stop_at_final_answer=False),
                    show_progress=False)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        reference = model.generate(**batch, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    expected = tokenizer.batch_decode(reference[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [c.text for c in ours] == [t.rstrip("\n") for t in expected]


def test_length_limit_is_reported(tiny_model):
    _, tokenizer = tiny_model
    script = "a long rationale that goes on and on without an answer"
    [cut] = generate(ScriptedLM(tokenizer, [script]), tokenizer, ["Q"], [0],
                     DecodingConfig(max_new_tokens=5, stop_at_final_answer=False), show_progress=False)
    assert (cut.n_tokens, cut.finish_reason) == (5, "length")
    [whole] = generate(ScriptedLM(tokenizer, [script]), tokenizer, ["Q"], [0],
                       DecodingConfig(max_new_tokens=200, stop_at_final_answer=False), show_progress=False)
    assert (whole.text, whole.finish_reason) == (script, "stop")


def test_prompts_and_seeds_must_align(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate(model, tokenizer, ["a", "b"], [0], DecodingConfig(), show_progress=False)


def test_doctests():
    import doctest

    from factory.generators import decoding

    result = doctest.testmod(decoding)
    assert result.attempted >= 3 and result.failed == 0


def test_counter_noise_is_a_uniform_pure_function_of_seed_step_and_token():
    from factory.generators.decoding import counter_uniform

    seeds = torch.tensor([0, 1, 2**62 + 12345, 7])
    noise = counter_uniform(seeds, 3, 50_000)
    assert torch.equal(noise, counter_uniform(seeds, 3, 50_000))
    assert torch.equal(noise[2:3], counter_uniform(seeds[2:3], 3, 50_000))  # other rows do not matter
    assert not torch.equal(noise, counter_uniform(seeds, 4, 50_000))
    assert len({tuple(row[:8].tolist()) for row in noise}) == 4
    assert 0 < noise.min() and noise.max() < 1
    counts = torch.histc(noise.float(), bins=10, min=0, max=1)
    expected = noise.numel() / 10
    assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 9 degrees of freedom

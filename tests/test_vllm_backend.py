"""The vLLM backend's stop-and-resume loop, driven by a scripted engine; only the real engine needs vLLM."""

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import pytest
from test_decoding import ScriptedLM

from factory.calculator import check_annotations
from factory.cli import main
from factory.generators import decoding, vllm_backend
from factory.generators.decoding import Completion, DecodingConfig
from factory.generators.sampling import SamplingConfig, check_backend, sample_rationales
from factory.generators.vllm_backend import (
    Segment,
    TokenText,
    absorb,
    completion_of,
    resume_seed,
    sampling_kwargs,
    start_row,
)
from factory.modeling import format_prompt
from factory.schema import from_rows


class ScriptEngine:
    """A stand-in for vLLM whose row for prompt P writes scripts[P] token by token, whatever it is fed.

    Like vLLM it stops after the token completing a stop string (stop_reason:
    the string), after max_tokens ("length"), or with EOS as the last token
    (stop_reason None). The position in a script is the number of tokens the
    row holds after its prompt, forced ones included, as in `ScriptedLM`.
    """

    def __init__(self, tokenizer, scripts: dict[str, str]):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.scripts = {
            tuple(tokenizer.encode(p, add_special_tokens=False)): tokenizer.encode(s, add_special_tokens=False)
            + [self.eos]
            for p, s in scripts.items()
        }
        self.requests: list[tuple[list[int], dict]] = []

    def __call__(self, requests):
        self.requests += requests
        return [self.segment(ids, kwargs) for ids, kwargs in requests]

    def segment(self, ids, kwargs) -> Segment:
        prompt = max((p for p in self.scripts if tuple(ids[: len(p)]) == p), key=len)
        script = self.scripts[prompt]
        position = len(ids) - len(prompt)
        written: list[int] = []
        for token in script[position : position + kwargs["max_tokens"]]:
            written.append(token)
            if token == self.eos:
                return Segment(tuple(written), "stop", None)
            text = self.tokenizer.decode(written, skip_special_tokens=True)
            for stop in kwargs["stop"]:
                if stop in text:
                    return Segment(tuple(written), "stop", stop)
        return Segment(tuple(written), "length", None)


SCRIPTS = {
    # "=" outside an annotation first, then a wrong result the calculator corrects
    "Q: a\n": "Then 12+7=<<12+7=91>>91 marbles.\n#### 91",
    "Q: b\n": "She has 3 pens.\n#### 3",
    # a right result is still forced; the text after the final line is never kept
    "Q: c\n": "So 3*4=<<3*4=12>>12 pens.\n#### 12\nQuestion: and then",
    # runs out of budget
    "Q: d\n": "Ann had 20 coins, gave 5: 20-5=<<20-5=15>>15 left, found 2: 15+2=<<15+2=17>>17 coins.\n#### 17",
    # a prompt that ends inside an annotation, and an expression the calculator refuses
    "Q: e\nShe has 12+7=<<12+7=": "99>> marbles.\n#### 19",
    "Q: f\n": "x <<__import__('os')=5>> ok\n#### 5",
}


def hf_completions(tokenizer, scripts, config):
    """What the HF backend decodes for each scripted row (one row per call: the script follows the step)."""
    return [
        decoding.generate(ScriptedLM(tokenizer, [script]), tokenizer, [prompt], [0], config, show_progress=False)[0]
        for prompt, script in scripts.items()
    ]


def test_scripted_rows_decode_as_the_hf_backend_decodes_them(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(temperature=0.0, max_new_tokens=40)
    engine = ScriptEngine(tokenizer, SCRIPTS)
    got = vllm_backend.generate(engine, tokenizer, list(SCRIPTS), list(range(len(SCRIPTS))), config,
                                show_progress=False)
    assert got == hf_completions(tokenizer, SCRIPTS, config)
    a, b, c, d, e, f = got
    assert "<<12+7=19>>" in a.text and check_annotations(a.text).wrong == 0 and a.forced_tokens > 0
    assert (b.text, b.finish_reason, b.forced_tokens) == (SCRIPTS["Q: b\n"], "stop", 0)
    assert c.text == "So 3*4=<<3*4=12>>12 pens.\n#### 12" and c.finish_reason == "stop"
    assert (d.n_tokens, d.finish_reason) == (40, "length")
    assert e.text.startswith("19>>") and e.forced_tokens > 0
    assert f.forced_tokens == 0 and f.text == SCRIPTS["Q: f\n"]


def test_without_the_calculator_or_the_final_line_rule_rows_run_in_one_segment(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(temperature=0.0, max_new_tokens=40, calculator=False, stop_at_final_answer=False)
    engine = ScriptEngine(tokenizer, SCRIPTS)
    got = vllm_backend.generate(engine, tokenizer, list(SCRIPTS), [0] * len(SCRIPTS), config, show_progress=False)
    assert got == hf_completions(tokenizer, SCRIPTS, config)
    assert len(engine.requests) == len(SCRIPTS)
    assert all(kwargs["stop"] == [] for _, kwargs in engine.requests)
    assert got[0].text == SCRIPTS["Q: a\n"] and check_annotations(got[0].text).wrong == 1


def test_each_resume_gets_its_own_seed_and_the_budget_left(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(temperature=0.7, top_k=5, max_new_tokens=40)
    scripts = {"Q: a\n": SCRIPTS["Q: a\n"]}
    runs = []
    for _ in range(2):
        engine = ScriptEngine(tokenizer, scripts)
        completions = vllm_backend.generate(engine, tokenizer, list(scripts), [123], config, show_progress=False)
        runs.append((completions, engine.requests))
    assert runs[0] == runs[1]
    requests = runs[0][1]
    assert len(requests) == 3  # stopped at the "=" before "<<", at the one inside, then to the end
    assert [kwargs["seed"] for _, kwargs in requests] == [123, resume_seed(123, 1), resume_seed(123, 2)]
    assert len(set(kwargs["seed"] for _, kwargs in requests)) == 3
    for ids, kwargs in requests:
        generated = len(ids) - len(requests[0][0])
        assert kwargs["max_tokens"] == 40 - generated
        assert kwargs["top_k"] == 5 and kwargs["stop"] == ["="] and kwargs["include_stop_str_in_output"]


def test_sampling_kwargs_name_vllm_parameters():
    kwargs = sampling_kwargs(DecodingConfig(temperature=0.7, top_p=0.9), seed=5, max_tokens=17)
    assert kwargs == {"n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 17, "seed": 5,
                      "stop": ["="], "include_stop_str_in_output": True}


def test_resume_seeds_are_fixed_63_bit_and_distinct():
    seeds = [resume_seed(2**62 + 1, k) for k in range(50)]
    assert seeds[0] == 2**62 + 1 and len(set(seeds)) == 50
    assert all(0 <= s < 2**63 for s in seeds)
    assert resume_seed(7, 3) == resume_seed(7, 3) != resume_seed(8, 3)


def row_and_tokens(tokenizer, config, prompt="Q: x\n"):
    tokens = TokenText(tokenizer)
    return start_row(prompt, 0, config, tokens), tokens


def encode(tokenizer, text):
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def test_a_stop_on_an_equals_sign_outside_an_annotation_resumes_without_forcing(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(max_new_tokens=40)
    row, tokens = row_and_tokens(tokenizer, config)
    assert absorb(row, Segment(encode(tokenizer, "Then 12+7="), "stop", "="), config, tokens) == "resume"
    assert (row.generated, row.n_forced, row.reason) == ("Then 12+7=", 0, None)


def test_tokens_sampled_past_an_annotations_equals_sign_are_replaced_by_the_result(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(max_new_tokens=40)
    row, tokens = row_and_tokens(tokenizer, config)
    segment = Segment(encode(tokenizer, "She has <<12+7=91>> and more"), "length", None)
    assert absorb(row, segment, config, tokens) == "resume"
    assert row.generated == "She has <<12+7=19>>"
    assert row.n_forced == len(encode(tokenizer, "19>>"))
    request_ids, _ = row.next_request(config)
    assert request_ids == row.prompt_ids + row.ids


def test_the_budget_cuts_a_forced_result(tiny_model):
    _, tokenizer = tiny_model
    head = encode(tokenizer, "<<12+7=")
    config = DecodingConfig(max_new_tokens=len(head) + 1)
    row, tokens = row_and_tokens(tokenizer, config)
    assert absorb(row, Segment(head, "stop", "="), config, tokens) == "length"
    assert len(row.ids) == config.max_new_tokens and row.n_forced == 1
    assert completion_of(row, tokenizer).finish_reason == "length"


def test_a_row_ends_at_its_final_answer_line_or_its_end_token(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(max_new_tokens=40)
    row, tokens = row_and_tokens(tokenizer, config)
    assert absorb(row, Segment(encode(tokenizer, "#### 5\nQuestion: more"), "length"), config, tokens) == "stop"
    assert completion_of(row, tokenizer) == Completion("#### 5", len(encode(tokenizer, "#### 5\n")), "stop", 0)

    row, tokens = row_and_tokens(tokenizer, config)
    ids = encode(tokenizer, "She has 3 pens.") + (tokenizer.eos_token_id,)
    assert absorb(row, Segment(ids, "stop", None), config, tokens) == "stop"
    assert completion_of(row, tokenizer) == Completion("She has 3 pens.", len(ids), "stop", 0)


def test_a_segment_that_ran_out_of_tokens_ends_the_row(tiny_model):
    _, tokenizer = tiny_model
    config = DecodingConfig(max_new_tokens=40)
    row, tokens = row_and_tokens(tokenizer, config)
    assert absorb(row, Segment(encode(tokenizer, "She has"), "length"), config, tokens) == "length"
    assert completion_of(row, tokenizer).text == "She has"


def test_engine_answers_must_match_the_requests(tiny_model):
    _, tokenizer = tiny_model
    with pytest.raises(ValueError, match="returned 0 segments for 1 requests"):
        vllm_backend.generate(lambda requests: [], tokenizer, ["Q"], [0], DecodingConfig(), show_progress=False)


def test_vllm_rows_record_their_backend_and_differ_in_id_from_hf_rows(tiny_model):
    _, tokenizer = tiny_model
    problems = [{"problem_id": "p-a", "question": "Tom has 3 boxes with 4 pens in each box. How many pens?"}]
    prompt = format_prompt(tokenizer, problems[0]["question"])
    engine = ScriptEngine(tokenizer, {prompt: "So 3*4=<<3*4=21>>12 pens.\n#### 12"})
    config = SamplingConfig(n=2, temperature=1.0, max_new_tokens=40, seed=7, backend="vllm")
    rows = sample_rationales(engine, tokenizer, problems, config, model_id="m-test", iteration=1,
                             show_progress=False)
    from_rows(rows, "samples")
    assert [r["generator"] for r in rows] == ["vllm", "vllm"]
    assert all(r["text"] == "So 3*4=<<3*4=12>>12 pens.\n#### 12" for r in rows)
    hf = SamplingConfig(n=2, temperature=1.0, max_new_tokens=40, seed=7)
    assert config.request_params() == hf.request_params()  # the backend is not a decoding setting ...
    assert rows[0]["sample_id"] != "s-04e0512c33716aaf"  # ... but it is part of the id (hf's id: test_sampling)
    assert len({r["sample_id"] for r in rows}) == 2


def test_backends_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="must be one of hf, vllm"):
        check_backend(SamplingConfig(backend="tgi"))
    check_backend(SamplingConfig())
    if vllm_backend.vllm_available():
        return
    with pytest.raises(ValueError, match=r"pip install 'factory\[vllm\]'"):
        check_backend(SamplingConfig(backend="vllm"))
    params = tmp_path / "params.yaml"
    params.write_text("sample:\n  backend: vllm\n")
    code = main(["sample", "--model", str(tmp_path / "model"), "--problems", str(tmp_path / "p.parquet"),
                 "--iteration", "1", "--out", str(tmp_path / "s.parquet"), "--params", str(params)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "pip install 'factory[vllm]'" in error


def test_load_engine_speaks_vllms_documented_api(tmp_path, monkeypatch, tiny_model):
    """vllm.LLM / SamplingParams / LLM.generate as documented, checked against a stand-in `vllm` module."""
    _, tokenizer = tiny_model
    tokenizer.save_pretrained(tmp_path)
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, prompts, sampling_params, *, use_tqdm):
            calls["generate"] = (prompts, sampling_params, use_tqdm)
            out = SimpleNamespace(token_ids=[5, 6], finish_reason="stop", stop_reason="=", text="ignored")
            return [SimpleNamespace(outputs=[out]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine, loaded = vllm_backend.load_engine(tmp_path, seed=3, dtype="float16")
    assert calls["llm"] == {"model": str(tmp_path), "seed": 3, "enable_prefix_caching": True, "dtype": "float16"}
    params = sampling_kwargs(DecodingConfig(), seed=1, max_tokens=4)
    assert engine([([1, 2], params)]) == [Segment((5, 6), "stop", "=")]
    assert calls["generate"] == ([{"prompt_token_ids": [1, 2]}], [params], False)
    assert loaded.encode("Tom has", add_special_tokens=False) == tokenizer.encode("Tom has", add_special_tokens=False)


@pytest.mark.slow
def test_real_vllm_engine_forces_calculator_results(tmp_path, tiny_model):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine, loaded = vllm_backend.load_engine(tmp_path, gpu_memory_utilization=0.2, enforce_eager=True)
    prompts = ["Q: a\nShe has 12+7=<<12+7=", "Q: b\n"]
    config = DecodingConfig(temperature=1.0, max_new_tokens=24)
    first = vllm_backend.generate(engine, loaded, prompts, [3, 4], config, show_progress=False)
    again = vllm_backend.generate(engine, loaded, prompts, [3, 4], config, show_progress=False)
    assert first == again
    assert first[0].text.startswith("19>>") and first[0].forced_tokens > 0
    assert all(c.n_tokens <= 24 and c.finish_reason in {"stop", "length"} for c in first)

"""Sampling with vLLM behind the HF backend's contract: prompts, per-row seeds and a
DecodingConfig in, one `Completion` per prompt out, in input order.

vLLM cannot write into a running request, so calculator-integrated decoding is
stop-and-resume. Each row is generated in segments: vLLM stops a segment at any
`=` (a stop string), the segment's tokens are replayed here with the HF
backend's rules, and when the row ends inside `<<expr=` the calculator's result
and `>>` are appended and the row goes back to vLLM as a new request (prompt,
generated and forced token ids). Automatic prefix caching makes that resume
cost only the new tokens. Requests carry token ids rather than text because
re-tokenising generated text can give other ids than were generated. Each
sample is its own request (n=1) with its own seed, as in the HF backend; the
N samples of a problem share their prompt's KV cache through the same caching.

The replay, not vLLM's stop, decides everything (end of row, calculator, final
answer line, token budget), so a segment means the same whatever the engine
stopped on. A row ends after its `#### N` line even though vLLM does not stop
there: the tokens vLLM wrote past that line are dropped (trained models write
EOS right after it, so little is wasted).

Everything but `load_engine` is plain Python: tests drive the whole loop with a
scripted engine, and vLLM (a GPU-only extra) is imported only to run one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from factory.generators.decoding import FINAL_LINE, Completion, DecodingConfig, calculator_completion, forced_ids
from factory.ids import content_hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VLLM_MISSING = "vLLM is not installed: pip install 'factory[vllm]' (it needs a CUDA GPU)"

@dataclass(frozen=True)
class Segment:
    """What an engine generated for one request: the fields of vLLM's CompletionOutput the loop reads.

    `token_ids` ends with the token that stopped it (EOS or a stop token id
    included, as vLLM returns them); `stop_reason` is the stop string matched,
    a stop token id, or None (EOS, or the length limit).
    """

    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" or "length"
    stop_reason: str | int | None = None


# One engine call: (prompt token ids, SamplingParams keyword arguments) per request -> a Segment per request.
Engine = Callable[[list[tuple[list[int], dict]]], list[Segment]]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resume_seed(seed: int, resume: int) -> int:
    """The seed of a row's segment `resume` (0: the first): the row's own seed, then one derived per resume.

    vLLM restarts a request's noise from its seed, so reusing the row seed would
    replay the first segment's noise after every calculator result.
    """
    if resume == 0:
        return seed
    return int(content_hash(seed, "resume", resume), 16) & (2**63 - 1)


def sampling_kwargs(config: DecodingConfig, *, seed: int, max_tokens: int,
                    stop_token_ids: tuple[int, ...] = ()) -> dict:
    """`vllm.SamplingParams` keyword arguments for one segment of one row.

    `stop_token_ids`: end tokens vLLM would not stop on by itself (a chat template's end of turn that is not
    the model's EOS); the key is left out when there are none.
    """
    extra = {"stop_token_ids": list(stop_token_ids)} if stop_token_ids else {}
    return extra | {
        "n": 1,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k if config.top_k > 0 else -1,  # -1 turns top-k off in every vLLM >= 0.8
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": ["="] if config.calculator else [],
        "include_stop_str_in_output": True,
    }


@dataclass
class RowState:
    """One row across its segments: tokens so far (sampled and forced) and the text followed for the rules."""

    prompt_ids: list[int]
    prompt: str
    seed: int
    ids: list[int] = field(default_factory=list)
    generated: str = ""  # text of `ids`, token by token
    n_forced: int = 0
    handled_eq: int = -1
    segments: int = 0
    stop_token_ids: tuple[int, ...] = ()  # the end of turn, where it is not EOS
    ended_by_token: bool = False  # the last id is EOS or a stop token: counted, never shown
    reason: str | None = None  # "stop" or "length" once the row is done

    def next_request(self, config: DecodingConfig) -> tuple[list[int], dict]:
        budget_left = config.max_new_tokens - len(self.ids)
        seed = resume_seed(self.seed, self.segments)
        return self.prompt_ids + self.ids, sampling_kwargs(config, seed=seed, max_tokens=budget_left,
                                                           stop_token_ids=self.stop_token_ids)


class TokenText:
    """The text of each token id alone (decoded once, on first sight), and encoding of forced text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.pieces: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.tokenizer.decode([token])
        return self.pieces[token]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def forced(self, text: str) -> list[int]:
        """Ids that write exactly `text` after the row's text (`decoding.forced_ids`)."""
        return forced_ids(self.tokenizer, text)

    def end_ids(self) -> tuple[int, ...]:
        """The chat template's end-of-turn id when it is not the tokenizer's EOS: a stop token to give vLLM."""
        from factory.modeling import end_of_turn_id

        end = end_of_turn_id(self.tokenizer)
        return () if end is None or end == self.tokenizer.eos_token_id else (end,)


def _force(row: RowState, config: DecodingConfig, tokens: TokenText) -> None:
    """Append the calculator's result if the row's text ends inside `<<expr=`; never past the budget."""
    row.handled_eq, suffix = calculator_completion(row.prompt + row.generated, row.handled_eq)
    if suffix is None:
        return
    forced = tokens.forced(suffix)[: config.max_new_tokens - len(row.ids)]
    row.ids += forced
    row.generated += "".join(tokens(t) for t in forced)
    row.n_forced += len(forced)


def start_row(prompt: str, seed: int, config: DecodingConfig, tokens: TokenText) -> RowState:
    """A row before its first segment; a prompt ending inside an annotation gets its result first."""
    row = RowState(prompt_ids=tokens.encode(prompt), prompt=prompt, seed=seed, stop_token_ids=tokens.end_ids())
    if config.calculator:
        _force(row, config, tokens)
    if len(row.ids) >= config.max_new_tokens:
        row.reason = "length"
    return row


def absorb(row: RowState, segment: Segment, config: DecodingConfig, tokens: TokenText) -> str:
    """Replay one segment into `row` with the HF backend's per-token rules: "stop", "length" or "resume".

    "resume": the row needs another segment, after a calculator result (the
    segment's tokens past the `=` were sampled without it and are dropped) or
    after a stop on an `=` outside any annotation.
    """
    row.segments += 1
    budget = config.max_new_tokens
    last = len(segment.token_ids) - 1
    end_token = segment.finish_reason == "stop" and not isinstance(segment.stop_reason, str)
    for position, token in enumerate(segment.token_ids[: budget - len(row.ids)]):
        row.ids.append(token)
        if end_token and position == last:
            row.ended_by_token, row.reason = True, "stop"
            return row.reason
        piece = tokens(token)
        row.generated += piece
        if config.stop_at_final_answer and "\n" in piece and FINAL_LINE.search(row.generated):
            row.reason = "stop"
            return row.reason
        if config.calculator and "=" in piece:
            forced_before = row.n_forced
            _force(row, config, tokens)
            if row.n_forced > forced_before:
                break
    else:  # the whole segment is in
        if segment.finish_reason != "stop" or not segment.token_ids:  # out of room, or (never) nothing new
            row.reason = "length"
            return row.reason
    if len(row.ids) >= budget:
        row.reason = "length"
        return row.reason
    return "resume"


def completion_of(row: RowState, tokenizer: PreTrainedTokenizerBase) -> Completion:
    """The row as the HF backend reports it: text without the end token, every token counted."""
    shown = row.ids[:-1] if row.ended_by_token else row.ids
    text = tokenizer.decode(shown, skip_special_tokens=True)
    return Completion(text.rstrip("\n"), len(row.ids), row.reason, row.n_forced)


def generate(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: DecodingConfig,
    *,
    desc: str = "decoding",
    show_progress: bool = True,
) -> list[Completion]:
    """Decode one completion per prompt with `engine`; `seeds[i]` drives row i's noise (see `resume_seed`).

    Every open row goes to the engine in one call per round; a round ends rows
    or sends them back after a calculator result, until none is left open.
    `config.batch_size` is not used: vLLM schedules its own batches.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    tokens = TokenText(tokenizer)
    rows = [start_row(prompt, seed, config, tokens) for prompt, seed in zip(prompts, seeds)]
    with tqdm(total=len(rows), desc=desc, unit="seq", disable=not show_progress) as bar:
        bar.update(sum(row.reason is not None for row in rows))
        while open_rows := [row for row in rows if row.reason is None]:
            segments = engine([row.next_request(config) for row in open_rows])
            if len(segments) != len(open_rows):
                raise ValueError(f"the engine returned {len(segments)} segments for {len(open_rows)} requests")
            for row, segment in zip(open_rows, segments):
                absorb(row, segment, config, tokens)
            bar.update(sum(row.reason is not None for row in open_rows))
    return [completion_of(row, tokenizer) for row in rows]


def require_vllm() -> None:
    if not vllm_available():
        raise ValueError(VLLM_MISSING)


def load_engine(model_dir: str | Path, *, seed: int = 0, **llm_kwargs) -> tuple[Engine, PreTrainedTokenizerBase]:
    """A vLLM engine over `model_dir` with automatic prefix caching, and the model's tokenizer for prompts.

    `llm_kwargs` go to `vllm.LLM` (e.g. gpu_memory_utilization, dtype, max_model_len).
    """
    require_vllm()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), seed=seed, enable_prefix_caching=True, **llm_kwargs)

    def run(requests: list[tuple[list[int], dict]]) -> list[Segment]:
        outputs = llm.generate(
            [{"prompt_token_ids": prompt_ids} for prompt_ids, _ in requests],
            [SamplingParams(**kwargs) for _, kwargs in requests],
            use_tqdm=False,
        )
        return [
            Segment(tuple(out.token_ids), out.finish_reason, out.stop_reason)
            for out in (output.outputs[0] for output in outputs)
        ]

    return run, AutoTokenizer.from_pretrained(str(model_dir))

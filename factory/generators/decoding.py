"""Batched decoding with calculator-integrated generation (the HF-transformers backend).

A lean loop over the model's forward pass with a KV cache, rather than
`model.generate`, because the calculator needs to write into individual rows
of a running batch: when a row has written `<<expr=`, the calculator's result
and `>>` are queued for that row and fed as its next tokens, while the other
rows keep sampling. Nothing stops or re-encodes (DPO-ST's method).

Sampling noise is a counter-based hash of (row seed, step, token id), with the
row seed taken from the row's own key (problem, sample index, seed), so a row's
text does not depend on which other rows share its batch: resuming a crashed
run, changing the batch size or dropping finished rows from the batch gives
the same samples (up to float rounding of padded batches). The loop is also
what makes it faster than `model.generate` (bench/sampling.py): the KV cache
is preallocated, finished rows leave the batch, and the host looks only at
rows that just wrote EOS, `=` or a newline.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from factory.calculator import calculator_result
from factory.modeling import end_of_turn_id
from factory.reasoning_steps import split_steps

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# A finished final-answer line: generation may stop once it is written.
FINAL_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


@dataclass(frozen=True, kw_only=True)
class DecodingConfig:
    """How to decode; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    calculator: bool = True
    stop_at_final_answer: bool = True  # end a row after its `#### N` line
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("top_k",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)!r}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class StepTemperature:
    """A per-step temperature schedule (SCDPO, Lu et al. 2024): step i is sampled at min(start + step*i, max).

    Step i is the i-th non-empty line of the *generated* text (0-based; the
    `#### N` line is not a step, as in `factory.reasoning_steps`). Values are rounded to
    12 decimals so that 1.1 + 0.1*1 is 1.2, not 1.2000000000000002.

    >>> schedule = StepTemperature(1.1, 0.1, 1.4)
    >>> [schedule.at(i) for i in range(5)]
    [1.1, 1.2, 1.3, 1.4, 1.4]
    """

    start: float
    step: float
    max: float

    def __post_init__(self) -> None:
        if not self.start > 0:
            raise ValueError(f"StepTemperature.start must be > 0, got {self.start!r}")
        if not self.max >= self.start:
            raise ValueError(f"StepTemperature.max must be >= start ({self.start!r}), got {self.max!r}")

    def at(self, i: int) -> float:
        return round(min(self.start + self.step * i, self.max), 12)


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS or final answer written), "step" (one step written, on request) or "length"
    forced_tokens: int  # tokens written by the calculator
    logprob: float | None = None  # on request: the model's log-probability (T=1) of the tokens it chose itself


def calculator_completion(text: str, handled_eq: int = -1) -> tuple[int, str | None]:
    """If `text` ends inside `<<expr=…`: the index of that `=`, and the result's unwritten rest plus `>>`.

    Returns (handled_eq, None) when there is nothing to force: no open
    annotation, its `=` already handled, an expression the calculator refuses,
    or a result the model has already contradicted.

    >>> calculator_completion("She has <<12+7=")
    (14, '19>>')
    >>> calculator_completion("She has <<12+7=1")  # a token holding "=1" wrote the result's first digit
    (14, '9>>')
    >>> calculator_completion("She has <<12+7=19>> 19 and 2=")
    (-1, None)
    """
    opened = text.rfind("<<")
    if opened < 0 or text.rfind(">>") > opened:
        return handled_eq, None
    eq = text.find("=", opened + 2)
    if eq < 0 or eq <= handled_eq:
        return handled_eq, None
    result = calculator_result(text[opened + 2 : eq])
    if result is None:
        return eq, None
    written, target = text[eq + 1 :], result + ">>"
    return eq, target[len(written) :] if target.startswith(written) else None


_ANCHOR = "="  # what a forced result follows: its ids are checked to decode to exactly the text after it
_FORCED_CACHE_SIZE = 4096


def forced_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids that write exactly `text` after what the model already wrote (a calculator result and `>>`).

    With a byte-level BPE (the tiny model's, SmolLM2's) `text` encoded alone does: its tokens decode to
    their bytes wherever they stand. A tokenizer that marks word starts (SentencePiece's `▁`) may encode
    text alone with a leading space, which in the middle of a row would write `= 24>>`. So the ids are
    checked by decoding them after an `=`; failing that, `text` is encoded after an `=` and that `=`'s ids
    dropped, and failing that it is spelled one token per character. Results are cached per tokenizer.

    >>> from factory.modeling import train_tokenizer
    >>> tokenizer = train_tokenizer(["a 12+7=<<12+7=19>>19"], vocab_size=300)
    >>> tokenizer.decode(forced_ids(tokenizer, "19>>"))
    '19>>'
    """
    cache = getattr(tokenizer, "_factory_forced_ids", None)
    if cache is None:
        cache = tokenizer._factory_forced_ids = {}
    if text in cache:
        return list(cache[text])
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    anchor = encode(_ANCHOR)

    def writes(ids: list[int]) -> bool:
        return tokenizer.decode(anchor + ids) == _ANCHOR + text

    ids = encode(text)
    if not writes(ids):
        joined = encode(_ANCHOR + text)
        candidates = [joined[len(anchor):]] if joined[: len(anchor)] == anchor else []
        spelled = [encode(character) for character in text]
        if all(len(piece) == 1 for piece in spelled):
            candidates.append([piece[0] for piece in spelled])
        ids = next((c for c in candidates if writes(c)), ids)  # none writes it: the plain encoding, as before
    if len(cache) >= _FORCED_CACHE_SIZE:
        cache.clear()
    cache[text] = tuple(ids)
    return list(ids)


class _CalculatorState:
    """One row's calculator bookkeeping: the `=` already handled and the result tokens still to force."""

    __slots__ = ("forced", "n_forced", "handled_eq")

    def __init__(self) -> None:
        self.forced: deque[int] = deque()
        self.n_forced = 0
        self.handled_eq = -1

    def queue_result(self, text: str, encode) -> None:
        """If `text` ends inside `<<expr=…`, queue the result's remaining characters and `>>`."""
        self.handled_eq, suffix = calculator_completion(text, self.handled_eq)
        if suffix:
            self.forced.extend(encode(suffix))


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of each token id alone; used to rebuild rows' text without decoding every step."""
    cached = getattr(tokenizer, "_factory_token_texts", None)
    if cached is None:
        cached = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        tokenizer._factory_token_texts = cached
    return cached


def _watched_tokens(tokenizer: PreTrainedTokenizerBase, eos_ids: set[int], vocab: int) -> torch.Tensor:
    """Which token ids need the host's attention when written: EOS, `=` (calculator) and newlines (final line)."""
    import torch

    key = (vocab, tuple(sorted(eos_ids)))
    cached = getattr(tokenizer, "_factory_watched_tokens", {})
    if key not in cached:
        watched = torch.zeros(vocab, dtype=torch.bool)
        for token, piece in enumerate(token_texts(tokenizer)[:vocab]):
            watched[token] = "=" in piece or "\n" in piece
        watched[[t for t in eos_ids if t < vocab]] = True
        cached[key] = watched
        tokenizer._factory_watched_tokens = cached
    return cached[key]


def _filtered_logits(
    logits: torch.Tensor, config: DecodingConfig, temperatures: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits over the temperature (config's, or one per row), then top-k and top-p, each row on its own."""
    import torch

    if temperatures is None:
        logits = logits.float() / config.temperature
    else:
        logits = logits.float() / temperatures[:, None]
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _int64(value: int) -> int:
    """`value` wrapped to a signed 64-bit integer (torch has no uint64 arithmetic)."""
    return (value + 2**63) % 2**64 - 2**63


# splitmix64's constants
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1) for each (row seed, step, token id): a pure function of the three.

    A counter-based generator (splitmix64's mixer over the counter), computed for
    the whole batch in a few tensor ops: a row's noise does not depend on the
    other rows of its batch, so batching, resuming and dropping finished rows
    leave every row's sample unchanged, without a generator object per row.
    """
    import torch

    tokens = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = seeds[:, None] * _MIX2 + _int64((step + 1) * _GOLDEN) + tokens[None, :] * _MIX1
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 11).double() + 0.5) * 2.0**-53


def _choose(
    logits: torch.Tensor, seeds: torch.Tensor, step: int, config: DecodingConfig,
    temperatures: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy argmax, or Gumbel-max sampling with each row's noise (at each row's own temperature if given)."""
    import torch

    if temperatures is None and config.temperature <= 0:
        return logits.argmax(-1)
    filtered = _filtered_logits(logits, config, temperatures)
    gumbel = -torch.log(-torch.log(counter_uniform(seeds, step, filtered.shape[-1])))
    return (filtered + gumbel.float()).argmax(-1)


def _preallocated_layer(capacity: int):
    """A KV-cache layer that writes into buffers sized for the whole decode instead of concatenating each step."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            batch, heads, _, dim = key_states.shape
            self.key_buffer = key_states.new_zeros((batch, heads, capacity, dim))
            self.value_buffer = value_states.new_zeros((batch, heads, capacity, dim))
            self.length = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Move the kept rows' filled part to the front of the same buffers: no new allocation."""
            if self.is_initialized:
                kept = len(indices)
                for name in ("key_buffer", "value_buffer"):
                    buffer = getattr(self, name)
                    filled = buffer[indices, :, : self.length]
                    buffer = buffer[:kept]
                    buffer[:, :, : self.length] = filled
                    setattr(self, name, buffer)
                self.keys = self.key_buffer[:, :, : self.length]
                self.values = self.value_buffer[:, :, : self.length]

    return PreallocatedLayer


def _new_cache(model, capacity: int):
    """Preallocated full-attention layers; models with other attention kinds keep transformers' own cache."""
    from transformers import Cache, DynamicCache

    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if config is not None and (kinds != {"full_attention"} or getattr(config, "sliding_window", None)):
        return DynamicCache(config=config)
    return Cache(layer_class_to_replicate=_preallocated_layer(capacity))


def _ends_a_step(text: str) -> bool:
    """Whether `text` holds a complete non-empty line: one step written (`factory.reasoning_steps`)."""
    return any(line.strip() for line in text.split("\n")[:-1])


def _decode_batch(
    model, tokenizer, prompts, prompt_ids, seeds, config, eos_ids, step_temperature: StepTemperature | None = None,
    *, stop_at_step_end: bool = False, logprobs: bool = False,
) -> list[Completion]:
    """Decode one batch. The batch shrinks as rows finish, so late steps run only the rows still writing.

    Per step, the host looks only at rows that wrote a watched token (EOS, `=`,
    newline) or are being fed calculator results; every other row's step is
    tensor work. With `step_temperature`, each row samples at the schedule's
    temperature for the number of steps (non-empty lines) it has completed.
    With `stop_at_step_end`, a row ends once it completes a non-empty line;
    with `logprobs`, each written token's log-probability is kept on device.
    """
    import torch

    size = len(prompt_ids)
    width = max(map(len, prompt_ids))
    capacity = width + config.max_new_tokens
    pad = tokenizer.pad_token_id
    device = model.device
    input_ids = torch.full((size, width), pad, dtype=torch.long)
    attention = torch.ones((size, capacity), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, : width - len(ids)] = 0
    positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)
    attention = attention.to(device)
    row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
    texts = token_texts(tokenizer)
    encode = lambda s: forced_ids(tokenizer, s)  # noqa: E731
    calculators = [_CalculatorState() for _ in prompts]
    if config.calculator:  # a prompt may end inside an annotation (a continued prefix)
        for prompt, state in zip(prompts, calculators):
            state.queue_result(prompt, encode)
    forcing = {row for row, state in enumerate(calculators) if state.forced}  # rows being fed results
    written = torch.full((size, config.max_new_tokens), pad, dtype=torch.long)  # tokens per input row
    token_logprobs = torch.zeros((size, config.max_new_tokens), device=device) if logprobs else None
    forced_at = torch.zeros((size, config.max_new_tokens), dtype=torch.bool) if logprobs else None
    n_written = [config.max_new_tokens] * size
    reasons = ["length"] * size
    live = list(range(size))  # input row of each batch position
    position_of = {row: row for row in live}
    finished: list[int] = []  # batch positions done but not yet dropped
    cache = _new_cache(model, capacity)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention[:, :width],
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    positions = positions[:, -1:].to(device)
    watched = _watched_tokens(tokenizer, eos_ids, logits.shape[-1])
    done = [False] * size
    temperatures = None  # per batch position, with a step schedule
    if step_temperature is not None:
        temperatures = torch.full((size,), step_temperature.at(0), dtype=torch.float32, device=device)
    steps_done = [0] * size  # completed steps of each input row's generated text

    def generated_text(row: int, step: int) -> str:
        return "".join(texts[t] if t < len(texts) else "" for t in written[row, : step + 1].tolist())

    for step in range(config.max_new_tokens):
        chosen = _choose(logits, row_seeds, step, config, temperatures).cpu()
        for row in list(forcing):
            state = calculators[row]
            chosen[position_of[row]] = state.forced.popleft()
            state.n_forced += 1
            if forced_at is not None:
                forced_at[row, step] = True
            if not state.forced:
                forcing.discard(row)
        written[live, step] = chosen
        if token_logprobs is not None:
            scores = logits.float().log_softmax(-1).gather(-1, chosen.to(device)[:, None])[:, 0]
            token_logprobs[live, step] = scores
        attend = watched[chosen].nonzero().flatten().tolist()
        for position in attend:
            row, token = live[position], int(chosen[position])
            state = calculators[row]
            if done[row]:
                continue
            if token in eos_ids:
                finished.append(position)
                done[row], n_written[row], reasons[row] = True, step + 1, "stop"
                forcing.discard(row)
                continue
            piece = texts[token]
            if step_temperature is not None and "\n" in piece:
                completed = len(split_steps(generated_text(row, step).rsplit("\n", 1)[0]))
                if completed != steps_done[row]:
                    steps_done[row] = completed
                    temperatures[position] = step_temperature.at(completed)
            if (config.calculator and "=" in piece and not state.forced) or (
                config.stop_at_final_answer and "\n" in piece
            ):
                text = generated_text(row, step)
                if config.calculator and "=" in piece and not state.forced:
                    state.queue_result(prompts[row] + text, encode)
                    if state.forced:
                        forcing.add(row)
                if config.stop_at_final_answer and "\n" in piece and FINAL_LINE.search(text):
                    finished.append(position)
                    done[row], n_written[row], reasons[row] = True, step + 1, "stop"
                    forcing.discard(row)
            if stop_at_step_end and not done[row] and "\n" in piece and _ends_a_step(generated_text(row, step)):
                finished.append(position)
                done[row], n_written[row], reasons[row] = True, step + 1, "step"
                forcing.discard(row)
        if len(finished) == len(live) or step + 1 == config.max_new_tokens:
            break
        if len(finished) * 8 >= len(live):  # drop finished rows once they are an eighth of the batch
            keep = [p for p, row in enumerate(live) if not done[row]]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, row_seeds, positions = attention[index], row_seeds[index], positions[index]
            if temperatures is not None:
                temperatures = temperatures[index]
            chosen = chosen[keep]
            live = [live[p] for p in keep]
            position_of = {row: position for position, row in enumerate(live)}
            finished = []
        else:
            chosen[finished] = pad
        positions = positions + 1
        logits = model(
            input_ids=chosen[:, None].to(device),
            attention_mask=attention[:, : width + step + 1],
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]
    totals = None
    if token_logprobs is not None:
        lengths = torch.arange(config.max_new_tokens)[None, :] < torch.tensor(n_written)[:, None]
        totals = (token_logprobs.cpu() * (lengths & ~forced_at)).sum(-1).tolist()
    completions = []
    for row in range(size):
        ids = [t for t in written[row, : n_written[row]].tolist() if t not in eos_ids]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        completions.append(Completion(text.rstrip("\n"), n_written[row], reasons[row], calculators[row].n_forced,
                                      None if totals is None else totals[row]))
    return completions


def batch_order(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[int]:
    """The order `generate` decodes `prompts` in (longest first, then input order).

    Cut in this order into shards of `batch_size`, each shard is one batch of a single `generate` call over
    all the prompts: decoding shard by shard, in any process, gives that call's completions exactly.
    """
    return _batch_order([tokenizer.encode(p, add_special_tokens=False) for p in prompts])


def _batch_order(encoded: list[list[int]]) -> list[int]:
    return sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    seeds: list[int],
    config: DecodingConfig,
    *,
    desc: str = "decoding",
    show_progress: bool = True,
    step_temperature: StepTemperature | None = None,
    stop_at_step_end: bool = False,
    logprobs: bool = False,
) -> list[Completion]:
    """Decode one completion per prompt; `seeds[i]` drives row i's sampling noise.

    Prompts are sorted by length and batched, so rows of a batch need little
    padding; results come back in the input order. With `step_temperature`
    (step-controlled continuations), `config.temperature` is not used: a row
    samples its i-th generated step (non-empty line, `factory.reasoning_steps`) at
    `step_temperature.at(i)`, with the same per-row noise as without it.
    With `stop_at_step_end` (tree search), a row stops after its first
    non-empty line, finish_reason "step" (the final-answer line still ends it
    with "stop"); `logprobs` fills `Completion.logprob`.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    eos_ids.discard(None)  # the chat template's end of turn stops a row too (Qwen: `<|im_end|>` beside EOS)
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    order = _batch_order(encoded)
    results: list[Completion | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="seq", disable=not show_progress) as bar:
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            done = _decode_batch(
                model, tokenizer, [prompts[i] for i in batch], [encoded[i] for i in batch],
                [seeds[i] for i in batch], config, eos_ids, step_temperature,
                stop_at_step_end=stop_at_step_end, logprobs=logprobs,
            )
            for i, completion in zip(batch, done):
                results[i] = completion
            bar.update(len(batch))
    model.train(was_training)
    return results  # type: ignore[return-value]

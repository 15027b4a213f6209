"""Batched decoding with calculator-integrated generation (the HF-transformers backend).

A lean loop over the model's forward pass with a KV cache, rather than
`model.generate`, because the calculator needs to write into individual rows
of a running batch: when a row has written `<<expr=`, the calculator's result
and `>>` are queued for that row and fed as its next tokens, while the other
rows keep sampling. Nothing stops or re-encodes (DPO-ST's method).

Sampling noise comes from one `torch.Generator` per row, seeded from the row's
own key (problem, sample index, seed), so a row's text does not depend on which
other rows share its batch: resuming a crashed run, or changing the batch
size, gives the same samples (up to float rounding of padded batches).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from factory.calculator import calculator_result

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# A finished final-answer line: generation may stop once it is written.
_FINAL_LINE = re.compile(r"####[^\n]*\d[^\n]*\n")


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


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS or final answer written) or "length"
    forced_tokens: int  # tokens written by the calculator


class _Row:
    """Per-row decoding state: text so far, the calculator's queued tokens."""

    __slots__ = ("text", "forced", "n_forced", "handled_eq", "ids", "done", "reason")

    def __init__(self, prompt: str) -> None:
        self.text = prompt  # followed for calculator markers only; completions are decoded from ids
        self.forced: deque[int] = deque()
        self.n_forced = 0
        self.handled_eq = -1
        self.ids: list[int] = []
        self.done = False
        self.reason = "length"

    def queue_calculator(self, encode) -> None:
        """If the text ends inside `<<expr=…`, queue the result's remaining characters and `>>`."""
        text = self.text
        opened = text.rfind("<<")
        if opened < 0 or text.rfind(">>") > opened:
            return
        eq = text.find("=", opened + 2)
        if eq < 0 or eq <= self.handled_eq:
            return
        self.handled_eq = eq
        result = calculator_result(text[opened + 2 : eq])
        if result is None:
            return
        written, target = text[eq + 1 :], result + ">>"
        # A tokenizer that merges "=" with digits may already have written part of the result.
        if target.startswith(written):
            self.forced.extend(encode(target[len(written) :]))


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of each token id alone; used to follow rows' text without decoding every step."""
    cached = getattr(tokenizer, "_factory_token_texts", None)
    if cached is None:
        cached = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        tokenizer._factory_token_texts = cached
    return cached


def _filtered_logits(logits: torch.Tensor, config: DecodingConfig) -> torch.Tensor:
    import torch

    logits = logits.float() / config.temperature
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


def _choose(logits: torch.Tensor, generators: list, active: list[int], config: DecodingConfig) -> torch.Tensor:
    """Greedy argmax, or Gumbel-max sampling with each row's own noise generator."""
    import torch

    if config.temperature <= 0:
        return logits.argmax(-1)
    filtered = _filtered_logits(logits, config)
    uniform = torch.full_like(filtered, 0.5)
    for row in active:
        uniform[row] = torch.rand(filtered.shape[-1], generator=generators[row])
    gumbel = -torch.log(-torch.log(uniform.clamp_(1e-10, 1 - 1e-10)))
    return (filtered + gumbel).argmax(-1)


def _decode_batch(model, tokenizer, prompts, prompt_ids, seeds, config, eos_ids) -> list[Completion]:
    import torch
    from transformers import DynamicCache

    size = len(prompt_ids)
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((size, width), pad, dtype=torch.long)
    attention = torch.zeros((size, width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds] if config.temperature > 0 else []
    texts = token_texts(tokenizer)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    rows = [_Row(prompt) for prompt in prompts]
    if config.calculator:  # a prompt may end inside an annotation (a continued prefix)
        for row in rows:
            row.queue_calculator(encode)
    cache = DynamicCache()
    device = model.device
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    for _ in range(config.max_new_tokens):
        active = [i for i, r in enumerate(rows) if not r.done]
        chosen = _choose(logits, generators, active, config).tolist()
        for i in active:
            row = rows[i]
            if row.forced:
                chosen[i] = row.forced.popleft()
                row.n_forced += 1
            token = chosen[i]
            row.ids.append(token)
            if token in eos_ids:
                row.done, row.reason = True, "stop"
                continue
            piece = texts[token]
            row.text += piece
            if config.calculator and not row.forced and "=" in piece:
                row.queue_calculator(encode)
            if config.stop_at_final_answer and "\n" in piece and _FINAL_LINE.search(row.text):
                row.done, row.reason = True, "stop"
        for i, row in enumerate(rows):
            if row.done:
                chosen[i] = pad
        if all(r.done for r in rows):
            break
        attention = torch.cat([attention, torch.ones((size, 1), dtype=torch.long)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=torch.tensor(chosen, device=device)[:, None],
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]
    completions = []
    for row in rows:
        ids = [t for t in row.ids if t not in eos_ids]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        completions.append(Completion(text.rstrip("\n"), len(row.ids), row.reason, row.n_forced))
    return completions


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    seeds: list[int],
    config: DecodingConfig,
    *,
    desc: str = "decoding",
    show_progress: bool = True,
) -> list[Completion]:
    """Decode one completion per prompt; `seeds[i]` drives row i's sampling noise.

    Prompts are sorted by length and batched, so rows of a batch need little
    padding; results come back in the input order.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    results: list[Completion | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="seq", disable=not show_progress) as bar:
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            done = _decode_batch(
                model, tokenizer, [prompts[i] for i in batch], [encoded[i] for i in batch],
                [seeds[i] for i in batch], config, eos_ids,
            )
            for i, completion in zip(batch, done):
                results[i] = completion
            bar.update(len(batch))
    model.train(was_training)
    return results  # type: ignore[return-value]

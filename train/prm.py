"""A process reward model: scores each step of a new sample without rollouts (SIPF, Chen et al., COLING 2025).

    summary = train_prm(examples=..., model_dir="models/iter_0", out_dir="models/iter_1_prm", config=PRMConfig())
    scores = score_steps("models/iter_1_prm", prompts, steps)      # one score per step, in [0, 1]
    reward = path_reward(scores[0], "min")

SIPF labels steps of sampled solutions by Monte Carlo rollouts (a step is good
if a rollout from its prefix reaches the gold answer), trains a PRM on those
labels and lets it score further samples' steps. Here the PRM is the policy
checkpoint's backbone with a new token-classification head
(`AutoModelForTokenClassification` over the causal LM's folder: the backbone
weights load, the head is freshly initialised; loading fails loudly otherwise).

Each example is one sample: {"prompt": str, "steps": [str], "labels": [bool],
"scores": [float]}, where `prompt` is the already formatted model prompt. The
text is `prompt + "".join(step + "\\n" for step in steps)`: the steps of
`factory.reasoning_steps.split_steps`, one per line (the `#### N` line is not a step and
is not in the text). Step i is judged at the last token of the step, the token
that holds its newline, found through the fast tokenizer's offset mapping (so
a token that merges the newline with neighbouring characters is still found).
Every other position is ignored. Two heads:

- "classification": 2 classes on the binary `labels`, score = P(good).
- "regression": 1 output trained with BCE-with-logits on the soft MC `scores`
  (the share of rollouts from the step that reached the gold answer), score =
  sigmoid.

Training is a lean torch loop, not transformers' Trainer: the loss needs soft
targets (regression) and a gather at the step ends, which Trainer's token
classification loss does not do, and a loop of a fixed number of optimizer
steps is short. AdamW, linear warm-up then linear decay to 0, gradient norm
clipped at 1.0 (Trainer's defaults), batches drawn from seeded permutations of
the examples, so a run is deterministic in `seed`. A share of the problems
(`heldout_fraction`, chosen by a hash of the seed and the problem id, so the
split is deterministic and no problem is on both sides) is held out: every
`eval_every` steps the loop measures the held-out loss, keeps the weights with
the lowest, and stops after `patience` evaluations without a lower one. The
held-out accuracy against the majority-class baseline of the held-out labels
is SIPF's precondition (`factory.preconditions`): a PRM that does not beat
always guessing the commoner label ranks pairs by noise. An example's
`problem_id` (optional) groups it; without one it is its own group. The loop is not
distributed: under `accelerate launch`, `factory steps`, which trains it, runs
on rank 0 alone as a plain process (`factory.cli`), the others leaving at once,
so it never waits on a collective the other ranks do not join. Sequences are truncated at
`max_length` tokens; steps whose end falls beyond it are not trained on and
are counted. Scoring pads on the right itself (whatever the tokenizer's
`padding_side`), so every real token keeps its position and a sample scores the
same alone or in a batch.

The saved folder is a normal token-classification checkpoint plus its
tokenizer; `config.json` carries `prm` = {head, aggregate, max_length}.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train.common import LoopCheckpoint, digest, run_fingerprint, save_model_atomically

HEADS = ("classification", "regression")
AGGREGATES = ("mean", "min")


@dataclass(frozen=True, kw_only=True)
class PRMConfig:
    """params.yaml `prm`."""

    max_steps: int = 300  # optimizer steps
    learning_rate: float = 1e-3
    batch_size: int = 16  # samples per step
    max_length: int = 512  # prompt + steps tokens; steps ending beyond are dropped from training
    warmup_steps: int = 10
    seed: int = 0
    head: str = "classification"  # "classification": P(good) from binary labels; "regression": sigmoid, soft MC scores
    aggregate: str = "mean"  # how step scores make a path reward: "mean" | "min"
    heldout_fraction: float = 0.2  # share of problems held out for early stopping and the held-out accuracy (0: none)
    eval_every: int = 25  # optimizer steps between held-out evaluations
    patience: int = 3  # evaluations without a lower held-out loss before training stops (0: never early)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"prm.max_steps must be >= 1; got {self.max_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"prm.learning_rate must be > 0; got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"prm.batch_size must be >= 1; got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"prm.max_length must be >= 2; got {self.max_length}")
        if self.warmup_steps < 0:
            raise ValueError(f"prm.warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.head not in HEADS:
            raise ValueError(f"prm.head must be one of {HEADS}; got {self.head!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"prm.aggregate must be one of {AGGREGATES}; got {self.aggregate!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"prm.heldout_fraction must be in [0, 1); got {self.heldout_fraction}")
        if self.eval_every < 1:
            raise ValueError(f"prm.eval_every must be >= 1; got {self.eval_every}")
        if self.patience < 0:
            raise ValueError(f"prm.patience must be >= 0; got {self.patience}")


def heldout_problems(examples: list[dict], fraction: float, seed: int) -> set[str]:
    """The problems held out: `fraction` of them (rounded, always leaving one to train on), ranked by a hash of
    (seed, problem), so the split depends on nothing but the seed and the problem ids.

    >>> sorted(heldout_problems([{"problem_id": p} for p in "abcdeabcde"], 0.4, seed=0))
    ['a', 'd']
    """
    groups = sorted({_group(e, i) for i, e in enumerate(examples)},
                    key=lambda g: (hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(), g))
    return set(groups[: min(round(fraction * len(groups)), len(groups) - 1)])


def _group(example: dict, index: int) -> str:
    return str(example.get("problem_id") or f"example-{index}")


def path_reward(scores: list[float], aggregate: str) -> float:
    """One reward for a path from its step scores: their mean or their minimum (0.0 for a path with no steps).

    >>> path_reward([1.0, 0.5, 0.75], "mean")
    0.75
    >>> path_reward([1.0, 0.5, 0.75], "min")
    0.5
    >>> path_reward([], "min")
    0.0
    >>> path_reward([0.5], "max")
    Traceback (most recent call last):
    ...
    ValueError: aggregate must be one of ('mean', 'min'); got 'max'
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}; got {aggregate!r}")
    if not scores:
        return 0.0
    return min(scores) if aggregate == "min" else sum(scores) / len(scores)


def step_text(prompt: str, steps: list[str]) -> tuple[str, list[int]]:
    r"""The scored text and, for each step, the character offset of the newline that ends it.

    >>> step_text("Q\n", ["a=1", "b=2"])
    ('Q\na=1\nb=2\n', [5, 9])
    """
    text, ends = prompt, []
    for step in steps:
        text += step
        ends.append(len(text))
        text += "\n"
    return text, ends


def encode(tokenizer, prompt: str, steps: list[str], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the text and, per step, the position of the token holding its newline (-1 if truncated away).

    The position is that of the last token starting at or before the newline:
    the token containing it, also when the tokenizer merges the newline with
    other characters.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the PRM needs a fast tokenizer (offset mapping) to find step ends")
    text, ends = step_text(prompt, steps)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    starts = [start for start, end in offsets]
    positions, t = [], 0
    for end in ends:
        while t + 1 < len(starts) and starts[t + 1] <= end:
            t += 1
        positions.append(t)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        positions = [p if p < max_length else -1 for p in positions]
    return ids, positions


def _head(model) -> str:
    return "regression" if model.config.num_labels == 1 else "classification"


def _step_logits(model, batch_ids: list[list[int]], pad_token_id: int, device):
    """Logits (B, T, C) of right-padded sequences: real tokens keep positions 0..len-1."""
    import torch

    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits


def _gather(logits, batch_positions: list[list[int]]):
    """The logits (N, C) at every kept step end of the batch, in order."""
    import torch

    rows = [row for row, positions in enumerate(batch_positions) for p in positions if p >= 0]
    cols = [p for positions in batch_positions for p in positions if p >= 0]
    return logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)]


def _probabilities(step_logits, head: str):
    return step_logits[:, 0].sigmoid() if head == "regression" else step_logits.softmax(-1)[:, 1]


def _loss(step_logits, labels, soft, head: str):
    import torch.nn.functional as F

    if head == "regression":
        return F.binary_cross_entropy_with_logits(step_logits[:, 0], soft)
    return F.cross_entropy(step_logits, labels)


def _check_examples(examples: list[dict]) -> None:
    for i, e in enumerate(examples):
        n = len(e["steps"])
        if len(e["labels"]) != n or len(e["scores"]) != n:
            raise ValueError(f"example {i}: {n} steps but {len(e['labels'])} labels and {len(e['scores'])} scores")
        if any(not 0.0 <= s <= 1.0 for s in e["scores"]):
            raise ValueError(f"example {i}: MC scores must lie in [0, 1]; got {e['scores']}")
        if any("\n" in s or not s.strip() for s in e["steps"]):
            raise ValueError(f"example {i}: a step must be one non-empty line; got {e['steps']}")


def load_prm(model_dir: str | Path, *, num_labels: int | None = None, device: str = "cpu"):
    """(model, tokenizer) from a folder, in eval mode.

    With `num_labels`, a new head is put on a causal LM checkpoint: its backbone
    must load completely and the head must be new.
    """
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if num_labels is None:
        model = AutoModelForTokenClassification.from_pretrained(str(model_dir), dtype=torch.float32)
    else:
        model, info = AutoModelForTokenClassification.from_pretrained(
            str(model_dir), num_labels=num_labels, dtype=torch.float32, output_loading_info=True,
            id2label={0: "bad", 1: "good"} if num_labels == 2 else {0: "good"},
        )
        prefix = model.base_model_prefix + "."
        backbone_missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
        if backbone_missing or info["mismatched_keys"]:
            raise ValueError(f"{model_dir}: the backbone did not load (missing {backbone_missing[:3]}, "
                             f"mismatched {sorted(info['mismatched_keys'])[:3]})")
        if not info["missing_keys"]:
            raise ValueError(f"{model_dir}: already has a token-classification head; the PRM starts from a policy")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return model, tokenizer


def _evaluate(model, encoded: list[tuple], head: str, batch_size: int, device) -> tuple[float, float]:
    """(mean loss per step, accuracy) over the labelled steps, in eval mode."""
    import torch

    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            step_logits = _gather(_step_logits(model, [c[0] for c in chunk], model.config.pad_token_id, device),
                                  [c[1] for c in chunk])
            labels = torch.tensor([y for c in chunk for y in c[2]], device=device)
            soft = torch.tensor([s for c in chunk for s in c[3]], device=device)
            total_loss += _loss(step_logits, labels, soft, head).item() * len(labels)
            correct += ((_probabilities(step_logits, head) > 0.5).long() == labels).sum().item()
            count += len(labels)
    return total_loss / count, correct / count


def train_prm(*, examples: list[dict], model_dir: str | Path, out_dir: str | Path, config: PRMConfig) -> dict:
    """Train a PRM from the policy in `model_dir` on per-step labels, save it into `out_dir`; returns metrics."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    if not examples:
        raise ValueError(f"the PRM needs labelled samples; got none (model {model_dir})")
    _check_examples(examples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)  # the head's initialisation
    model, tokenizer = load_prm(model_dir, num_labels=1 if config.head == "regression" else 2, device=device)
    model.config.prm = {"head": config.head, "aggregate": config.aggregate, "max_length": config.max_length}

    held = heldout_problems(examples, config.heldout_fraction, config.seed)
    encoded, heldout, truncated, merged = [], [], 0, 0
    for index, e in enumerate(examples):
        ids, positions = encode(tokenizer, e["prompt"], e["steps"], config.max_length)
        kept: dict[int, tuple[int, float]] = {}  # position -> (label, soft); a later step sharing a token wins
        for p, label, score in zip(positions, e["labels"], e["scores"], strict=True):
            if p < 0:
                truncated += 1
                continue
            merged += p in kept
            kept[p] = (int(bool(label)), float(score))
        if kept:
            order = sorted(kept)
            (heldout if _group(e, index) in held else encoded).append(
                (ids, order, [kept[p][0] for p in order], [kept[p][1] for p in order]))
    if not encoded:
        raise ValueError(f"no step of the {len(examples)} samples ends within max_length {config.max_length} "
                         "outside the held-out problems")
    labels_total = sum(len(c[2]) for c in encoded + heldout)
    positives = sum(sum(c[2]) for c in encoded + heldout)

    loss_start, accuracy_start = _evaluate(model, encoded, config.head, config.batch_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    generator = torch.Generator().manual_seed(config.seed)
    queue: list[int] = []
    batch_losses = []
    # Early stopping on the held-out loss: the best weights so far (a CPU copy), when, and the evaluations since.
    best: dict = {"state": None, "loss": math.inf, "step": 0, "since": 0, "curve": []}
    # Checkpoints beside the output for this exact run: the loop's whole state, so a resumed run takes the same
    # batches and steps and ends with the same weights.
    checkpoint = LoopCheckpoint(out_dir, run_fingerprint("prm", model_dir=model_dir, examples=digest(examples),
                                                          config=asdict(config)))
    first = 0
    if (resumed := checkpoint.load()) is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        generator.set_state(resumed["generator"])
        torch.set_rng_state(resumed["torch_rng"])
        queue, batch_losses, first, best = resumed["queue"], resumed["batch_losses"], resumed["step"], resumed["best"]
    model.train()
    started = time.monotonic()
    last = first
    for step in range(first, config.max_steps):
        batch = []
        while len(batch) < min(config.batch_size, len(encoded)):
            if not queue:
                queue = torch.randperm(len(encoded), generator=generator).tolist()
            batch.append(queue.pop())
        chunk = [encoded[i] for i in batch]
        step_logits = _gather(_step_logits(model, [c[0] for c in chunk], model.config.pad_token_id, device),
                              [c[1] for c in chunk])
        labels = torch.tensor([y for c in chunk for y in c[2]], device=device)
        soft = torch.tensor([s for c in chunk for s in c[3]], device=device)
        loss = _loss(step_logits, labels, soft, config.head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        batch_losses.append(loss.item())
        last = step + 1
        if heldout and (last % config.eval_every == 0 or last == config.max_steps):
            if _held_out_evaluation(model, heldout, config, device, last, best):
                break
            model.train()
        if last < config.max_steps and checkpoint.due():
            checkpoint.save(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "schedule": schedule.state_dict(), "generator": generator.get_state(),
                                   "torch_rng": torch.get_rng_state(), "queue": queue,
                                   "batch_losses": batch_losses, "step": last, "best": best})
    seconds = time.monotonic() - started
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    loss_end, accuracy_end = _evaluate(model, encoded, config.head, config.batch_size, device)
    heldout_figures = _heldout_figures(model, heldout, config, device, best, stopped_at=last)
    model.to("cpu")
    save_model_atomically(model, tokenizer, out_dir)
    checkpoint.clear()
    return {
        "examples": len(examples),
        "examples_trained": len(encoded),
        **heldout_figures,
        "steps": labels_total,
        "steps_truncated": truncated,
        "steps_sharing_a_token": merged,
        "positive_share": round(positives / labels_total, 4),
        "train_loss_start": round(loss_start, 4),
        "train_loss_end": round(loss_end, 4),
        "train_accuracy_start": round(accuracy_start, 4),
        "train_accuracy_end": round(accuracy_end, 4),
        "batch_loss_first": round(batch_losses[0], 4),
        "batch_loss_last": round(batch_losses[-1], 4),
        "optimizer_steps": last,
        "seconds_per_step": round(seconds / max(last - first, 1), 3),
        "config": asdict(config),
    }


def _held_out_evaluation(model, heldout: list[tuple], config: PRMConfig, device, step: int, best: dict) -> bool:
    """Measure the held-out loss at `step`, keep the weights if it is the lowest yet; True when patience ran out."""
    loss, accuracy = _evaluate(model, heldout, config.head, config.batch_size, device)
    best["curve"].append({"step": step, "heldout_loss": round(loss, 4), "heldout_accuracy": round(accuracy, 4)})
    if loss < best["loss"]:
        best |= {"loss": loss, "step": step, "since": 0,
                 "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        return False
    best["since"] += 1
    return config.patience > 0 and best["since"] >= config.patience


def _heldout_figures(model, heldout: list[tuple], config: PRMConfig, device, best: dict, *, stopped_at: int) -> dict:
    """The held-out split's size, the kept model's accuracy on it and the majority-class baseline to beat."""
    labels = [y for c in heldout for y in c[2]]
    if not labels:
        return {"heldout_examples": 0, "heldout_steps": 0, "heldout_loss": None, "heldout_accuracy": None,
                "heldout_majority_baseline": None, "best_step": stopped_at, "stopped_at_step": stopped_at,
                "curve": []}
    loss, accuracy = _evaluate(model, heldout, config.head, config.batch_size, device)
    share = sum(labels) / len(labels)
    return {"heldout_examples": len(heldout), "heldout_steps": len(labels), "heldout_loss": round(loss, 4),
            "heldout_accuracy": round(accuracy, 4), "heldout_majority_baseline": round(max(share, 1 - share), 4),
            "best_step": best["step"], "stopped_at_step": stopped_at, "curve": best["curve"]}


def score_steps(prm_dir_or_model, prompts: list[str], steps: list[list[str]], *,
                batch_size: int = 32) -> list[list[float]]:
    """P(good) (sigmoid for a regression head) at the end of every step of every sample.

    `prm_dir_or_model` is a PRM folder or a (model, tokenizer) pair. Samples are
    scored whole (no truncation), batched by length and right-padded by hand.
    """
    import torch

    if len(prompts) != len(steps):
        raise ValueError(f"{len(prompts)} prompts but {len(steps)} step lists")
    if isinstance(prm_dir_or_model, (str, Path)):
        model, tokenizer = load_prm(prm_dir_or_model, device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        model, tokenizer = prm_dir_or_model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    head = _head(model)
    encoded = [encode(tokenizer, p, s) for p, s in zip(prompts, steps, strict=True)]
    scores: list[list[float]] = [[] for _ in prompts]
    order = sorted((i for i in range(len(encoded)) if encoded[i][1]), key=lambda i: len(encoded[i][0]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logits = _step_logits(model, [encoded[i][0] for i in chunk], pad, device)
            probabilities = _probabilities(_gather(logits, [encoded[i][1] for i in chunk]), head).float().tolist()
            for i in chunk:
                n = len(encoded[i][1])
                scores[i], probabilities = probabilities[:n], probabilities[n:]
    model.train(was_training)
    if any(math.isnan(s) for row in scores for s in row):
        raise ValueError("the PRM produced NaN scores")
    return scores

"""DPO from the previous model on preference pairs (the DPO step of DPO-ST).

    factory dpo --pairs data/iter_1/pairs.parquet --model models/iter_0 --out models/iter_1_dpo

Reads the pairs rows (TRL's explicit-prompt format: `prompt`, `chosen`,
`rejected` strings), trains with TRL's DPOTrainer and saves the model with its
tokenizer; the command writes the lineage record. The previous model is both
the starting policy and the frozen reference (Wang et al., ACL 2024, §3.2,
beta 0.1). Its log-probs of every chosen and rejected completion are computed
once before training (`precompute_ref_log_probs`), so no second model is held
in memory and every epoch reuses them.

Where we depart from the paper:
- We add an NLL term on the chosen completion (TRL's `"sft"` loss: mean
  token NLL, weighted by `nll_weight`; 0 turns it off). Plain DPO collapsed in
  this project's prototype: the chosen answers' likelihood fell and answers
  with the wrong number of steps went from 3% to 23% (see DESIGN.md).
- Defaults follow the prototype, not the paper: lr 1e-5 over 2 epochs.
- Per-pair `weight`s are not used: DPO-ST pairs all weigh 1.0, and other
  weights are refused rather than silently ignored.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from factory.modeling import load_model
from train.common import cpu_safe_settings, save_model_atomically


@dataclass(frozen=True, kw_only=True)
class DPOTrainConfig:
    """params.yaml `dpo`."""

    learning_rate: float = 1e-5  # the prototype lost accuracy at 5e-5; start at 1e-5 to 2e-5
    epochs: int = 2  # the reference log-probs are computed once and reused by every epoch
    batch_size: int = 16  # pairs per step (each pair is two sequences)
    beta: float = 0.1  # DPO-ST's beta (Wang et al., ACL 2024)
    nll_weight: float = 1.0  # weight of the NLL term on chosen; 0 disables it (plain DPO)
    warmup_steps: int = 10
    max_length: int = 512  # prompt + completion tokens; longer sequences are truncated at the end
    seed: int = 0


def _last_epoch_mean(history: list[dict], key: str) -> float | None:
    """Mean of `key` over the log entries of the last epoch (None if it was never logged)."""
    logged = [e for e in history if key in e]
    if not logged:
        return None
    last = max(e["epoch"] for e in logged)
    values = [e[key] for e in logged if e["epoch"] > last - 1]
    return round(sum(values) / len(values), 4)


def main(*, pairs: list[dict], model_dir: str | Path, out_dir: str | Path, config: DPOTrainConfig) -> dict:
    """Train `model_dir` with DPO (+ NLL) on `pairs`, save into `out_dir`; returns the training summary."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError(f"DPO needs preference pairs; got none (model {model_dir})")
    weighted = sum(p.get("weight", 1.0) != 1.0 for p in pairs)
    if weighted:
        raise ValueError(f"{weighted} of {len(pairs)} pairs have a weight other than 1.0; plain DPO would ignore it")

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_dir)
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    # The NLL term is TRL's "sft" loss: mean token NLL of the chosen completions, added with its weight.
    losses = [("sigmoid", 1.0)] + ([("sft", config.nll_weight)] if config.nll_weight else [])
    steps_per_epoch = -(-len(pairs) // config.batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        args = DPOConfig(
            output_dir=scratch,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            beta=config.beta,
            loss_type=[name for name, _ in losses],
            loss_weights=[weight for _, weight in losses],
            max_length=config.max_length,
            precompute_ref_log_probs=True,  # reference = the starting model, scored once, not kept in memory
            logging_steps=max(1, steps_per_epoch // 4),
            seed=config.seed,
            data_seed=config.seed,
            **cpu_safe_settings(),
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
    save_model_atomically(model, tokenizer, out_dir)
    history = trainer.state.log_history
    losses_logged = [e["loss"] for e in history if "loss" in e]
    steps = trainer.state.global_step
    return {
        "train_loss": round(losses_logged[-1], 4) if losses_logged else None,
        "reward_accuracy": _last_epoch_mean(history, "rewards/accuracies"),
        "reward_margin": _last_epoch_mean(history, "rewards/margins"),
        "pairs": len(pairs),
        "steps": steps,
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "log_history": history,
        "config": asdict(config),
    }

"""Warm-up SFT: teach the base model the task's format on the gold rationales.

    factory warmup --problems data/problems.parquet --out models/iter_0

Reads the `train` split's gold rationales, trains with TRL's SFTTrainer
(prompt-completion format, loss on the completion only) and saves the model,
its tokenizer and its lineage record. With `base_model: tiny` the tokenizer and
a small Llama are first built from scratch on the task's own text.

Where we depart from a plain SFT run: training stops when greedy accuracy on
the `dev` split (decoded with the calculator, as at test time) has not risen
for `patience` evaluations, and the best model is kept. The warm-up is meant to
be converged, so that later gains are not just "more SFT".
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from factory.evaluate import EvalConfig, evaluate
from factory.modeling import TINY, TinyModelConfig, build_tiny_model, count_parameters, format_prompt, load_model
from train.common import cpu_safe_settings, save_model_atomically


@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    """params.yaml `warmup`."""

    base_model: str = TINY  # "tiny", a Hub id or a local model folder
    learning_rate: float = 2e-3
    lr_schedule: str = "linear"  # decays to 0 at max_epochs: late epochs settle instead of jittering
    max_epochs: int = 20
    batch_size: int = 32
    warmup_steps: int = 50
    weight_decay: float = 0.0
    completion_only_loss: bool = True  # False: also learn the question text (helps a model trained from scratch)
    patience: int = 2  # dev evaluations without improvement before stopping
    min_epochs: int = 1  # never stop before this: from-scratch models sit near 0% for several epochs
    min_delta: float = 0.0  # an improvement must exceed this
    dev_split: str = "dev"
    dev_max_new_tokens: int = 160
    seed: int = 0


def _tiny_tokenizer_texts(problems: list[dict]) -> list[str]:
    """Questions of the sampling pools plus gold rationales of train: never dev or test text."""
    texts = []
    for p in problems:
        if p["split"] in {"train", "answers", "unlabeled"}:
            texts.append(p["question"])
        if p["split"] == "train" and p.get("gold_rationale"):
            texts.append(p["gold_rationale"])
    return texts


class _DevAccuracyStopper:
    """A TrainerCallback that scores dev accuracy each epoch, keeps the best weights and stops on a plateau."""

    def __init__(self, tokenizer, dev: list[dict], config: WarmupConfig):
        from transformers import TrainerCallback

        self.tokenizer, self.dev, self.config = tokenizer, dev, config
        self.eval_config = EvalConfig(splits=(config.dev_split,), max_new_tokens=config.dev_max_new_tokens)
        self.history: list[dict] = []
        self.best_accuracy = -1.0
        self.best_state = None
        self.stale = 0
        self.started = time.monotonic()
        stopper = self

        class Callback(TrainerCallback):
            def on_epoch_end(self, args, state, control, model=None, **kwargs):
                stopper.score(model, state, control)

        self.callback = Callback()

    def score(self, model, state, control) -> None:
        evaluation = evaluate(model, self.tokenizer, self.dev, self.eval_config, show_progress=False)
        accuracy = evaluation.scores[self.config.dev_split].accuracy
        epoch = round(state.epoch)
        losses = [e["loss"] for e in state.log_history if "loss" in e and epoch - 1 < e["epoch"] <= epoch]
        self.history.append(
            {
                "epoch": epoch,
                "dev_accuracy": round(accuracy, 4),
                "train_loss": round(sum(losses) / len(losses), 4) if losses else None,
            }
        )
        elapsed = time.monotonic() - self.started
        print(f"epoch {state.epoch:.0f}: dev accuracy {accuracy:.3f} ({elapsed:.0f}s)", flush=True)
        if accuracy > self.best_accuracy + self.config.min_delta:
            self.best_accuracy, self.stale = accuracy, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
            if self.stale >= self.config.patience and epoch >= self.config.min_epochs:
                control.should_training_stop = True


def main(
    *, problems: list[dict], out_dir: str | Path, config: WarmupConfig, tiny: TinyModelConfig
) -> dict:
    """Train the warm-up model into `out_dir`; returns its training summary (curve, best epoch)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    train_rows = [p for p in problems if p["split"] == "train" and p.get("gold_rationale")]
    dev_rows = [p for p in problems if p["split"] == config.dev_split and p.get("gold_answer")]
    if not train_rows:
        raise ValueError("warm-up needs problems in split 'train' with gold_rationale; found none")
    if not dev_rows:
        raise ValueError(f"warm-up needs problems in split {config.dev_split!r} with gold_answer; found none")

    torch.manual_seed(config.seed)
    if config.base_model == TINY:
        from factory.modeling import train_tokenizer

        tokenizer = train_tokenizer(_tiny_tokenizer_texts(problems), tiny.vocab_size)
        model = build_tiny_model(tokenizer, tiny)
    else:
        model, tokenizer = load_model(config.base_model)
    print(f"warm-up: {count_parameters(model) / 1e6:.2f}M parameters, {len(train_rows)} train problems", flush=True)

    steps_per_epoch = -(-len(train_rows) // config.batch_size)
    dataset = Dataset.from_list(
        [{"prompt": format_prompt(tokenizer, p["question"]), "completion": p["gold_rationale"]} for p in train_rows]
    )
    stopper = _DevAccuracyStopper(tokenizer, dev_rows, config)
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            num_train_epochs=config.max_epochs,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_schedule,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            max_length=tiny.max_length if config.base_model == TINY else 1024,
            completion_only_loss=config.completion_only_loss,
            logging_steps=max(1, steps_per_epoch // 4),
            seed=config.seed,
            data_seed=config.seed,
            **cpu_safe_settings(),
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[stopper.callback]
        )
        trainer.train()
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    save_model_atomically(model, tokenizer, out_dir)
    best = max(stopper.history, key=lambda h: h["dev_accuracy"])
    return {
        "curve": stopper.history,
        "best_epoch": best["epoch"],
        "dev_accuracy": best["dev_accuracy"],
        "parameters": count_parameters(model),
        "train_problems": len(train_rows),
        "config": asdict(config),
    }

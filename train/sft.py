"""SFT with TRL, scored on dev accuracy: the warm-up and the self-training step.

    factory base   --problems data/problems.parquet --out models/base
    factory warmup --problems data/problems.parquet --base models/base --out models/iter_0

`build_base` makes the base model: with `base_model: tiny`, a tokenizer and a
small Llama, pretrained on a corpus disjoint from the task (`train.pretrain`); otherwise a Hub id or
local folder, saved as it is, or a GGUF file, dequantized and saved as an
ordinary HF folder with its tokenizer and chat template. `train_sft` fine-tunes a model on (question,
rationale) examples with TRL's SFTTrainer (prompt-completion format). The
warm-up trains the base on the `train` split's gold rationales; DPO-ST's
self-training step (`train/iteration.py`) trains the base again on gold plus
the model's own correct samples.

Where we depart from a plain SFT run: greedy accuracy on the `dev` split
(decoded with the calculator, as at test time) is scored during training and
the best weights are kept. The warm-up scores each epoch and stops when dev
accuracy has not risen for `patience` evaluations, so that it is converged and
later gains are not just "more SFT". The self-training step runs a fixed number
of optimizer steps instead, so recipes compare at equal training compute.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from factory.evaluate import EvalConfig, evaluate
from factory.modeling import (TINY, TinyModelConfig, build_tiny_model, count_parameters, format_completion,
                              format_prompt, load_model, trainer_tokenizer)
from train.common import (Checkpoints, LoRASettings, cpu_safe_settings, digest, frozen_base_dtype, is_lora,
                          is_main_process, on_main_process, run_fingerprint, save_model_atomically)
from train.pretrain import PretrainConfig


@dataclass(frozen=True, kw_only=True)
class SFTRunConfig:
    """How one SFT run trains and is scored on dev (shared by params `warmup` and `self_train`)."""

    learning_rate: float = 3e-3  # the tiny model; a real pretrained one (SmolLM2, Qwen) wants ~1e-5
    lr_schedule: str = "linear"  # decays to 0 at the end: late epochs settle instead of jittering
    batch_size: int = 16
    warmup_steps: int = 50
    weight_decay: float = 0.0
    completion_only_loss: bool = False  # False: also learn the question text (helps the tiny model read the task)
    dev_split: str = "dev"
    dev_max_new_tokens: int = 128
    seed: int = 0
    lora: LoRASettings = LoRASettings()  # off: full fine-tuning; on: LoRA adapters, saved merged


@dataclass(frozen=True, kw_only=True)
class WarmupConfig(SFTRunConfig):
    """params.yaml `warmup`: epochs with early stopping on dev accuracy."""

    base_model: str = TINY  # "tiny", a Hub id, a local model folder or a GGUF file (saved as an HF folder)
    max_epochs: int = 16
    patience: int = 3  # dev evaluations without improvement before stopping
    min_epochs: int = 8  # never stop before this: the tiny model needs a few epochs to read the task's stories
    min_delta: float = 0.0  # an improvement must exceed this


def _tiny_tokenizer_texts(problems: list[dict]) -> list[str]:
    """Questions of the sampling pools plus gold rationales of train: never dev or test text."""
    texts = []
    for p in problems:
        if p["split"] in {"train", "answers", "unlabeled"}:
            texts.append(p["question"])
        if p["split"] == "train" and p.get("gold_rationale"):
            texts.append(p["gold_rationale"])
    return texts


def build_base(*, problems: list[dict], base_model: str, tiny: TinyModelConfig, out_dir: str | Path,
               pretraining: PretrainConfig | None = None, task_families: tuple[str, ...] = ()) -> dict:
    """Save the base model (the start of the warm-up and of every self-training step) into `out_dir`.

    The tiny model is pretrained (`train.pretrain`) unless `pretraining` is None or has 0 steps.
    """
    if base_model != TINY:
        model, tokenizer = load_model(base_model)
        save_model_atomically(model, tokenizer, out_dir)
        return {"parameters": count_parameters(model), "vocab_size": len(tokenizer)}
    from factory.modeling import train_tokenizer
    from train.pretrain import check_disjoint, corpus, pretrain

    pretraining = pretraining or PretrainConfig(steps=0)
    texts = _tiny_tokenizer_texts(problems)
    documents = []
    if pretraining.steps:
        check_disjoint(pretraining, task_families)
        bootstrap = train_tokenizer(texts, tiny.vocab_size)  # formats the corpus' chat turns; BPE merges aside
        documents = corpus(pretraining, bootstrap, {p["question"] for p in problems})
    tokenizer = train_tokenizer(texts + documents, tiny.vocab_size)
    model = build_tiny_model(tokenizer, tiny)
    summary = {"parameters": count_parameters(model), "vocab_size": len(tokenizer)}
    if not pretraining.steps:
        save_model_atomically(model, tokenizer, out_dir)
        return summary
    return summary | pretrain(model, tokenizer, documents, pretraining, out_dir)


def gold_examples(problems: list[dict]) -> list[dict]:
    """(question, rationale) examples from the `train` split's gold rationales."""
    return [
        {"problem_id": p["problem_id"], "question": p["question"], "rationale": p["gold_rationale"]}
        for p in problems
        if p["split"] == "train" and p.get("gold_rationale")
    ]


def dev_problems(problems: list[dict], split: str) -> list[dict]:
    dev = [p for p in problems if p["split"] == split and p.get("gold_answer")]
    if not dev:
        raise ValueError(f"SFT scores dev accuracy on split {split!r} with gold_answer; found no such problems")
    return dev


class _DevScorer:
    """A TrainerCallback that scores dev accuracy, keeps the best weights and (optionally) stops on a plateau.

    It scores at each epoch's end, or every `every_steps` optimizer steps (and
    at the last step) when that is set. Under `accelerate launch` the main
    process scores, and alone keeps the best weights (it saves the model); every
    process gets its accuracy, so all stop at the same step.
    """

    def __init__(self, tokenizer, dev: list[dict], config: SFTRunConfig, *, every_steps: int = 0,
                 patience: int = 0, min_epochs: int = 0, min_delta: float = 0.0):
        from transformers import TrainerCallback

        self.tokenizer, self.dev, self.split = tokenizer, dev, config.dev_split
        self.eval_config = EvalConfig(splits=(config.dev_split,), max_new_tokens=config.dev_max_new_tokens)
        self.every_steps, self.patience, self.min_epochs, self.min_delta = every_steps, patience, min_epochs, min_delta
        self.history: list[dict] = []
        self.best_accuracy = -1.0
        self.best_state = None
        self.stale = 0
        self.started = time.monotonic()
        scorer = self

        class Callback(TrainerCallback):
            def on_epoch_end(self, args, state, control, model=None, **kwargs):
                if not scorer.every_steps:
                    scorer.score(model, state, control)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                step = state.global_step
                if scorer.every_steps and (step % scorer.every_steps == 0 or step == state.max_steps):
                    scorer.score(model, state, control)

        self.callback = Callback()

    def state(self) -> dict:
        """What a resumed run needs to score on as this one would: saved with each checkpoint."""
        return {"history": self.history, "best_accuracy": self.best_accuracy, "best_state": self.best_state,
                "stale": self.stale}

    def restore(self, state: dict) -> None:
        self.history, self.best_accuracy = state["history"], state["best_accuracy"]
        self.best_state, self.stale = state["best_state"], state["stale"]

    def score(self, model, state, control) -> None:
        accuracy = on_main_process(lambda: evaluate(model, self.tokenizer, self.dev, self.eval_config,
                                                    show_progress=False).scores[self.split].accuracy)
        previous = self.history[-1]["step"] if self.history else 0
        losses = [e["loss"] for e in state.log_history if "loss" in e and previous < e["step"] <= state.global_step]
        self.history.append({
            "epoch": round(state.epoch, 2),
            "step": state.global_step,
            "dev_accuracy": round(accuracy, 4),
            "train_loss": round(sum(losses) / len(losses), 4) if losses else None,
        })
        elapsed = time.monotonic() - self.started
        main = is_main_process()
        if main:
            print(f"step {state.global_step} (epoch {state.epoch:.1f}): dev accuracy {accuracy:.3f} ({elapsed:.0f}s)",
                  flush=True)
        if accuracy > self.best_accuracy + self.min_delta:
            self.best_accuracy, self.stale = accuracy, 0
            if main and is_lora(model):  # only the adapters train: keep them, not a copy of the whole base
                self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            elif main:  # it alone saves the model
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
            if self.patience and self.stale >= self.patience and state.epoch >= self.min_epochs:
                control.should_training_stop = True


def train_sft(
    *,
    model_dir: str | Path,
    examples: list[dict],
    dev: list[dict],
    out_dir: str | Path,
    config: SFTRunConfig,
    epochs: int = 1,
    max_steps: int = 0,
    score_every_steps: int = 0,
    patience: int = 0,
    min_epochs: int = 0,
    min_delta: float = 0.0,
) -> dict:
    """Fine-tune `model_dir` on `examples` (dicts with question, rationale), keep the best dev weights.

    Trains `epochs` epochs, or exactly `max_steps` optimizer steps when that is
    set; returns the summary (dev curve, best point, steps, examples).
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise ValueError(f"SFT needs training examples; got none (model {model_dir})")
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_dir)
    model = frozen_base_dtype(model, config.lora)
    model.train()
    parameters = count_parameters(model)
    lora = f", LoRA r={config.lora.r}" if config.lora.enabled else ""
    print(f"SFT: {parameters / 1e6:.2f}M parameters{lora}, {len(examples)} examples", flush=True)
    steps_per_epoch = -(-len(examples) // config.batch_size)
    dataset = Dataset.from_list(
        [{"prompt": format_prompt(tokenizer, e["question"]), "completion": format_completion(tokenizer, e["rationale"])}
         for e in examples]  # the completion ends the assistant turn with the model's own end-of-turn token
    )
    scorer = _DevScorer(tokenizer, dev, config, every_steps=score_every_steps, patience=patience,
                        min_epochs=min_epochs, min_delta=min_delta)
    # Checkpoints beside the output, for this exact run only: another start model, data or schedule is another
    # fingerprint. An epoch-scored run checkpoints after an epoch's scoring, so a resumed one sees every score.
    fingerprint = run_fingerprint("sft", model_dir=model_dir, examples=digest(examples), dev=digest(dev),
                                  config=asdict(config), epochs=epochs, max_steps=max_steps,
                                  score_every_steps=score_every_steps, patience=patience, min_epochs=min_epochs,
                                  min_delta=min_delta)
    checkpoints = Checkpoints(out_dir, fingerprint, at_epoch_end=not score_every_steps, get_state=scorer.state,
                              set_state=scorer.restore)
    args = SFTConfig(
        output_dir=checkpoints.output_dir(),
        num_train_epochs=epochs,
        max_steps=max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_length=getattr(model.config, "max_position_embeddings", None) or 1024,
        completion_only_loss=config.completion_only_loss,
        logging_steps=max(1, min(steps_per_epoch, score_every_steps or steps_per_epoch) // 4),
        seed=config.seed,
        data_seed=config.seed,
        **cpu_safe_settings(),
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=trainer_tokenizer(tokenizer),
        callbacks=[scorer.callback, checkpoints.callback],  # the checkpoint's after the scorer's: it saves its state
        peft_config=config.lora.peft_config(),
    )
    checkpoints.train(trainer)

    def save_best():
        model = trainer.model  # with LoRA, the peft model around the base
        if scorer.best_state is not None:
            model.load_state_dict(scorer.best_state, strict=not is_lora(model))
        save_model_atomically(model, tokenizer, out_dir)  # LoRA: merged into the weights
        checkpoints.clear()

    on_main_process(save_best)  # under `accelerate launch`: once, and the other processes wait for the model
    best = max(scorer.history, key=lambda h: h["dev_accuracy"])
    return {
        "curve": scorer.history,
        "best_step": best["step"],
        "best_epoch": best["epoch"],
        "dev_accuracy": best["dev_accuracy"],
        "steps": trainer.state.global_step,
        "examples": len(examples),
        "parameters": parameters,
    }


def main(*, problems: list[dict], base_dir: str | Path, out_dir: str | Path, config: WarmupConfig) -> dict:
    """The warm-up: train the base on gold rationales into `out_dir`; returns its summary."""
    examples = gold_examples(problems)
    if not examples:
        raise ValueError("warm-up needs problems in split 'train' with gold_rationale; found none")
    dev = dev_problems(problems, config.dev_split)
    summary = train_sft(
        model_dir=base_dir, examples=examples, dev=dev, out_dir=out_dir, config=config, epochs=config.max_epochs,
        patience=config.patience, min_epochs=config.min_epochs, min_delta=config.min_delta,
    )
    return {**summary, "train_problems": len(examples), "config": asdict(config)}

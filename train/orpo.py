"""ORPO from the previous model on preference pairs (SIPF's training step; Hong et al., 2024).

    summary = main(pairs=rows, model_dir="models/iter_0", out_dir="models/iter_1_orpo", config=ORPORunConfig())

Reads the pairs rows (explicit-prompt format: `prompt`, `chosen`, `rejected`
strings; `pair_id` and `weight` are ignored) and trains with TRL's
`trl.experimental.orpo.ORPOTrainer`:

    loss = NLL(chosen) - beta * mean_i log sigmoid(log odds(chosen_i) - log odds(rejected_i))

where odds(y) = p(y) / (1 - p(y)) and p(y) is the completion's per-token mean
probability (exp of its mean log-prob), beta is the paper's lambda (SIPF uses
0.1). No reference model: ORPO needs none.

How TRL handles our pairs (checked against trl 1.16's source):
- Prompts are plain strings, so its `maybe_apply_chat_template` leaves them as
  they are: the prompt is used verbatim, no chat template is needed, and no
  special token is added (`add_special_tokens=False`; a BOS is prepended only
  if the tokenizer has one, and an EOS id is appended to each completion
  whose last token is not EOS). Completions here end with the model's own
  end-of-turn token (`factory.modeling.format_completion`) and TRL gets a
  tokenizer whose EOS is that token, so nothing more is appended.
- The prompt/completion boundary is found by tokenizing prompt and
  prompt+completion; when the last prompt token merges with the completion it
  goes to the completion. The odds-ratio term is over completion tokens only.
- Truncation keeps the whole prompt and cuts the completion; a prompt that
  alone fills `max_length` leaves an empty completion, whose mean log-prob is
  0/0 = NaN. Such pairs are dropped here and counted (`pairs_dropped`).

Where we depart from TRL: its NLL term is over prompt *and* completion (all
non-padding tokens of the chosen sequence). Here it is over the chosen
completion only (a token mean over the batch), as in the paper's L_SFT and
the reference implementation's `disable_prompt_loss`: every pair repeats the
prompt, and learning the question text is not the task.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from factory.modeling import format_completion, load_model, trainer_tokenizer
from train.common import (Checkpoints, LoRASettings, digest, frozen_base_dtype, last_epoch_mean,
                          on_main_process, preference_settings, run_fingerprint, save_model_atomically)


@dataclass(frozen=True, kw_only=True)
class ORPORunConfig:
    """params.yaml `orpo`."""

    beta: float = 0.1  # ORPO's lambda, the weight of the odds-ratio term (SIPF: 0.1)
    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 16  # pairs per step (each pair is two sequences)
    max_length: int = 512  # prompt + completion tokens; the completion is cut at the end
    warmup_steps: int = 10
    seed: int = 0
    lora: LoRASettings = LoRASettings()  # off: full fine-tuning; on: LoRA adapters, saved merged

    def __post_init__(self):
        if not self.beta >= 0:
            raise ValueError(f"orpo.beta must be >= 0; got {self.beta}")
        if not self.learning_rate > 0:
            raise ValueError(f"orpo.learning_rate must be > 0; got {self.learning_rate}")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2 or self.warmup_steps < 0:
            raise ValueError(f"orpo: epochs, batch_size >= 1, max_length >= 2, warmup_steps >= 0; got {self}")


def _orpo_trainer():
    """ORPOTrainer whose NLL term is over the chosen completion only."""
    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    class CompletionOnlyORPOTrainer(ORPOTrainer):
        def concatenated_forward(self, model, batch):
            if self.is_encoder_decoder:
                return super().concatenated_forward(model, batch)
            concatenated = self.concatenated_inputs(batch, is_encoder_decoder=False,
                                                    padding_value=self.padding_value, device=self.accelerator.device)
            n = batch["chosen_labels"].shape[0]
            kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
            outputs = model(concatenated["concatenated_input_ids"],
                            attention_mask=concatenated["concatenated_attention_mask"], use_cache=False, **kwargs)
            logits = outputs.logits
            labels = concatenated["concatenated_labels"]  # -100 on the prompt and the padding
            chosen_nll = F.cross_entropy(logits[:n, :-1].flatten(0, 1), labels[:n, 1:].flatten(), ignore_index=-100)
            logps = self.get_batch_logps(logits, labels, average_log_prob=True)
            result = (logps[:n], logps[n:], logits[:n, :-1], logits[n:, :-1], chosen_nll)
            return (*result, outputs.aux_loss) if self.aux_loss_enabled else result

    return CompletionOnlyORPOTrainer


def _prompt_tokens(tokenizer, prompt: str) -> int:
    """How many tokens ORPOTrainer puts before the completion: the prompt's, plus a BOS it would prepend."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return len(ids) + (bos is not None and (not ids or ids[0] != bos))


def main(*, pairs: list[dict], model_dir: str | Path, out_dir: str | Path, config: ORPORunConfig) -> dict:
    """Train `model_dir` with ORPO on `pairs`, save into `out_dir`; returns the training summary."""
    import torch
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig

    if not pairs:
        raise ValueError(f"ORPO needs preference pairs; got none (model {model_dir})")
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_dir)
    model = frozen_base_dtype(model, config.lora)
    kept = [p for p in pairs if _prompt_tokens(tokenizer, p["prompt"]) < config.max_length]
    if not kept:
        raise ValueError(f"every one of the {len(pairs)} pairs has a prompt of max_length {config.max_length} "
                         "tokens or more: nothing of the completions would be trained")
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": format_completion(tokenizer, p["chosen"]),
                                  "rejected": format_completion(tokenizer, p["rejected"])} for p in kept])
    steps_per_epoch = -(-len(kept) // config.batch_size)
    # Checkpoints beside the output, for this exact run (start model, pairs, config) only, as DPO's.
    fingerprint = run_fingerprint("orpo", model_dir=model_dir, pairs=digest(dataset.to_list()), config=asdict(config))
    checkpoints = Checkpoints(out_dir, fingerprint)
    args = ORPOConfig(
        **preference_settings(config, output_dir=checkpoints.output_dir(), steps_per_epoch=steps_per_epoch),
        remove_unused_columns=False,  # TRL's preference collator needs its own columns
    )
    trainer = _orpo_trainer()(model=model, args=args, train_dataset=dataset,
                              processing_class=trainer_tokenizer(tokenizer),
                              peft_config=config.lora.peft_config(), callbacks=[checkpoints.callback])
    started = time.monotonic()
    checkpoints.train(trainer)
    seconds = time.monotonic() - started
    model = trainer.model
    model.eval()

    def save():
        save_model_atomically(model, tokenizer, out_dir)  # LoRA: merged into the weights
        checkpoints.clear()

    on_main_process(save)  # under `accelerate launch`: once, and the other processes wait for the model
    history = trainer.state.log_history
    losses_logged = [e["loss"] for e in history if "loss" in e]
    steps = trainer.state.global_step
    return {
        "train_loss": round(losses_logged[-1], 4) if losses_logged else None,
        "reward_accuracy": last_epoch_mean(history, "rewards/accuracies"),
        "reward_margin": last_epoch_mean(history, "rewards/margins"),
        "log_odds_ratio": last_epoch_mean(history, "log_odds_ratio"),
        "log_odds_chosen": last_epoch_mean(history, "log_odds_chosen"),
        "nll_loss": last_epoch_mean(history, "nll_loss"),
        "pairs": len(kept),
        "pairs_dropped": len(pairs) - len(kept),
        "steps": steps,
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "log_history": history,
        "config": asdict(config),
    }

"""Weighted DPO + NLL from the previous model on preference pairs (DPO-ST's and ScPO's training step).

    factory dpo --pairs data/iter_1/pairs.parquet --model models/iter_0 --out models/iter_1_dpo

Reads the pairs rows (TRL's explicit-prompt format: `prompt`, `chosen`,
`rejected` strings, plus a per-pair `weight`) and trains with TRL's
DPOTrainer, whose loss we replace with ScPO's (Prasad et al., 2024):

    loss = sum_i w_i * (-log sigmoid(beta * margin_i) + alpha * NLL(chosen_i) / |chosen_i|) / sum_i w_i

over each batch, where margin_i is the chosen-minus-rejected log-ratio to the
reference and alpha is `nll_weight`. DPO-ST's pairs all weigh 1.0, which makes
it plain DPO plus a length-normalised NLL term; ScPO's weigh their vote margin.
The previous model is both the starting policy and the frozen reference
(Wang et al., ACL 2024, §3.2, beta 0.1). Its log-probs of every chosen and
rejected completion are computed once before training
(`precompute_ref_log_probs`), so no second model is held in memory and every
epoch reuses them.

Where we depart from the papers:
- The NLL term is on for DPO-ST too: plain DPO collapsed in this project's
  prototype (the chosen answers' likelihood fell and answers with the wrong
  number of steps went from 3% to 23%).
- Each finished side ends with the model's own end-of-turn token
  (`factory.modeling.format_completion`: `<|im_end|>` for a ChatML model, EOS
  for the tiny one), and TRL gets a tokenizer whose EOS is that token, so it
  appends no second one. Step-level pairs from a search tree whose sides are
  steps with more to come (`mcts_dpo`) are trained without it.
- A subclass rather than TRL's loss types: TRL 1.x has no per-example weights
  (its `use_weighting` is WPO's, computed from the policy), and its "sft" term
  is a token mean over the batch rather than a per-pair mean.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from factory.modeling import format_completion, load_model, trainer_tokenizer
from train.common import (Checkpoints, LoRASettings, digest, frozen_base_dtype, is_lora, last_epoch_mean,
                          distributed, on_main_process, preference_settings, run_fingerprint,
                          save_model_atomically, shared_dataset)


@dataclass(frozen=True, kw_only=True)
class DPOTrainConfig:
    """params.yaml `dpo`."""

    learning_rate: float = 1e-4  # the tiny from-scratch model (trained at 3e-3); DPO-ST used 3e-7 on 7B models
    epochs: int = 2  # the reference log-probs are computed once and reused by every epoch
    batch_size: int = 16  # pairs per step (each pair is two sequences)
    beta: float = 0.1  # DPO-ST's beta (Wang et al., ACL 2024)
    nll_weight: float = 1.0  # alpha: weight of the length-normalised NLL term on chosen; 0 disables it (plain DPO)
    warmup_steps: int = 10
    max_length: int = 512  # prompt + completion tokens; longer sequences are truncated at the end
    seed: int = 0
    lora: LoRASettings = LoRASettings()  # off: full fine-tuning; on: LoRA adapters, saved merged


def weighted_dpo_nll_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                          weights, *, beta: float, alpha: float):
    """sum w * (DPO loss + alpha * NLL(chosen) / |chosen|) / sum w, per pair; zero when every weight is zero.

    Log-probs are summed over each completion's tokens; `chosen_lengths` counts them.
    """
    import torch.nn.functional as F

    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    per_pair = -F.logsigmoid(beta * margin) - alpha * chosen_logps / chosen_lengths
    return (weights * per_pair).sum() / weights.sum().clamp_min(1e-12)


def open_ended(pair: dict, side: str) -> bool:
    """A tree-search step with more steps to come (`mcts_dpo`: a node's step ending with its newline).

    TRL appends EOS to every completion; trained on such a step, the model would learn to stop after it.
    """
    return bool(pair.get(f"{side}_node_id")) and pair[side].endswith("\n")


def completion(tokenizer, pair: dict, side: str) -> str:
    """One side of a pair as a training completion: closed with the model's end of turn, unless open-ended."""
    return pair[side] if open_ended(pair, side) else format_completion(tokenizer, pair[side])


def drop_appended_eos(batch: dict, rows: list[int], eos: int) -> None:
    """Take the EOS TRL appended to each of `rows` (open-ended completions) out of its completion mask."""
    mask = batch["completion_mask"]
    for row in rows:
        positions = mask[row].nonzero()
        if len(positions) and batch["input_ids"][row, positions[-1, 0]] == eos:
            mask[row, positions[-1, 0]] = 0


def _weighted_dpo_trainer():
    """DPOTrainer with `weighted_dpo_nll_loss`: the pairs' `weight` column rides along in every batch."""
    import torch
    from trl import DPOTrainer

    class WeightedDPOTrainer(DPOTrainer):
        def __init__(self, *args, nll_weight: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.nll_weight = nll_weight
            self._wrap_collator()

        def _wrap_collator(self) -> None:
            """Batches carry the pairs' weights, and open-ended sides lose their EOS (policy and reference alike)."""
            collate = self.data_collator
            if getattr(collate, "wrapped", False):
                return
            eos = self.processing_class.eos_token_id

            def collate_with_weights(examples):
                batch = collate(examples)
                batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
                open_rows = [i for i, e in enumerate(examples) if e["chosen_open"]]
                open_rows += [len(examples) + i for i, e in enumerate(examples) if e["rejected_open"]]
                drop_appended_eos(batch, open_rows, eos)
                return batch

            collate_with_weights.wrapped = True
            self.data_collator = collate_with_weights

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._wrap_collator()  # TRL precomputes inside __init__, before the subclass's own setup
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            extra = [c for c in ("weight", "chosen_open", "rejected_open") if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *extra]

        @property
        def fused_lm_head(self) -> bool:
            """TRL's fused LM head on CUDA only.

            It never holds the logits, which matters for a large vocabulary on a GPU. On a CPU it falls back to
            torch ops over every position, about ten passes per logits tile: DPO steps of the tiny model took 20%
            longer than with log_softmax over the logits (bench/trainer.py).
            """
            return self.args.device.type == "cuda"

        def completion_logps(self, model, inputs):
            """Each sequence's completion log-prob: per-token log-probs summed over its completion mask.

            The policy and the precomputed reference both come from here: the same arithmetic.
            """
            input_ids, mask = inputs["input_ids"], inputs["completion_mask"]
            if self.fused_lm_head:
                labels = input_ids.masked_fill(mask == 0, -100)
                outputs = model(input_ids=input_ids, attention_mask=inputs["attention_mask"], labels=labels,
                                use_cache=False, fused_lm_head=True)
                return outputs.log_probs[:, -(mask.size(1) - 1):].sum(dim=1)  # zero outside the completion
            logits = model(input_ids=input_ids, attention_mask=inputs["attention_mask"], use_cache=False).logits
            token_logps = logits[:, :-1].log_softmax(dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            return (token_logps * mask[:, 1:]).sum(dim=1)

        def compute_ref_log_probs(self, model, inputs):
            """The reference's log-probs: the starting model, i.e. with LoRA the base with its adapters disabled.

            They are precomputed before the first step, when fresh adapters (B = 0) change nothing anyway;
            disabling them makes the reference the base model whatever the adapters hold.
            """
            adapters_off = contextlib.nullcontext()
            if is_lora(self.model):
                adapters_off = self.accelerator.unwrap_model(self.model).disable_adapter()
            with torch.no_grad(), adapters_off, self.accelerator.autocast():
                return self.completion_logps(model, inputs).chunk(2, dim=0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logps = self.completion_logps(model, inputs)
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)
            chosen_lengths = inputs["completion_mask"][:, 1:].chunk(2, dim=0)[0].sum(dim=1).clamp_min(1)
            loss = weighted_dpo_nll_loss(chosen_logps, rejected_logps, inputs["ref_chosen_logps"],
                                         inputs["ref_rejected_logps"], chosen_lengths, inputs["weight"],
                                         beta=self.beta, alpha=self.nll_weight)
            mode = "train" if model.training else "eval"
            chosen_rewards = self.beta * (chosen_logps - inputs["ref_chosen_logps"]).detach()
            rejected_rewards = self.beta * (rejected_logps - inputs["ref_rejected_logps"]).detach()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
            metrics["nll/chosen"].append((-chosen_logps / chosen_lengths).mean().item())
            metrics["weight"].append(inputs["weight"].mean().item())
            return (loss, logps) if return_outputs else loss

    return WeightedDPOTrainer


def main(*, pairs: list[dict], model_dir: str | Path, out_dir: str | Path, config: DPOTrainConfig,
         keep_finished: bool = False) -> dict:
    """Train `model_dir` with DPO (+ NLL) on `pairs`, save into `out_dir`; returns the training summary.

    With `keep_finished` (a model trained on the way to the output, `train.iteration.dpo_beside`), a record of the
    finished run stays in its checkpoint folder instead of its checkpoints, and a run of the same fingerprint
    that finds `out_dir` holding that model returns its summary without training again (the stage was killed
    later, e.g. in the second round of sampling). Whoever moves `out_dir` away removes the record
    (`train.common.checkpoint_root`).
    """
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    if not pairs:
        raise ValueError(f"DPO needs preference pairs; got none (model {model_dir})")
    negative = [p["pair_id"] for p in pairs if p.get("weight", 1.0) < 0]
    if negative:
        raise ValueError(f"{len(negative)} pairs have a negative weight (first: {negative[0]})")

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(model_dir)
    model = frozen_base_dtype(model, config.lora)
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": completion(tokenizer, p, "chosen"),
                                  "rejected": completion(tokenizer, p, "rejected"),
                                  "weight": float(p.get("weight", 1.0)), "chosen_open": open_ended(p, "chosen"),
                                  "rejected_open": open_ended(p, "rejected")} for p in pairs])
    steps_per_epoch = -(-len(pairs) // config.batch_size)
    # Checkpoints beside the output, for this exact run (start model, pairs, config) only; a resumed run ends with
    # the same weights. The reference log-probs are recomputed from the start model, as the first run did.
    fingerprint = run_fingerprint("dpo", model_dir=model_dir, pairs=digest(dataset.to_list()), config=asdict(config))
    checkpoints = Checkpoints(out_dir, fingerprint)
    if keep_finished and (finished := checkpoints.finished(out_dir)) is not None:
        print(f"DPO: {out_dir} is this run's finished model; not trained again", flush=True)
        return finished
    if distributed():  # TRL caches the precomputed reference log-probs beside the dataset, for every process
        dataset = shared_dataset(dataset, Path(checkpoints.output_dir()) / "pairs")
    args = DPOConfig(
        **preference_settings(config, output_dir=checkpoints.output_dir(), steps_per_epoch=steps_per_epoch),
        loss_type=["sigmoid"],  # replaced by weighted_dpo_nll_loss
        precompute_ref_log_probs=True,  # reference = the starting model (LoRA: adapters off), scored once
    )
    trainer = _weighted_dpo_trainer()(model=model, args=args, train_dataset=dataset,
                                      processing_class=trainer_tokenizer(tokenizer),
                                      nll_weight=config.nll_weight, peft_config=config.lora.peft_config(),
                                      callbacks=[checkpoints.callback])
    started = time.monotonic()
    checkpoints.train(trainer)
    seconds = time.monotonic() - started
    history = trainer.state.log_history
    losses_logged = [e["loss"] for e in history if "loss" in e]
    steps = trainer.state.global_step
    summary = {
        "train_loss": round(losses_logged[-1], 4) if losses_logged else None,
        "reward_accuracy": last_epoch_mean(history, "rewards/accuracies"),
        "reward_margin": last_epoch_mean(history, "rewards/margins"),
        "pairs": len(pairs),
        "steps": steps,
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "log_history": history,
        "config": asdict(config),
    }

    def save():
        save_model_atomically(trainer.model, tokenizer, out_dir)  # LoRA: merged into the weights
        checkpoints.clear()
        if keep_finished:
            checkpoints.mark_finished(out_dir, summary)

    on_main_process(save)  # under `accelerate launch`: once, and the other processes wait for the model
    return summary

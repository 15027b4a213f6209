"""What every trainer shares: CPU-safe TRL settings, the LoRA option and atomic model saving."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """The `lora` key of params `warmup`, `self_train`, `dpo` and `orpo`: train LoRA adapters through `peft`.

    Off unless `enabled`; the other defaults are TRL's own (`--use_peft --lora_r 16 --lora_alpha 32
    --lora_dropout 0.05`), with every linear layer but the output head adapted (peft's "all-linear").
    `peft_config()` is the `peft.LoraConfig` handed to the TRL trainer as `peft_config=`, the way TRL
    takes it. LoRA learning rates are usually about 10x a full fine-tune's: set the trainer's own
    `learning_rate` with it.

    The trained model is saved with its adapters merged into the weights (`save_model_atomically`),
    as a plain HF folder: its model_id is the hash of those weights like any other model's, its
    lineage records these settings in the trainer's params, and sampling, eval, vLLM and the next
    iteration load it as they load any model, with no base model to find and no adapter to apply.
    An adapter folder plus the base's id would be smaller, but every consumer would need peft and
    the base at hand, and the next iteration's LoRA would have to stack on it or merge it anyway.
    """

    enabled: bool = False
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling: the update is (alpha / r) * B @ A
    dropout: float = 0.05  # on the adapters' input
    target_modules: str | tuple[str, ...] = "all-linear"  # or module names, e.g. [q_proj, v_proj]

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(f"lora: r >= 1, alpha > 0, 0 <= dropout < 1 and some target_modules; got {self}")

    def peft_config(self):
        """peft's LoraConfig for TRL's `peft_config=`, or None when LoRA is off (full fine-tuning)."""
        if not self.enabled:
            return None
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, bias="none")


def frozen_base_dtype(model, lora: LoRASettings):
    """`model` (as `load_model` gives it: fp32, on the CPU) ready for the trainer to move to its device.

    LoRA on a GPU keeps the frozen base in bf16, half the memory of fp32 (peft makes the adapters fp32,
    and the trainer's bf16 autocast runs the forward); full fine-tuning, and anything on a CPU, is left
    in fp32, as before.
    """
    import torch

    if lora.enabled and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return model.to(torch.bfloat16)
    return model


def is_lora(model) -> bool:
    """Whether `model` is a peft model (the trainer wrapped it in LoRA adapters)."""
    return type(model).__module__.startswith("peft.")


def merge_lora(model):
    """`model` as a plain transformers model: a peft model's adapters merged into its weights.

    The merge is done in fp32 on the CPU, so a bf16 GPU base takes the small adapter update exactly,
    and the merged model is saved in fp32 like every other model here. A plain model is returned as is.
    """
    if not is_lora(model):
        return model
    import torch

    return model.to(device="cpu", dtype=torch.float32).merge_and_unload()


def cpu_safe_settings() -> dict:
    """TrainingArguments that keep TRL fast and quiet on a CPU (its defaults assume a bf16 GPU).

    TRL 1.x defaults to bf16 and gradient checkpointing, about 20x slower on a
    CPU without bf16; checkpoints and loggers are off because DVC owns outputs.
    """
    import dataclasses

    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    # transformers 5 renamed gradient_checkpointing (the old name still works, with a warning).
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {
        checkpointing: False,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "fp16": False,
        "use_cpu": not on_gpu,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
    }


def save_model_atomically(model, tokenizer, out_dir: str | Path) -> Path:
    """Save weights and tokenizer to a sibling temp folder, then swap it into place.

    A LoRA model is saved merged (`merge_lora`): a plain model folder, never an adapter folder.
    """
    out_dir = Path(out_dir)
    model = merge_lora(model)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    # How the tokenizer was loaded (offline or not) is not part of it: left in, it would make the
    # saved bytes, the model_id and every sample id depend on HF_HUB_OFFLINE.
    tokenizer.init_kwargs.pop("local_files_only", None)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def last_epoch_mean(history: list[dict], key: str) -> float | None:
    """Mean of `key` over the log entries of the last epoch (None if it was never logged)."""
    logged = [e for e in history if key in e]
    if not logged:
        return None
    last = max(e["epoch"] for e in logged)
    values = [e[key] for e in logged if e["epoch"] > last - 1]
    return round(sum(values) / len(values), 4)

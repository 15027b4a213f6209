"""What every trainer shares: CPU-safe TRL settings and atomic model saving."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
    """Save weights and tokenizer to a sibling temp folder, then swap it into place."""
    out_dir = Path(out_dir)
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

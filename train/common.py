"""What every trainer shares: CPU-safe TRL settings, the LoRA option, atomic model saving, checkpoints, and
what keeps a run under `accelerate launch` (N processes, one per GPU) writing each file once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


WALL_CLOCK = ("seconds_per_step",)  # timings a trainer reports: for logs and benchmarks, never an output's bytes


def outcome(metrics: dict) -> dict:
    """A trainer's metrics without its wall-clock timings, for lineage and summaries (the same bytes every run)."""
    timings = {k: metrics[k] for k in WALL_CLOCK if k in metrics}
    if timings:
        print("train: " + ", ".join(f"{k} {v}" for k, v in timings.items()), flush=True)
    return {k: v for k, v in metrics.items() if k not in WALL_CLOCK}


def preference_settings(config, *, output_dir: str, steps_per_epoch: int) -> dict:
    """The TrainingArguments DPO and ORPO share: epochs, batch, rate, beta, length, seeds, CPU-safe defaults."""
    return {"output_dir": output_dir, "num_train_epochs": config.epochs,
            "per_device_train_batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "warmup_steps": config.warmup_steps, "beta": config.beta, "max_length": config.max_length,
            "logging_steps": max(1, steps_per_epoch // 4), "seed": config.seed, "data_seed": config.seed,
            **cpu_safe_settings()}


# Under `accelerate launch` or torchrun every process runs the whole command. The main process alone samples a
# second round and scores dev accuracy while the others wait in a collective, which would give up after torch's
# default 30 minutes; this is how long they wait instead.
DISTRIBUTED_TIMEOUT_SECONDS = 12 * 3600


def distributed() -> bool:
    """Whether this process is one of several that `accelerate launch` or torchrun started (WORLD_SIZE > 1).

    A plain run never touches accelerate's process state here: its path, and so its bytes, stay as they were.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _process_state():
    """accelerate's process state, set up as Trainer sets it up (gloo on CPUs), with the long timeout."""
    import datetime

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(),
                        timeout=datetime.timedelta(seconds=DISTRIBUTED_TIMEOUT_SECONDS))


def is_main_process() -> bool:
    """Whether this process writes the files (a plain run's one process; rank 0 of a distributed one)."""
    return not distributed() or _process_state().is_main_process


def process_index() -> int:
    return _process_state().process_index if distributed() else 0


def wait_for_everyone() -> None:
    if distributed():
        _process_state().wait_for_everyone()


def shared_dataset(dataset, folder: Path):
    """`dataset` (in memory) saved by the main process into `folder` and read back by every process.

    What TRL maps over an in-memory dataset is cached in each process's own temp folder, under a random name, so
    the reference log-probs that DPOTrainer's main process precomputes and caches would be found by no other;
    over a dataset in one folder, the cache files are named by their fingerprint, beside it, for all to read.
    """
    from datasets import load_from_disk

    def save():
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's
        dataset.save_to_disk(str(folder))

    on_main_process(save)
    return load_from_disk(str(folder))


def on_main_process(work: Callable[[], Any]) -> Any:
    """`work()` run by the main process alone, its result handed to every process, the others waiting for it.

    For what writes files (models, lineage, tables) and what every process must agree on (dev accuracy, when to
    checkpoint). Every process must call it at the same point. An error in `work` is raised in every process, so
    none waits for ever.
    """
    if not distributed():
        return work()
    from accelerate.utils import broadcast_object_list

    result: list = [None]
    if _process_state().is_main_process:
        try:
            result = [(True, work())]
        except Exception as error:  # handed to the others, then raised here too
            result = [(False, error)]
    broadcast_object_list(result)
    done, value = result[0]
    if not done:
        raise value
    return value


def cpu_safe_settings() -> dict:
    """TrainingArguments that keep TRL fast and quiet on a CPU (its defaults assume a bf16 GPU).

    TRL 1.x defaults to bf16 and gradient checkpointing, about 20x slower on a
    CPU without bf16; loggers are off, and so is Trainer's own save schedule: `Checkpoints` decides when to
    save (by time), beside the output that DVC owns.
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
        "ddp_timeout": DISTRIBUTED_TIMEOUT_SECONDS,  # a distributed run only: see DISTRIBUTED_TIMEOUT_SECONDS
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
    from factory.io import remove_stale

    remove_stale(out_dir.parent, f".{out_dir.name}.tmp-")  # a save killed half-way (its writer is gone)
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


# How often a long training run checkpoints, in seconds of training (default: every 10 minutes). A property of
# the machine, not of the output, so it is an environment variable rather than a params key: it changes no
# stage's params and no lineage. 0 checkpoints at every opportunity (the resume tests); "off" never.
CHECKPOINT_SECONDS_ENV = "FACTORY_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_SECONDS = 600.0
_COMPLETE = "checkpoint-complete.json"  # written last, atomically: a checkpoint folder without it is partial
_EXTRA = "factory-state.pt"
_FINISHED = "finished.json"  # the finished model a run left in place (`Checkpoints.mark_finished`)


def _extra_file() -> str:
    """This process's file of what Trainer's checkpoint lacks: one per process in a distributed run."""
    return f"factory-state-{process_index()}.pt" if distributed() else _EXTRA


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where the checkpoints of a training run writing `out_dir` live: `.NAME.checkpoints` beside it.

    Beside the output, not in it, as sampling shards are (`factory.shards`): DVC clears a stage's outputs
    before re-running it, and a killed run's checkpoints must outlive that.
    """
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.checkpoints")


def checkpoint_seconds() -> float | None:
    value = os.environ.get(CHECKPOINT_SECONDS_ENV, "").strip().lower()
    if not value:
        return DEFAULT_CHECKPOINT_SECONDS
    if value in {"off", "no", "none", "never"}:
        return None
    seconds = float(value)
    if seconds < 0:
        raise ValueError(f"{CHECKPOINT_SECONDS_ENV} must be >= 0 seconds or 'off', got {value!r}")
    return seconds


def digest(value) -> str:
    """A stable hash of a JSON-able value (rows, configs): part of a run's checkpoint fingerprint."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_fingerprint(kind: str, *, model_dir: str | Path | None, **parts) -> str:
    """What makes a training run's output: its kind, starting model (its weights' id; None for one built in
    memory, which `parts` then describes), data, config, and the library versions. Checkpoints of a run with
    another fingerprint are never resumed."""
    import torch
    import transformers
    import trl

    from factory.lineage import model_id

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    start = model_id(model_dir) if model_dir is not None else None
    return digest({"kind": kind, "model": start, "versions": versions, **parts})[:16]


class Checkpoints:
    """Checkpoints of one Trainer run in `.OUT.checkpoints/<fingerprint>/`, and resuming from the last one.

    Trainer saves `checkpoint-N/` (weights, optimizer, scheduler, RNG states, trainer state) whenever the
    callback asks it to, at most every `checkpoint_seconds()` of training, and never at the run's last step;
    with `at_epoch_end` (an epoch-scored run), an epoch's last step is saved after the epoch's end, once the
    callbacks before this one have scored it, never between the two. After Trainer's
    files, the callback writes what else the run needs to continue exactly as if never stopped: the loss not yet
    logged (so later log entries are the same), and `get_state()` of the caller (e.g. the dev scorer's best
    weights), then a completion marker, atomically; then older checkpoints go. A folder without the marker (a
    save the kill cut short) is never resumed and is removed. `clear()` removes every checkpoint of the output
    once its final model is saved (those of killed runs with other fingerprints too).

    Resuming gives the same final weights, bit for bit on a CPU: data order, dropout and every other RNG are
    restored by Trainer (seeded sampler per epoch, RNG states), the optimizer and schedule by their states.

    Under `accelerate launch` the main process decides when to save and which checkpoint to resume, for all;
    each process saves its own unlogged loss (`factory-state-RANK.pt`), and the marker follows them all.
    """

    def __init__(self, out_dir: str | Path, fingerprint: str, *, at_epoch_end: bool = False,
                 get_state: Callable[[], dict] | None = None, set_state: Callable[[dict], None] | None = None):
        self.root = checkpoint_root(out_dir).absolute()
        self.folder = self.root / fingerprint
        self.fingerprint = fingerprint
        self.interval = checkpoint_seconds()
        self.at_epoch_end = at_epoch_end
        self.get_state, self.set_state = get_state, set_state
        self.trainer = None
        self.resumed_from: Path | None = None
        self.callback = self._callback()

    def output_dir(self) -> str:
        """Trainer's `output_dir`: the fingerprint's folder (Trainer writes nothing else there with saves off)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return str(self.folder)

    def last(self) -> Path | None:
        """The newest complete checkpoint of this run, or None; partial ones are removed."""
        if not self.folder.is_dir():
            return None
        found = sorted((f for f in self.folder.glob("checkpoint-*") if f.is_dir() and f.name[11:].isdigit()),
                       key=lambda f: int(f.name[11:]))
        complete = [f for f in found if (f / _COMPLETE).is_file()]
        for f in found:
            if not complete or f != complete[-1]:
                shutil.rmtree(f, ignore_errors=True)
        return complete[-1] if complete else None

    def train(self, trainer):
        """`trainer.train()`, resumed from the last complete checkpoint of this run if there is one."""
        self.trainer = trainer
        checkpoint = on_main_process(self.last)  # removes partial ones: once, and every process resumes the same
        if checkpoint is not None:
            self.resumed_from = checkpoint
            print(f"resuming from {checkpoint}", flush=True)
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    def finished(self, out_dir: str | Path) -> dict | None:
        """The summary `mark_finished` recorded, if `out_dir` still holds the model this run finished; else None."""
        from factory.lineage import model_id

        record = self.root / _FINISHED
        try:
            finished = json.loads(record.read_text())
            if finished["fingerprint"] == self.fingerprint and finished["model_id"] == model_id(out_dir):
                return finished["summary"]
        except (OSError, ValueError, KeyError):
            pass
        return None

    def mark_finished(self, out_dir: str | Path, summary: dict) -> None:
        """Record that `out_dir` holds this run's finished model (its id) and its summary (JSON-able)."""
        from factory.io import write_text
        from factory.lineage import model_id

        self.root.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": self.fingerprint, "model_id": model_id(out_dir), "summary": summary}
        write_text(self.root / _FINISHED, json.dumps(record) + "\n")

    def clear(self) -> None:
        """Remove the checkpoints of this output (the final model is saved) and any a killed writer left."""
        shutil.rmtree(self.root, ignore_errors=True)
        from factory.io import remove_stale

        remove_stale(self.root.parent, f".{self.root.name}.tmp-")

    def _callback(self):
        from transformers import TrainerCallback

        owner = self

        class CheckpointCallback(TrainerCallback):
            def __init__(self):
                self.last_save = time.monotonic()

            def _due(self, state, control) -> bool:
                if owner.interval is None or control.should_training_stop or state.global_step >= state.max_steps:
                    return False
                # The main process's clock decides: every process saves, or none.
                return on_main_process(lambda: time.monotonic() - self.last_save >= owner.interval)

            def on_train_begin(self, args, state, control, **kwargs):
                self.last_save = time.monotonic()
                if owner.resumed_from is not None:
                    owner._restore(owner.resumed_from)

            def on_step_end(self, args, state, control, **kwargs):
                # An epoch-scored run's last step of an epoch waits for the epoch's end: a checkpoint there would
                # resume in the next epoch, and the scoring of this one would never happen.
                if owner.at_epoch_end and float(state.epoch).is_integer():
                    return
                if self._due(state, control):
                    control.should_save = True

            def on_epoch_end(self, args, state, control, **kwargs):
                if owner.at_epoch_end and self._due(state, control):
                    control.should_save = True

            def on_save(self, args, state, control, **kwargs):
                owner._complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                self.last_save = time.monotonic()

        return CheckpointCallback()

    def _complete(self, checkpoint: Path) -> None:
        import torch

        from factory.io import atomic_path, write_text

        trainer = self.trainer
        extra = {"tr_loss": trainer._tr_loss.detach().clone(), "total_loss_scalar": trainer._total_loss_scalar,
                 "globalstep_last_logged": trainer._globalstep_last_logged,
                 "caller": self.get_state() if self.get_state else None}
        with atomic_path(checkpoint / _extra_file()) as tmp:
            torch.save(extra, tmp)
        wait_for_everyone()  # every process's state is in before the marker says the checkpoint is complete

        def mark_complete():
            write_text(checkpoint / _COMPLETE, json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for older in self.folder.glob("checkpoint-*"):
                if older != checkpoint:
                    shutil.rmtree(older, ignore_errors=True)

        on_main_process(mark_complete)

    def _restore(self, checkpoint: Path) -> None:
        import torch

        extra = torch.load(checkpoint / _extra_file(), weights_only=False)
        trainer = self.trainer
        trainer._tr_loss = extra["tr_loss"].to(trainer._tr_loss.device)
        trainer._total_loss_scalar = extra["total_loss_scalar"]
        trainer._globalstep_last_logged = extra["globalstep_last_logged"]
        if self.set_state and extra["caller"] is not None:
            self.set_state(extra["caller"])


class LoopCheckpoint:
    """Checkpoints of a training loop of our own (the PRM's): one file, `.OUT.checkpoints/<fingerprint>/step-N.pt`.

    `save(step, state)` writes the loop's whole state (a dict for torch.save: weights, optimizer, schedule,
    RNG states, data queue) atomically when `checkpoint_seconds()` have passed since the last save, then
    removes the older file; `load()` gives the newest state (or None) to continue from, the same way Trainer's
    resume does; `clear()` removes them all once the model is saved.
    """

    def __init__(self, out_dir: str | Path, fingerprint: str):
        self.root = checkpoint_root(out_dir).absolute()
        self.folder = self.root / fingerprint
        self.interval = checkpoint_seconds()
        self.last_save = time.monotonic()

    def _files(self) -> list[Path]:
        found = [f for f in self.folder.glob("step-*.pt") if f.name[5:-3].isdigit()]
        return sorted(found, key=lambda f: int(f.name[5:-3]))

    def load(self) -> dict | None:
        import torch

        files = self._files() if self.folder.is_dir() else []
        if not files:
            return None
        print(f"resuming from {files[-1]}", flush=True)
        return torch.load(files[-1], weights_only=False)

    def due(self) -> bool:
        return self.interval is not None and time.monotonic() - self.last_save >= self.interval

    def save(self, step: int, state: dict) -> None:
        import torch

        from factory.io import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for older in self._files():
            if older != path:
                older.unlink(missing_ok=True)
        self.last_save = time.monotonic()

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

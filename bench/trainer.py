"""Trainer benchmark: DPO throughput of train/dpo.py (TRL) against a minimal hand-written PyTorch DPO loop.

Run from the repository root (defaults: 256 pairs, params.yaml `dpo` and `model`, 3 runs per side, about 3 minutes):

    python bench/trainer.py
    python bench/trainer.py --pairs 128 --repeats 1                  # a quick run
    python bench/trainer.py --models params,wide --json bench/results/trainer.json
    python bench/trainer.py --threads 1   # steadier while other jobs share the cores

Inputs, built once per model with the project's code: arith problems from
params.yaml `problems.arith`; the base model as `factory base` makes it
(`build_base`: a BPE tokenizer trained on the task, a from-scratch Llama sized
by params.yaml `model`, or `wide`: hidden 256, MLP 688); one pair per train
problem, prompt in the model's chat format, chosen its gold rationale, rejected
another problem's (a wrong rationale of the same shape), weight 1.

Both sides start from that saved model (`load_model`), with params.yaml `dpo`
(learning rate, epochs, batch size, beta, NLL weight, warm-up steps, seed):

- train/: `train.dpo.main`, the function `factory dpo` and `factory train`
  call: TRL's DPOTrainer subclass with `precompute_ref_log_probs`.
- hand-written: the same loss (`weighted_dpo_nll_loss`) in a plain loop:
  tokenize, one no-grad pass for the reference log-probs, then the epochs over
  TRL's data order (a permutation seeded by seed + epoch), right-padded
  batches of chosen then rejected, logits -> log_softmax -> gather, AdamW
  (fused, TRL's defaults), gradient clipping at 1.0, linear warm-up and decay.

Throughput is training tokens per second: prompt + completion tokens of chosen
and rejected (no padding) in every training forward, counted by a forward hook
on the model, divided by
- `loop`: the epochs alone (TRL's `Trainer.train`; the hand loop's epochs), the
  headline ratio;
- `with setup`: tokenization + the reference pass + the epochs.
Model load and save are excluded from both. The reference pass is timed on its
own; the hook counts no-grad forwards, which shows the reference log-probs are
computed once, before the first epoch, and never again.

Each run is a fresh subprocess (TRL caches reference log-probs per process by
dataset and model fingerprint, so a second run in one process would skip
them), alternating which side goes first; the figures are medians over runs.
The script checks that both sides trained on identical batches and compares
the two trained models' weights. On a 2-core machine another busy process
slows a 2-thread torch process several-fold, whichever side is running: read
the per-repeat ratios, or use `--threads 1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's factory and train, run from anywhere

from factory.modeling import TinyModelConfig, format_prompt  # noqa: E402
from factory.params import load_params, section  # noqa: E402
from train.dpo import DPOTrainConfig  # noqa: E402

WIDE = {"hidden_size": 256, "intermediate_size": 688}  # TinyModelConfig's own default width: 3.4M parameters
SIDES = ("train/", "hand-written")


# --- inputs -------------------------------------------------------------------------------------

def build_inputs(workdir: Path, *, n_pairs: int, model: str, params: dict) -> tuple[Path, Path]:
    """The base model folder and a pairs JSON file, made as the pipeline makes them."""
    from factory.modeling import load_model
    from factory.problems.arith import ArithConfig, generate_problems
    from train.sft import build_base

    arith = section(params.get("problems", {}), "arith", ArithConfig)
    problems = generate_problems(dataclasses.replace(arith, sizes={"train": n_pairs, "answers": n_pairs}))
    tiny = section(params, "model", TinyModelConfig)
    if model == "wide":
        tiny = dataclasses.replace(tiny, **WIDE)
    base_dir = workdir / f"base-{model}"
    summary = build_base(problems=problems, base_model="tiny", tiny=tiny, out_dir=base_dir)
    _, tokenizer = load_model(base_dir)
    train = [p for p in problems if p["split"] == "train"]
    pairs = [
        {"pair_id": f"pair-{i}", "prompt": format_prompt(tokenizer, p["question"]), "chosen": p["gold_rationale"],
         "rejected": train[(i + 1) % len(train)]["gold_rationale"], "weight": 1.0}
        for i, p in enumerate(train)
    ]
    pairs_path = workdir / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    print(f"{model}: {summary['parameters'] / 1e6:.2f}M parameters, vocabulary {summary['vocab_size']}, "
          f"{len(pairs)} pairs", flush=True)
    return base_dir, pairs_path


class ForwardLog:
    """Counts a model's forwards: tokens (attention mask) of each training forward, and the no-grad ones."""

    def __init__(self, model):
        self.training_tokens: list[int] = []
        self.no_grad_forwards = 0
        self.no_grad_forwards_after_first_step = 0
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        import torch

        if torch.is_grad_enabled():
            self.training_tokens.append(int(kwargs["attention_mask"].sum()))
        else:
            self.no_grad_forwards += 1
            self.no_grad_forwards_after_first_step += bool(self.training_tokens)

    def as_dict(self) -> dict:
        return {"training_tokens": sum(self.training_tokens), "tokens_per_step": self.training_tokens,
                "training_forwards": len(self.training_tokens), "reference_forwards": self.no_grad_forwards,
                "reference_forwards_during_training": self.no_grad_forwards_after_first_step}


# --- the two sides (each run in its own subprocess) -----------------------------------------------

def run_train_dpo(base_dir: Path, pairs: list[dict], config: DPOTrainConfig, out_dir: Path) -> dict:
    """`train.dpo.main` as the CLI calls it, with timers around the trainer's set-up, reference pass and epochs."""
    import train.dpo as dpo

    load_model, make_trainer_class = dpo.load_model, dpo._weighted_dpo_trainer
    timings = {"reference_s": 0.0}
    logs = []

    def load_and_watch(path):
        model, tokenizer = load_model(path)
        logs.append(ForwardLog(model))
        return model, tokenizer

    def timed_trainer_class():
        class TimedWeightedDPOTrainer(make_trainer_class()):
            def __init__(self, *args, **kwargs):
                started = time.perf_counter()
                super().__init__(*args, **kwargs)  # tokenization and the reference pass happen here
                timings["setup_s"] = time.perf_counter() - started

            def _precompute_ref_logps(self, *args, **kwargs):
                started = time.perf_counter()
                dataset = super()._precompute_ref_logps(*args, **kwargs)
                timings["reference_s"] += time.perf_counter() - started
                return dataset

            def train(self, *args, **kwargs):
                started = time.perf_counter()
                output = super().train(*args, **kwargs)
                timings["loop_s"] = time.perf_counter() - started
                return output

        return TimedWeightedDPOTrainer

    dpo.load_model, dpo._weighted_dpo_trainer = load_and_watch, timed_trainer_class
    summary = dpo.main(pairs=pairs, model_dir=base_dir, out_dir=out_dir, config=config)
    return {"loop_s": timings["loop_s"], "reference_s": timings["reference_s"],
            "with_setup_s": timings["setup_s"] + timings["loop_s"], "steps": summary["steps"],
            **logs[0].as_dict()}


def run_hand_written(base_dir: Path, pairs: list[dict], config: DPOTrainConfig, out_dir: Path) -> dict:
    """The minimal PyTorch DPO loop: same start, loss, data order, batches, optimizer and schedule as train/."""
    import torch

    from factory.modeling import load_model
    from train.common import save_model_atomically
    from train.dpo import weighted_dpo_nll_loss

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(base_dir)
    log = ForwardLog(model)
    started = time.perf_counter()

    def tokenize(prompt: str, completion: str) -> tuple[list[int], int]:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"][: config.max_length]
        return ids, len(prompt_ids)

    examples = [(tokenize(p["prompt"], p["chosen"]), tokenize(p["prompt"], p["rejected"]), p["weight"]) for p in pairs]

    def collate(batch):
        sequences = [chosen for chosen, _, _ in batch] + [rejected for _, rejected, _ in batch]
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            completion_mask[row, prompt_length: len(ids)] = 1
        weights = torch.tensor([weight for _, _, weight in batch], dtype=torch.float32)
        return input_ids, attention_mask, completion_mask, weights

    def completion_logps(input_ids, attention_mask, completion_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return (token_logps * completion_mask[:, 1:]).sum(dim=1)

    batch_size = config.batch_size
    reference_started = time.perf_counter()
    reference = []
    with torch.no_grad():  # once, in dataset order; every epoch reuses it
        for start in range(0, len(examples), batch_size):
            input_ids, attention_mask, completion_mask, _ = collate(examples[start: start + batch_size])
            reference.extend(zip(*completion_logps(input_ids, attention_mask, completion_mask).chunk(2)))
    reference_s = time.perf_counter() - reference_started

    steps_per_epoch = -(-len(examples) // batch_size)
    total_steps = steps_per_epoch * config.epochs

    def linear_warmup_decay(step: int) -> float:
        if step < config.warmup_steps:
            return step / max(1, config.warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay)
    loop_started = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            indices = order[start: start + batch_size]
            input_ids, attention_mask, completion_mask, weights = collate([examples[i] for i in indices])
            chosen_logps, rejected_logps = completion_logps(input_ids, attention_mask, completion_mask).chunk(2)
            ref_chosen, ref_rejected = (torch.stack(side) for side in zip(*(reference[i] for i in indices)))
            chosen_lengths = completion_mask[: len(indices), 1:].sum(dim=1).clamp_min(1)
            loss = weighted_dpo_nll_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_lengths,
                                         weights, beta=config.beta, alpha=config.nll_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    ended = time.perf_counter()
    save_model_atomically(model, tokenizer, out_dir)
    return {"loop_s": ended - loop_started, "reference_s": reference_s, "with_setup_s": ended - started,
            "steps": total_steps, **log.as_dict()}


WORKERS = {"train/": run_train_dpo, "hand-written": run_hand_written}


# --- orchestration --------------------------------------------------------------------------------

def _run_side(side: str, base_dir: Path, pairs_path: Path, config: DPOTrainConfig, out_dir: Path,
              threads: int) -> dict:
    result_path = out_dir.with_suffix(".json")
    command = [sys.executable, __file__, "--worker", side, "--base", str(base_dir), "--pairs-file", str(pairs_path),
               "--out", str(out_dir), "--result", str(result_path), "--config", json.dumps(dataclasses.asdict(config)),
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"bench/trainer.py: the {side} run failed:\n{done.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def _max_weight_difference(first: Path, second: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return max(float((a[name] - b[name]).abs().max()) for name in a.keys() & b.keys())


def benchmark_model(model: str, *, n_pairs: int, repeats: int, threads: int, config: DPOTrainConfig, params: dict,
                    workdir: Path) -> dict:
    base_dir, pairs_path = build_inputs(workdir, n_pairs=n_pairs, model=model, params=params)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(repeats):
        for side in SIDES if repeat % 2 == 0 else reversed(SIDES):
            name = "train" if side == "train/" else "hand"
            result = _run_side(side, base_dir, pairs_path, config, workdir / f"{model}-{name}-{repeat}", threads)
            result["tokens_per_s"] = result["training_tokens"] / result["loop_s"]
            result["tokens_per_s_with_setup"] = result["training_tokens"] / result["with_setup_s"]
            runs[side].append(result)
            print(f"  {model} {side:12} run {repeat + 1}: loop {result['loop_s']:.2f} s "
                  f"({result['tokens_per_s']:,.0f} tokens/s); reference pass {result['reference_s']:.2f} s; "
                  f"with setup {result['with_setup_s']:.2f} s", flush=True)

    trl, hand = runs["train/"][0], runs["hand-written"][0]
    median = {side: {key: statistics.median(r[key] for r in runs[side])
                     for key in ("tokens_per_s", "tokens_per_s_with_setup", "loop_s", "reference_s", "with_setup_s")}
              for side in SIDES}
    return {
        "model": model,
        "pairs": n_pairs,
        "steps": trl["steps"],
        "training_tokens": trl["training_tokens"],
        "same_batches": trl["tokens_per_step"] == hand["tokens_per_step"],
        "reference_forwards": {side: runs[side][0]["reference_forwards"] for side in SIDES},
        "reference_forwards_during_training": {side: runs[side][0]["reference_forwards_during_training"]
                                               for side in SIDES},
        "max_weight_difference": _max_weight_difference(workdir / f"{model}-train-0", workdir / f"{model}-hand-0"),
        "median": median,
        "ratio": median["train/"]["tokens_per_s"] / median["hand-written"]["tokens_per_s"],
        "repeat_ratios": [t["tokens_per_s"] / h["tokens_per_s"] for t, h in zip(runs["train/"], runs["hand-written"])],
        "ratio_with_setup": (median["train/"]["tokens_per_s_with_setup"]
                             / median["hand-written"]["tokens_per_s_with_setup"]),
        "runs": {side: [{k: v for k, v in r.items() if k != "tokens_per_step"} for r in runs[side]]
                 for side in SIDES},
    }


def _report(result: dict, batch_size: int) -> None:
    trl, hand = result["median"]["train/"], result["median"]["hand-written"]
    refs = result["reference_forwards"]
    print(f"{result['model']}: {result['pairs']} pairs, {result['steps']} steps, "
          f"{result['training_tokens']:,} training tokens; identical batches: {result['same_batches']}")
    print(f"  loop:       train/ {trl['tokens_per_s']:,.0f} tokens/s, hand-written {hand['tokens_per_s']:,.0f} "
          f"tokens/s: ratio {result['ratio']:.2f}")
    print(f"  with setup: train/ {trl['tokens_per_s_with_setup']:,.0f} tokens/s, hand-written "
          f"{hand['tokens_per_s_with_setup']:,.0f} tokens/s: ratio {result['ratio_with_setup']:.2f} "
          f"(reference pass {trl['reference_s']:.2f} s vs {hand['reference_s']:.2f} s)")
    print(f"  reference forwards: train/ {refs['train/']}, hand-written {refs['hand-written']} "
          f"(= ceil({result['pairs']} / {batch_size}) once, before training); during training: "
          f"{result['reference_forwards_during_training']['train/']} / "
          f"{result['reference_forwards_during_training']['hand-written']}")
    print(f"  per-repeat loop ratios {', '.join(f'{r:.2f}' for r in result['repeat_ratios'])}; "
          f"max |weight difference| between the two trained models {result['max_weight_difference']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=256, help="preference pairs (the pipeline's: 420 and 283)")
    parser.add_argument("--models", default="params", help="comma-separated: params (params.yaml model), wide")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--epochs", type=int, help="override params.yaml dpo.epochs")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of both sides (0: torch's default, every core, as the pipeline runs)")
    parser.add_argument("--json", type=Path, help="also write the figures here (e.g. bench/results/trainer.json)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    for hidden in ("--base", "--pairs-file", "--out", "--result", "--config"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        config = DPOTrainConfig(**json.loads(args.config))
        result = WORKERS[args.worker](Path(args.base), json.loads(Path(args.pairs_file).read_text()), config,
                                      Path(args.out))
        Path(args.result).write_text(json.dumps(result))
        return

    params = load_params(REPO / "params.yaml")
    config = section(params, "dpo", DPOTrainConfig)
    if args.epochs:
        config = dataclasses.replace(config, epochs=args.epochs)
    results = []
    with tempfile.TemporaryDirectory(prefix="factory-bench-trainer-") as scratch:
        for model in args.models.split(","):
            results.append(benchmark_model(model, n_pairs=args.pairs, repeats=args.repeats, threads=args.threads,
                                           config=config, params=params, workdir=Path(scratch)))
    for result in results:
        _report(result, config.batch_size)
    print("summary: DPO training tokens/s, train/ / hand-written: "
          + "; ".join(f"{r['model']} {r['ratio']:.2f} (with tokenization and reference pass "
                      f"{r['ratio_with_setup']:.2f})" for r in results)
          + f" (target >= 0.8; median of {args.repeats})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": dataclasses.asdict(config), "threads": args.threads,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Calculator-integrated sampling vs the ways users would otherwise sample.

    python bench/sampling.py                       # tiny default model + a larger from-scratch one
    python bench/sampling.py --models tiny --batch-sizes 32 --problems 64

For each model and batch size, the same prompts (the default task's `answers`
problems, `--n` samples each, T=0.7, 256 new tokens at most) are decoded by:

- `factory`: `factory.generators.decoding.generate` with the calculator on
  (what `factory sample` runs);
- `factory_no_calc`: the same with the calculator off;
- `stop_resume`: `model.generate` with a stopping criterion that interrupts
  the batch when a row has written `<<expr=`; the calculator's result and `>>`
  are appended to that row's text, every row is re-encoded and generation
  continues (the GSM8K reference calculator's and Calcformer's method,
  batched as in DPO-ST's comparison);
- `stop_resume_per_row`: the same, but only the row that needs the
  calculator stops (transformers' per-row stopping criteria), a stronger
  baseline than the papers measured;
- `hf_generate`: plain `model.generate` (sampling, stops at EOS), no calculator.

Each method runs `--repeats` times, interleaved so that machine noise hits all
alike; the median time is reported, as samples/s and generated tokens/s, with
the ratios the issue asks for (calculator cost, speed-up over stop-and-resume
and over plain generate). Greedy decodes of `factory_no_calc` are compared
with `model.generate`'s (same prompts, no stop rule but EOS) and the count of
identical ones is printed.

Models: `tiny` is the default pipeline's warm-up model (`models/iter_0`) when
`dvc repro` has made it, otherwise the same architecture briefly trained here;
`large` is a from-scratch Llama about 8x the tiny one's parameters, trained
here for `--train-steps` SFT steps so that it writes calculator annotations.
Trained models are cached in `bench/.cache/`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"

# From-scratch model sizes (params.yaml `model` is the tiny one).
SIZES = {
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 4, "num_heads": 4},
    "large": {"hidden_size": 320, "intermediate_size": 864, "num_layers": 6, "num_heads": 5},
}


def task_problems() -> list[dict]:
    from factory.params import load_params, section
    from factory.problems import load_source
    from factory.problems.arith import ArithConfig

    arith = section(load_params(ROOT / "params.yaml").get("problems", {}), "arith", ArithConfig)
    problems, _ = load_source("arith", arith_config=arith)
    return problems


def trained_model(size: str, problems: list[dict], train_steps: int) -> Path:
    """The model to benchmark: the pipeline's warm-up for `tiny` if present, else one trained here (cached)."""
    if size == "tiny" and (ROOT / "models" / "iter_0" / "config.json").exists():
        return ROOT / "models" / "iter_0"
    out = CACHE / f"{size}-{train_steps}"
    if (out / "config.json").exists():
        return out
    from factory.modeling import TINY, TinyModelConfig
    from train.sft import SFTRunConfig, build_base, dev_problems, gold_examples, train_sft

    base = CACHE / f"{size}-base"
    build_base(problems=problems, base_model=TINY, tiny=TinyModelConfig(vocab_size=1024, **SIZES[size]), out_dir=base)
    config = SFTRunConfig(learning_rate=3e-3, batch_size=16, completion_only_loss=False, dev_max_new_tokens=128)
    train_sft(model_dir=base, examples=gold_examples(problems), dev=dev_problems(problems, "dev")[:64], out_dir=out,
              config=config, max_steps=train_steps, score_every_steps=train_steps)
    return out


def stop_and_resume(model, tokenizer, prompts, config, *, seed: int, whole_batch: bool) -> tuple[list[str], int]:
    """Batched `generate` that stops inside `<<expr=`, appends the result and `>>`, re-encodes and continues.

    `whole_batch`: the batch is interrupted as soon as any row needs the
    calculator (a single stop flag per batch, as in the reference calculator
    and Calcformer; DPO-ST's 5.8x/13.9x are measured against this). Otherwise
    only that row stops (transformers' per-row stopping) and is resumed once
    the whole batch has stopped: a stronger baseline than the papers used.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from factory.calculator import calculator_result
    from factory.generators.decoding import FINAL_LINE

    def needs_calculator(text: str) -> bool:
        opened = text.rfind("<<")
        return text.endswith("=") and opened >= 0 and text.rfind(">>") < opened and "=" not in text[opened + 2 : -1]

    class StopInsideAnnotation(StoppingCriteria):
        """Judges each row's whole generated text: an annotation may have opened in an earlier segment."""

        def __init__(self, start: int, before: list[str]):
            self.start, self.before = start, before

        def __call__(self, input_ids, scores, **kwargs):
            new = tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
            texts = [before + text for before, text in zip(self.before, new)]
            calls = torch.tensor([needs_calculator(t) for t in texts])
            final = torch.tensor([bool(FINAL_LINE.search(t)) for t in texts])
            return (calls.any() | final) if whole_batch else (calls | final)

    torch.manual_seed(seed)
    generated = [""] * len(prompts)
    budget = [config.max_new_tokens] * len(prompts)
    pending = list(range(len(prompts)))
    n_tokens = 0
    while pending:
        batch = tokenizer([prompts[i] + generated[i] for i in pending], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        width = batch["input_ids"].shape[1]
        out = model.generate(
            **batch, do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,
            max_new_tokens=max(budget[i] for i in pending), pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopInsideAnnotation(width, [generated[i] for i in pending])]),
        )
        still = []
        for row, i in enumerate(pending):
            ids = out[row, width:]
            ids = ids[ids != tokenizer.pad_token_id][: budget[i]]
            n_tokens += len(ids)
            budget[i] -= len(ids)
            generated[i] += tokenizer.decode(ids, skip_special_tokens=True)
            if (ids == tokenizer.eos_token_id).any() or budget[i] <= 0 or FINAL_LINE.search(generated[i]):
                continue
            if needs_calculator(generated[i]):
                result = calculator_result(generated[i][generated[i].rfind("<<") + 2 : -1])
                if result is not None:
                    generated[i] += result + ">>"
                    budget[i] -= len(tokenizer.encode(result + ">>", add_special_tokens=False))
            still.append(i)
        pending = still
    return generated, n_tokens


def hf_generate(model, tokenizer, prompts, config, *, greedy: bool = False, seed: int = 0) -> tuple[list[str], int]:
    """Plain batched `model.generate`: what a user writes without a calculator."""
    import torch

    torch.manual_seed(seed)
    texts, n_tokens = [], 0
    for start in range(0, len(prompts), config.batch_size):
        batch = tokenizer(prompts[start : start + config.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        sampling = {"do_sample": False} if greedy else {
            "do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
        out = model.generate(**batch, **sampling, max_new_tokens=config.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1] :]
        n_tokens += int((new != tokenizer.pad_token_id).sum())
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts, n_tokens


def run_method(name: str, model, tokenizer, prompts, seeds, config, clock=time.perf_counter
               ) -> tuple[float, int, list[str]]:
    """(seconds, generated tokens, texts) of one method over all prompts."""
    from dataclasses import replace

    from factory.generators.decoding import generate

    start = clock()
    if name in ("factory", "factory_no_calc"):
        done = generate(model, tokenizer, prompts, seeds, replace(config, calculator=name == "factory"),
                        show_progress=False)
        texts, n_tokens = [c.text for c in done], sum(c.n_tokens for c in done)
    elif name.startswith("stop_resume"):
        texts, n_tokens = [], 0
        for s in range(0, len(prompts), config.batch_size):
            part, count = stop_and_resume(model, tokenizer, prompts[s : s + config.batch_size], config, seed=s,
                                          whole_batch=name == "stop_resume")
            texts, n_tokens = texts + part, n_tokens + count
    else:
        texts, n_tokens = hf_generate(model, tokenizer, prompts, config)
    return clock() - start, n_tokens, texts


# Wall time is what users wait for; on a shared machine, one torch thread and the process's CPU time
# (`--threads 1 --clock cpu`) measure the same work without the other jobs' noise.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
METHODS = ("factory", "factory_no_calc", "stop_resume", "stop_resume_per_row", "hf_generate")


def bench_model(size: str, args, problems: list[dict]) -> list[dict]:
    import torch

    from factory.calculator import check_annotations
    from factory.generators.decoding import DecodingConfig, generate
    from factory.modeling import count_parameters, format_prompt, load_model

    path = trained_model(size, problems, args.train_steps)
    model, tokenizer = load_model(path)
    pool = [p for p in problems if p["split"] == "answers"][: args.problems]
    prompts = [format_prompt(tokenizer, p["question"]) for p in pool for _ in range(args.n)]
    seeds = list(range(len(prompts)))
    rows = []
    for batch_size in args.batch_sizes:
        config = DecodingConfig(temperature=0.7, max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        with torch.inference_mode():
            run_method("factory", model, tokenizer, prompts[:batch_size], seeds[:batch_size], config)  # warm up
            timings = {name: [] for name in METHODS}
            for _ in range(args.repeats):
                for name in METHODS:
                    seconds, n_tokens, texts = run_method(name, model, tokenizer, prompts, seeds, config,
                                                          CLOCKS[args.clock])
                    timings[name].append((seconds, n_tokens, texts))
        row = {"model": size, "path": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
               "clock": args.clock, "threads": torch.get_num_threads(), "parameters": count_parameters(model), "batch_size": batch_size, "prompts": len(prompts)}
        for name, runs in timings.items():
            seconds = statistics.median(s for s, _, _ in runs)
            n_tokens = runs[0][1]
            wrong = sum(check_annotations(t).wrong for t in runs[0][2])
            row[name] = {"seconds": round(seconds, 3), "samples_per_s": round(len(prompts) / seconds, 1),
                         "tokens_per_s": round(n_tokens / seconds), "tokens": n_tokens, "wrong_annotations": wrong}
        row["calculator_cost"] = round(1 - row["factory"]["tokens_per_s"] / row["factory_no_calc"]["tokens_per_s"], 3)
        row["vs_stop_resume"] = round(row["stop_resume"]["seconds"] / row["factory"]["seconds"], 2)
        row["vs_stop_resume_per_row"] = round(row["stop_resume_per_row"]["seconds"] / row["factory"]["seconds"], 2)
        row["vs_hf_generate_tokens_per_s"] = round(
            row["factory_no_calc"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"], 2)
        greedy = DecodingConfig(max_new_tokens=args.max_new_tokens, calculator=False, stop_at_final_answer=False,
                                batch_size=batch_size)
        with torch.inference_mode():
            ours = [c.text for c in generate(model, tokenizer, prompts[:: args.n], [0] * len(pool), greedy,
                                             show_progress=False)]
            theirs, _ = hf_generate(model, tokenizer, prompts[:: args.n], greedy, greedy=True)
        row["greedy_identical"] = f"{sum(a == b.rstrip(chr(10)) for a, b in zip(ours, theirs))}/{len(ours)}"
        rows.append(row)
        print(summary_line(row), flush=True)
    return rows


def summary_line(row: dict) -> str:
    f, nc, sr, srr, hf = (row[m] for m in METHODS)
    return (
        f"{row['model']} ({row['parameters'] / 1e6:.1f}M) batch {row['batch_size']}: "
        f"factory {f['tokens_per_s']} tok/s {f['samples_per_s']} samples/s | calculator off {nc['tokens_per_s']} tok/s "
        f"(calculator costs {row['calculator_cost']:.1%}) | stop-and-resume {sr['tokens_per_s']} tok/s "
        f"(factory {row['vs_stop_resume']}x faster; per-row stopping {srr['tokens_per_s']} tok/s, "
        f"{row['vs_stop_resume_per_row']}x) | hf generate {hf['tokens_per_s']} tok/s "
        f"(factory {row['vs_hf_generate_tokens_per_s']}x) | greedy identical {row['greedy_identical']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "large"], choices=sorted(SIZES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--problems", type=int, default=64, help="answers problems to sample")
    parser.add_argument("--n", type=int, default=2, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300, help="SFT steps for models trained here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampling.json")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    problems = task_problems()
    rows = [row for size in args.models for row in bench_model(size, args, problems)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

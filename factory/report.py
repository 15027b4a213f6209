"""The flywheel's numbers per iteration, gathered from each stage's metrics files.

    factory report --metrics metrics/iterations --out metrics/flywheel.json --plot metrics/flywheel_plot.json

Each iteration k has a folder `metrics/iterations/iter_k/` where its stages
write `eval.json` (and for k ≥ 1 `label.json`, `filter.json`, `steps.json`, `pairs.json`,
`train.json`). The report joins them into one metrics file (`dvc metrics
show`) and one row per iteration for `dvc plots show`. Each row carries the
recipes' precondition signals measured that iteration (`pass_at_1` ..
`pass_at_n`, `majority_accuracy_gold`, `self_eval_auc`, `prm_heldout_accuracy`
beside `prm_heldout_baseline`, `step_negative_yield`; a signal that was not
measured is left out) and the verdict `factory train` recorded
(`precondition_signal`, `_value`, `_threshold`, `_holds`: null when unmeasured).
"""

from __future__ import annotations

import json
from pathlib import Path

from factory.preconditions import iteration_signals

# The signals shown per iteration (besides pass@k), in the order the report lists them.
SIGNALS = ("majority_accuracy_gold", "majority_gold_problems", "self_eval_auc", "prm_heldout_accuracy",
           "prm_heldout_baseline", "step_negative_yield")


def iteration_numbers(params: dict) -> list[int]:
    """0 (the warm-up) and every key of params `iterations`, checked to be a chain: k's `prev` is an earlier one."""
    chain = params.get("iterations") or {}
    numbers = [0]
    for key, item in sorted(chain.items(), key=lambda kv: int(kv[0])):
        k, prev = int(key), (item or {}).get("prev")
        if prev is None or int(prev) not in numbers:
            raise ValueError(f"params `iterations.{key}`: prev must name an earlier iteration, got {prev!r}")
        numbers.append(k)
    return numbers


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def iteration_row(folder: Path, k: int) -> dict:
    """One iteration's figures; a missing stage file leaves its figures out rather than inventing them."""
    evaluation = _read(folder, "eval.json")
    if evaluation is None:
        raise FileNotFoundError(f"{folder / 'eval.json'}: iteration {k} has not been evaluated")
    row: dict = {"iteration": k}
    for split, m in evaluation.items():
        row[split] = m["accuracy"]
        row[f"{split}_stderr"] = m["stderr"]
    if labels := _read(folder, "label.json"):
        row["sample_accuracy"] = labels["sample_accuracy"]
        row["solved_fraction"] = labels["solved_fraction"]
        if "sample_tokens" in labels:
            row["sample_tokens"] = labels["sample_tokens"]
        if vote := labels.get("vote"):
            row["majority_accuracy"] = vote["majority_accuracy"]
            row["mean_top_share"] = vote["mean_top_share"]
    steps = _read(folder, "steps.json")
    if steps and "generated" in steps:
        row["step_rows"] = steps["generated"]["rows"]
        row["step_tokens"] = steps["generated"]["tokens"]
    signals = iteration_signals(labels, steps)
    row |= {f"pass_at_{k}": value for k, value in (signals["pass_at_k"] or {}).items()}
    row |= {name: signals[name] for name in SIGNALS if signals[name] is not None}
    if pairs := _read(folder, "pairs.json"):
        row["pairs"] = pairs["pairs"]
        if "step_pairs" in pairs:
            row["step_controlled_pairs"] = pairs["step_pairs"]["step_controlled"]
        row["pair_yield"] = round(pairs["problems_with_pairs"] / pairs["problems_seen"], 4) \
            if pairs["problems_seen"] else 0.0
    if train := _read(folder, "train.json"):
        row["recipe"] = train["recipe"]
        if "sft" in train:
            row["sft_examples"] = train["sft"]["examples"]
            row["sft_dev_accuracy"] = train["sft"]["dev_accuracy"]
        if "second_round" in train:
            row["self_train_correct"] = train["second_round"]["correct_kept"]
        if "reward_accuracy" in train.get("dpo", {}):
            row["dpo_reward_accuracy"] = train["dpo"]["reward_accuracy"]
        if "orpo" in train:
            row["orpo_pairs"] = train["orpo"]["pairs"]
        if precondition := train.get("precondition"):
            row |= {f"precondition_{key}": precondition[key] for key in ("signal", "value", "threshold", "holds")}
    return row


def flywheel_report(metrics_dir: str | Path, params: dict) -> list[dict]:
    folder = Path(metrics_dir)
    return [iteration_row(folder / f"iter_{k}", k) for k in iteration_numbers(params)]


def format_table(rows: list[dict]) -> str:
    columns = ["iteration", "recipe", "test", "test_ood", "solved_fraction", "pair_yield", "sft_examples"]
    present = [c for c in columns if any(c in r for r in rows)]
    lines = [" | ".join(present)]
    for r in rows:
        lines.append(" | ".join(
            f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in present))
    return "\n".join(lines)

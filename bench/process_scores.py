"""Do Monte Carlo process scores find the step the calculator says is wrong?

    python bench/process_scores.py --model models/iter_0 --problems data/problems.parquet \\
        --split answers --limit 300 --n 4 --rollouts 8 --json bench/results/process_scores.json

1. Sample `--n` rationales for the first `--limit` problems of `--split`
   with the calculator OFF, so the model writes its own (sometimes wrong)
   results in `<<a=b>>` annotations, and label them (gold answer and the
   calculator checks: `first_error_step` is the step of the first wrong
   annotation).
2. Estimate each problem's solve rate under the rollout policy (calculator
   ON, `--rollouts` samples per problem at the rollout temperature): the
   Monte Carlo score of the empty prefix, s_{-1}. (The calculator-off
   samples' own share correct would be the wrong baseline: the rollouts
   run with the calculator.)
3. Pick the samples with a located wrong step (at most `--max-located`,
   round-robin over problems) and as many controls: correct samples from
   step 2 (the calculator keeps their annotations right), round-robin.
4. Roll out `--rollouts` continuations from every proper step prefix of
   them with the calculator ON (`factory.generators.continuations.mc_rollouts`),
   label the rollouts and score the steps (`factory.labelers.process.rollout_scores`).
5. Report `error_drop_rate` (the share of located samples whose score drops
   at or before the located step) and, as a chance baseline, the same rate on
   the controls with each control given the located step of its matched
   located sample (capped at its last step), and the rate on the located
   samples whose problem has s_{-1} > 0 (elsewhere no drop is possible).
   Also the mean step score before, at and after the located step, and the
   mean path reward of both groups.

Nothing under data/ or models/ is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def round_robin(rows: list[dict], limit: int) -> list[dict]:
    """Up to `limit` rows (0: all), one per problem in turn, each problem's rows by sample_id."""
    groups: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["sample_id"]):
        groups.setdefault(row["problem_id"], []).append(row)
    chosen, depth = [], 0
    budget = limit or len(rows)
    while len(chosen) < budget and any(depth < len(g) for g in groups.values()):
        for group in groups.values():
            if depth < len(group) and len(chosen) < budget:
                chosen.append(group[depth])
        depth += 1
    return chosen


def mean(values) -> float | None:
    values = list(values)
    return round(statistics.fmean(values), 4) if values else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/iter_0")
    parser.add_argument("--problems", default="data/problems.parquet")
    parser.add_argument("--split", default="answers")
    parser.add_argument("--limit", type=int, default=300, help="problems sampled (0: the whole split)")
    parser.add_argument("--n", type=int, default=4, help="samples per problem (calculator off)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rollouts", type=int, default=8, help="M rollouts per step prefix (calculator on)")
    parser.add_argument("--rollout-temperature", type=float, default=0.7)
    parser.add_argument("--max-located", type=int, default=0, help="located samples rolled out (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from factory.generators.sampling import SamplingConfig, problems_to_sample, sample_rationales
    from factory.generators.continuations import StepsConfig, label_rows, mc_rollouts
    from factory.labelers.process import error_drop_rate, rollout_scores, solve_rates
    from factory.lineage import model_id as model_id_of
    from factory.lineage import read_table
    from factory.modeling import load_model
    from factory.reasoning_steps import split_steps

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    all_problems = read_table(args.problems, "problems").to_pylist()
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, calculator=False, split=args.split,
                              limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              seed=args.seed)
    problems = problems_to_sample(all_problems, sampling, source=args.problems)
    model, tokenizer = load_model(args.model)
    mid = model_id_of(args.model)

    t0 = time.perf_counter()
    samples = sample_rationales(model, tokenizer, problems, sampling, model_id=mid, iteration=0)
    sample_seconds = time.perf_counter() - t0
    labels = label_rows(samples, problems)
    t0 = time.perf_counter()
    baseline_config = SamplingConfig(n=args.rollouts, temperature=args.rollout_temperature, calculator=True,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     seed=args.seed + 1)
    baseline = sample_rationales(model, tokenizer, problems, baseline_config, model_id=mid, iteration=0)
    baseline_seconds = time.perf_counter() - t0
    baseline_labels = label_rows(baseline, problems)
    rates = solve_rates(baseline_labels)
    by_id = {s["sample_id"]: s for s in samples + baseline}
    judged = [label for label in labels if label["correct"] is not None]
    located_labels = [label for label in judged if label["first_error_step"] is not None
                      and label["first_error_step"] < len(split_steps(by_id[label["sample_id"]]["text"]))]
    located_labels = round_robin(located_labels, args.max_located)
    clean = [label for label in baseline_labels
             if label["correct"] and label["calc_wrong"] == 0 and label["n_steps"] >= 1]
    control_labels = round_robin(clean, len(located_labels))
    chosen = [by_id[label["sample_id"]] for label in located_labels + control_labels]
    print(f"{len(samples)} samples (calculator off) in {sample_seconds:.0f}s: "
          f"{sum(label['correct'] is True for label in judged)} correct, "
          f"{sum(label['first_error_step'] is not None for label in judged)} with a located wrong step; "
          f"solve rate with the calculator {mean(rates.values())} ({len(baseline)} samples, "
          f"{baseline_seconds:.0f}s); rolling out {len(located_labels)} located + {len(control_labels)} controls",
          flush=True)

    steps = StepsConfig(rollouts=args.rollouts, rollout_samples=0, rollout_temperature=args.rollout_temperature,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, calculator=True,
                        seed=args.seed)
    t0 = time.perf_counter()
    all_labels = labels + baseline_labels
    rollouts = mc_rollouts(model, tokenizer, problems, chosen, all_labels, steps, model_id=mid, iteration=0)
    rollout_seconds = time.perf_counter() - t0
    rollout_labels = label_rows(rollouts, problems)
    process = rollout_scores(chosen, all_labels, rollouts, rollout_labels, steps, model_id=mid)
    located = error_drop_rate(process, labels, rates=rates)
    # Where no calculator-on sample solved the problem (s_{-1} = 0), no score can drop: those say nothing.
    solvable = error_drop_rate([row for row in process.to_pylist() if rates.get(row["problem_id"], 0.0) > 0],
                               labels, rates=rates)

    # Chance baseline: each control takes the located step of its matched located sample, capped at its last step.
    scores = {row["sample_id"]: row["step_scores"] for row in process.to_pylist()}
    pseudo = []
    for error, control in zip(located_labels, control_labels):
        n_steps = len(scores[control["sample_id"]])
        pseudo.append(control | {"first_error_step": min(error["first_error_step"], n_steps - 1)})
    control_ids = {label["sample_id"] for label in control_labels}
    controls = error_drop_rate([row for row in process.to_pylist() if row["sample_id"] in control_ids], pseudo,
                               rates=rates)

    before, at, after = [], [], []
    for label in located_labels:
        e, row = label["first_error_step"], scores[label["sample_id"]]
        before += row[:e]
        at.append(row[e])
        after += row[e + 1 :]
    rewards = {row["sample_id"]: row["path_reward"] for row in process.to_pylist()}
    result = {
        "command": "python bench/process_scores.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "model_id": mid,
        "problems": len(problems),
        "samples": len(samples),
        "samples_correct": sum(label["correct"] is True for label in judged),
        "samples_with_located_error": sum(label["first_error_step"] is not None for label in judged),
        "located_rolled_out": len(located_labels),
        "located_correct": sum(label["correct"] is True for label in located_labels),
        "controls_rolled_out": len(control_labels),
        "rollouts_per_prefix": args.rollouts,
        "rollouts": len(rollouts),
        "solve_rate_calculator_off": mean(solve_rates(labels).values()),
        "solve_rate_calculator_on": mean(rates.values()),
        "solve_rate_samples_per_problem": args.rollouts,
        "error_drop": located,
        "error_drop_where_solvable": solvable,
        "control_drop": controls,
        "located_mean_score_before_error": mean(before),
        "located_mean_score_at_error": mean(at),
        "located_mean_score_after_error": mean(after),
        "located_mean_path_reward": mean(rewards[label["sample_id"]] for label in located_labels),
        "control_mean_path_reward": mean(rewards[label["sample_id"]] for label in control_labels),
        "seconds": {"sample": round(sample_seconds, 1), "solve_rate": round(baseline_seconds, 1),
                    "rollouts": round(rollout_seconds, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "threads": torch.get_num_threads(),
    }
    print(f"located wrong steps: {located['located']}; score drops at or before the step in "
          f"{located['drop_at_or_before']} (rate {located['rate']}), exactly at it in {located['drop_exactly_at']}; "
          f"on problems the model can solve (s_-1 > 0): {solvable['drop_at_or_before']}/{solvable['located']} "
          f"(rate {solvable['rate']}); controls at the matched step: rate {controls['rate']}")
    print(json.dumps(result, indent=2))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

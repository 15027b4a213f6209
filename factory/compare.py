"""Recipes compared on the same problems, seeds and budget: `factory compare`.

    factory compare --recipes sft,self_train,dpo_st --seeds 0,1

For each seed and recipe it runs the pipeline as a DVC experiment
(`dvc exp run -S recipe=R -S sample.seed=S -S dpo.seed=S ...`, every seeded section, plus the
recipe's own settings from its module: ScPO's unlabeled problems, for example),
reads `metrics/flywheel.json`, and prints accuracy per iteration per recipe,
like the DPO-ST paper's table. The warm-up (iteration 0) is shared by every
run; stages whose inputs did not change come from DVC's run cache, so the
first iteration's sampling is drawn once per seed, not once per recipe.

A gain counts only against the control: list `sft` (more SFT on gold from the
previous model, the same optimizer steps) first, and the table gives each
recipe's paired difference, seed by seed, from the warm-up and from every
recipe listed before it.
The workspace's params.yaml and dvc.lock are restored (and unstaged) at the end.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path

SEEDED_SECTIONS = ("sample", "dpo", "self_train", "steps", "prm", "orpo", "mcts")
# Besides `recipe`, each run sets the recipe's own settings (`Recipe.needs` and `Recipe.setup` in its module under
# factory/recipes/): the problems it samples and a sampling budget equal to the others'. Every recipe draws about
# the same samples per iteration: dpo_st and self_train 500 x 4 in `sample@k` plus a second round of 500 x 4; ScPO
# and `dpo` have no second round, so they draw 8 per problem; SCDPO, SIPF and MCTS-DPO spend the rest of their
# budget on continuations, rollouts and search trees (`bench/results/README.md` has the token counts).


def experiment_command(recipe: str, seed: int) -> list[str]:
    from factory.recipes import get_recipe

    settings = [f"recipe={recipe}"] + get_recipe(recipe).exp_run_flags() \
        + [f"{section}.seed={seed}" for section in SEEDED_SECTIONS]
    return ["dvc", "exp", "run"] + [arg for setting in settings for arg in ("-S", setting)]


def baseline_key() -> str:
    """What the runs compare from: the pipeline and its params (a changed one invalidates saved runs)."""
    from factory.ids import content_hash

    return content_hash(*(Path(name).read_text() if Path(name).exists() else "" for name in ("dvc.yaml", "params.yaml")))


def run_experiments(recipes: list[str], seeds: list[int], *, out: str | Path,
                    flywheel: str = "metrics/flywheel.json") -> dict:
    """{recipe: {seed: flywheel metrics}} from one DVC experiment per (recipe, seed).

    Each finished run is saved to `out` at once; started again with the same
    pipeline and params, it skips the runs already there (an hour-long job
    survives an interruption).
    """
    from factory.io import write_json

    out, key = Path(out), baseline_key()
    saved = {name: Path(name).read_bytes() for name in ("params.yaml", "dvc.lock") if Path(name).exists()}
    done = json.loads(out.read_text()) if out.exists() else {}
    runs = done.get("runs", {}) if done.get("baseline") == key else {}
    results: dict[str, dict[int, dict]] = {r: {int(s): m for s, m in runs.get(r, {}).items()} for r in recipes}
    try:
        for seed in seeds:
            for recipe in recipes:
                if seed in results[recipe]:
                    print(f"compare: {recipe} seed {seed} already in {out}", flush=True)
                    continue
                command = experiment_command(recipe, seed)
                # Each run starts from the workspace's params: `dvc exp run` leaves the last run's -S values there.
                if "params.yaml" in saved:
                    Path("params.yaml").write_bytes(saved["params.yaml"])
                print("$ " + " ".join(command), flush=True)
                subprocess.run(command, check=True)
                results[recipe][seed] = json.loads(Path(flywheel).read_text())
                write_json(out, {"baseline": key, "runs": results})
    finally:
        for name, content in saved.items():
            Path(name).write_bytes(content)
        # `dvc exp run` stages params.yaml and dvc.lock in git; unstage them (their content is restored above).
        subprocess.run(["git", "reset", "--quiet", "--", *saved], check=False)
        subprocess.run(["dvc", "checkout", "--force", "--quiet"], check=False)
    return results


def _mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (0 with one seed)."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, spread


def _iterations(by_seed: dict) -> list[str]:
    keys = {k for run in by_seed.values() for k in run if k.startswith("iter_")}
    return sorted(keys, key=lambda k: int(k.split("_")[1]))


def summarize(results: dict, split: str = "test") -> dict:
    """Mean accuracy per recipe and iteration, and paired differences seed by seed.

    `results` lists recipes weakest first (the control first); each recipe is
    compared with the warm-up and with every recipe listed before it, over the
    seeds both ran.
    """
    recipes = list(results)
    accuracy: dict = {}
    paired: list[dict] = []
    for index, recipe in enumerate(recipes):
        by_seed = results[recipe]
        accuracy[recipe] = {}
        for k in _iterations(by_seed):
            values = [run[k][split] for run in by_seed.values() if k in run]
            accuracy[recipe][k] = _mean_and_spread(values)
        last = _iterations(by_seed)[-1]
        for baseline in ["warm-up"] + recipes[:index]:
            seeds = sorted(s for s in by_seed if last in by_seed[s]
                           and (baseline == "warm-up" or last in results[baseline].get(s, {})))
            if not seeds:
                continue
            other = {s: (by_seed[s]["iter_0"] if baseline == "warm-up" else results[baseline][s][last])[split]
                     for s in seeds}
            differences = [by_seed[s][last][split] - other[s] for s in seeds]
            mean, spread = _mean_and_spread(differences)
            paired.append({"recipe": recipe, "baseline": baseline, "iteration": last, "seeds": seeds,
                           "per_seed": differences, "mean": mean, "stderr": spread})
    return {"split": split, "accuracy": accuracy, "paired": paired}


def _cell(value: tuple[float, float] | None) -> str:
    return f"{'-':>13}" if value is None else f"{100 * value[0]:6.1f} ± {100 * value[1]:4.1f}"


def format_summary(summary: dict) -> str:
    """A text table: accuracy (mean ± s.e. over seeds, in points) per iteration, then the paired differences."""
    accuracy = summary["accuracy"]
    iterations = sorted({k for per in accuracy.values() for k in per}, key=lambda k: int(k.split("_")[1]))
    lines = [f"{summary['split']} accuracy in points, mean ± s.e. over seeds",
             f"{'recipe':<12} | " + " | ".join(f"{k:>13}" for k in iterations)]
    for recipe, per in accuracy.items():
        lines.append(f"{recipe:<12} | " + " | ".join(_cell(per.get(k)) for k in iterations))
    lines.append("paired differences (points; per seed -> mean ± s.e.):")
    for d in summary["paired"]:
        per_seed = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
        lines.append(f"  {d['recipe']:<12} - {d['baseline']:<12} at {d['iteration']}: [{per_seed}] -> "
                     f"{100 * d['mean']:+.1f} ± {100 * d['stderr']:.1f}")
    return "\n".join(lines)

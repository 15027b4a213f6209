"""The `steps` stage (`factory steps`): the step-level data a recipe needs, between filter and pairs.

    factory steps --recipe scdpo --model models/iter_0 --problems data/problems.parquet \
        --samples data/iter_1/kept.parquet --labels data/iter_1/labels.parquet --iteration 1 \
        --out data/iter_1/steps

What it makes depends on the recipe (params `recipe`):

- `scdpo`: step-controlled continuations of the correct kept samples
  (`factory.generators.steps.step_controlled_negatives`), labelled.
- `sipf_orpo`: Monte Carlo rollouts from each step prefix of a budgeted set of
  kept samples (`mc_rollouts`), labelled; their step scores (`process` rows,
  source "rollouts"); a process reward model trained on those step labels from
  the sampling model (`train/prm.py`, saved in `prm/`); and the PRM's step
  scores and path reward for every kept sample (source "prm").
- `mcts_dpo`: a search tree per problem (`factory.generators.tree.tree_search`)
  over the first `mcts.problems` problems the iteration sampled (in the
  problems file's order), every node a `nodes` row.
- any other recipe: the same four tables, empty, so the pipeline has one shape.

Generated rows are ordinary `samples` rows with `parent_sample_id` and
`prefix_steps`, so the audit's SQL sees them beside the samples they came from.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

GENERATING_RECIPES = ("scdpo", "sipf_orpo")  # recipes whose step data are `samples` rows
SAMPLES_FILE, LABELS_FILE, PROCESS_FILE, PRM_DIR = "samples.parquet", "labels.parquet", "process.parquet", "prm"
NODES_FILE = "nodes.parquet"


def _generated_tokens(rows: list[dict]) -> int:
    return sum(row["n_tokens"] for row in rows)


def run_steps(*, recipe: str, model_dir: str, problems_path: str, samples_path: str, labels_path: str,
              iteration: int, out: str, steps_config, prm_config, mcts_config=None) -> dict:
    """Write the recipe's step-level tables into `out`; returns the stage's summary."""
    from factory.lineage import read_table, write_table
    from factory.params import as_dict
    from factory.schema import from_rows

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"problems": problems_path, "samples": samples_path, "labels": labels_path}
    summary: dict = {"recipe": recipe, "iteration": iteration}
    generated: list[dict] = []
    generated_labels = pa.table({})
    process: list[pa.Table] = []
    params: dict = {"recipe": recipe}
    mid = None
    if recipe in (*GENERATING_RECIPES, "mcts_dpo"):
        from factory.lineage import model_id

        mid = model_id(model_dir)  # hashes the weights: once
    nodes: list[dict] = []
    if recipe == "mcts_dpo":
        nodes, summary["search"] = _search(model_dir=model_dir, policy_id=mid, problems_path=problems_path,
                                           labels_path=labels_path, iteration=iteration, config=mcts_config)
        params |= {"mcts": as_dict(mcts_config)}
        summary["generated"] = {"rows": len(nodes), "tokens": summary["search"]["generated_tokens"],
                                "correct": summary["search"]["correct_terminal_nodes"],
                                "parents": summary["search"]["expansions"]}
    if recipe in GENERATING_RECIPES:
        from factory.generators import steps as step_generators
        from factory.labelers import label_samples
        from factory.modeling import load_model

        params |= {"steps": as_dict(steps_config)}
        problems_table = read_table(problems_path, "problems")
        problems, kept = problems_table.to_pylist(), read_table(samples_path, "samples").to_pylist()
        labels = read_table(labels_path, "labels").to_pylist()
        model, tokenizer = load_model(model_dir)
        make = step_generators.step_controlled_negatives if recipe == "scdpo" else step_generators.mc_rollouts
        generated = make(model, tokenizer, problems, kept, labels, steps_config, model_id=mid, iteration=iteration)
        generated_labels = label_samples(from_rows(generated, "samples"), problems_table,
                                         samples_source=str(out_dir / SAMPLES_FILE), labelers=("gold",))
        summary["generated"] = {"rows": len(generated), "tokens": _generated_tokens(generated),
                                "correct": sum(c is True for c in generated_labels.column("correct").to_pylist()),
                                "parents": len({row["parent_sample_id"] for row in generated})}
        if recipe == "sipf_orpo":
            params |= {"prm": as_dict(prm_config)}
    write_table(from_rows(generated, "samples"), out_dir / SAMPLES_FILE, kind="samples", stage="steps",
                params=params, inputs=inputs, model_id=mid)
    labels_table = generated_labels if generated else from_rows([], "labels")
    write_table(labels_table, out_dir / LABELS_FILE, kind="labels", stage="steps", params=params,
                inputs={"samples": out_dir / SAMPLES_FILE, "problems": problems_path})
    if recipe == "sipf_orpo":
        process, summary["process"] = _process_rewards(
            model_dir=model_dir, problems=problems, kept=kept, labels=labels, rollouts=generated,
            rollout_labels=generated_labels.to_pylist(), steps_config=steps_config, prm_config=prm_config,
            out_dir=out_dir, policy_id=mid, tokenizer=tokenizer)
    process_table = pa.concat_tables(process) if process else from_rows([], "process")
    write_table(process_table, out_dir / PROCESS_FILE, kind="process", stage="steps", params=params,
                inputs=inputs | {"rollouts": out_dir / SAMPLES_FILE})
    write_table(from_rows(nodes, "nodes"), out_dir / NODES_FILE, kind="nodes", stage="steps", params=params,
                inputs={"problems": problems_path, "labels": labels_path}, model_id=mid)
    return summary


def _search(*, model_dir: str, policy_id: str, problems_path: str, labels_path: str, iteration: int,
            config) -> tuple[list, dict]:
    """MCTS-DPO's trees: one per problem the iteration sampled, the first `config.problems` with a gold answer."""
    from factory.generators.tree import tree_search
    from factory.lineage import read_table
    from factory.modeling import load_model

    sampled = set(read_table(labels_path, "labels").column("problem_id").to_pylist())
    problems = [p for p in read_table(problems_path, "problems").to_pylist()
                if p["problem_id"] in sampled and p["gold_answer"] is not None]
    if config.problems:
        problems = problems[: config.problems]
    model, tokenizer = load_model(model_dir)
    return tree_search(model, tokenizer, problems, config, model_id=policy_id, iteration=iteration)


def _process_rewards(*, model_dir, problems, kept, labels, rollouts, rollout_labels, steps_config, prm_config,
                     out_dir: Path, policy_id: str, tokenizer) -> tuple[list[pa.Table], dict]:
    """SIPF's process feedback: rollout step scores, a PRM trained on them, the PRM's scores of every kept sample."""
    from factory.labelers.process import error_drop_rate, rollout_scores
    from factory.lineage import model_id, write_model_lineage
    from factory.modeling import format_prompt
    from factory.params import as_dict
    from factory.steps import split_steps
    from train.prm import path_reward, score_steps, train_prm

    scored = rollout_scores(kept, labels, rollouts, rollout_labels, steps_config, model_id=policy_id)
    question = {p["problem_id"]: p["question"] for p in problems}
    text = {s["sample_id"]: s["text"] for s in kept}
    examples = [{"prompt": format_prompt(tokenizer, question[row["problem_id"]]),
                 "steps": split_steps(text[row["sample_id"]], steps_config.delimiter),
                 "labels": row["step_labels"], "scores": row["step_scores"]} for row in scored.to_pylist()]
    summary: dict = {"rollout_scored_samples": scored.num_rows,
                     "step_labels": sum(len(e["labels"]) for e in examples),
                     "good_step_share": _share(label for e in examples for label in e["labels"]),
                     "calculator_located_errors": error_drop_rate(scored, pa.Table.from_pylist(labels))}
    if not examples:
        print("steps: no sample could be rolled out; no process reward model", flush=True)
        return [scored], summary
    prm_dir = out_dir / PRM_DIR
    metrics = train_prm(examples=examples, model_dir=model_dir, out_dir=prm_dir, config=prm_config)
    record = write_model_lineage(prm_dir, stage="prm", parent=policy_id,
                                 data={"rollouts": out_dir / SAMPLES_FILE}, params={"prm": as_dict(prm_config)},
                                 metrics=metrics)
    summary["prm"] = {**metrics, "model_id": record["model_id"]}
    steps = [split_steps(s["text"], steps_config.delimiter) for s in kept]
    judged = [(s, st) for s, st in zip(kept, steps) if st]
    scores = score_steps(str(prm_dir), [format_prompt(tokenizer, question[s["problem_id"]]) for s, _ in judged],
                         [st for _, st in judged])
    from factory.schema import from_rows

    prm_rows = [{"sample_id": s["sample_id"], "problem_id": s["problem_id"], "source": "prm",
                 "step_scores": step_scores, "step_labels": None,
                 "path_reward": path_reward(step_scores, prm_config.aggregate), "n_rollouts": None,
                 "model_id": model_id(prm_dir)} for (s, _), step_scores in zip(judged, scores)]
    summary["prm_scored_samples"] = len(prm_rows)
    return [scored, from_rows(sorted(prm_rows, key=lambda r: r["sample_id"]), "process")], summary


def _share(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def read_step_data(steps_dir: str | None):
    """The `steps` stage's tables as `factory.pairs.StepData` (empty when no folder is given)."""
    from factory.lineage import read_provenance, read_table
    from factory.pairs import StepData

    if not steps_dir:
        return StepData()
    folder = Path(steps_dir)
    params = read_provenance(folder / SAMPLES_FILE)["params"]
    nodes = read_table(folder / NODES_FILE, "nodes").to_pylist() if (folder / NODES_FILE).exists() else []
    return StepData(samples=read_table(folder / SAMPLES_FILE, "samples").to_pylist(),
                    labels=read_table(folder / LABELS_FILE, "labels").to_pylist(),
                    process=read_table(folder / PROCESS_FILE, "process").to_pylist(), nodes=nodes,
                    recipe=params["recipe"], delimiter=params.get("steps", {}).get("delimiter", "\n"))

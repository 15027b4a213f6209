"""The `factory` command: one thin subcommand per library call.

Heavy libraries (torch, transformers, trl) are imported inside the commands
that need them, so `factory --help` and the table commands start fast.

The training commands (`TRAINING_COMMANDS`) also run as N processes under
`accelerate launch` or torchrun, one per GPU: they train together, and the
main process alone writes the files. Any other command so launched runs once,
on rank 0 as a plain process (`_run_here`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from factory.params import DEFAULT_PARAMS


def _params(args) -> dict:
    """The params file's contents; outside a project (no params.yaml, none named) every default applies.

    A command run for iteration K (`--iteration K`) sees the sections of params
    `iterations.K` merged over the top-level ones: per-iteration knobs.
    """
    from factory.params import load_params, with_iteration

    from factory.params import validate_params

    if args.params == DEFAULT_PARAMS and not Path(args.params).exists():
        return {}
    params = load_params(args.params)
    validate_params(params, path=args.params)  # the whole file, before any work
    iteration = getattr(args, "iteration", None)
    return params if iteration is None else with_iteration(params, iteration, path=args.params)


def cmd_problems(args) -> None:
    """Write a problems table from one or more sources, carving the flywheel's splits out of theirs.

    Example: factory problems arith --out data/problems.parquet
    Example: factory problems gsm8k:../shared/data/gsm8k/test.jsonl --out gsm8k_test.parquet
    Example: factory problems jsonl:math500.jsonl --out math.parquet  (MATH's problem/solution/answer fields)
    Example: factory problems gsm8k:train.jsonl gsm8k:test.jsonl --carve train:dev=200 --carve train:answers=4000 --out data/problems.parquet
    """
    from factory.inputs import check_outputs
    from factory.lineage import write_table
    from factory.params import as_dict, section
    from factory.problems import load_source, source_inputs
    from factory.problems.arith import ArithConfig
    from factory.problems.files import dropped_path as default_dropped_path
    from factory.problems.splits import carve_splits, parse_carve
    from factory.schema import from_rows

    carves = [parse_carve(text) for text in args.carve]  # a misspelt carve fails before any loading
    arith = None
    record: dict = {"source": args.source if len(args.source) > 1 else args.source[0], "split": args.split}
    if carves:
        record |= {"carve": [f"{c.source}:{c.target}={c.count}" for c in carves], "carve_seed": args.carve_seed}
    check_outputs(out=args.out, dropped=args.dropped or default_dropped_path(args.out))
    if "arith" in args.source:
        params = _params(args)
        arith = section(params.get("problems", {}), "arith", ArithConfig, path=args.params)
        record["arith"] = as_dict(arith)
        if args.split is not None and args.split not in arith.sizes:
            raise ValueError(f"arith: unknown split {args.split!r} (--split); known splits: "
                             f"{', '.join(name for name, size in arith.sizes.items())}")
    problems, dropped, inputs = [], [], {}
    for index, spec in enumerate(args.source):
        loaded, lost = load_source(spec, split=args.split, arith_config=arith)
        problems += loaded
        dropped += lost
        for name, path in source_inputs(spec).items():
            inputs[name if len(args.source) == 1 else f"{name}_{index}"] = path
    problems, repeated = _first_of_each_problem(problems, args.source)
    dropped += repeated
    problems = carve_splits(problems, carves, seed=args.carve_seed)
    out = Path(args.out)
    label = " ".join(args.source)
    write_table(from_rows(problems, "problems", source=label), out, kind="problems",
                stage="problems", params=record, inputs=inputs)
    dropped_path = Path(args.dropped) if args.dropped else default_dropped_path(out)
    write_table(from_rows(dropped, "dropped", source=label), dropped_path, kind="dropped",
                stage="problems", params=record, inputs=inputs)
    counts: dict[str, int] = {}
    for p in problems:
        counts[p["split"]] = counts.get(p["split"], 0) + 1
    print(f"{out}: {len(problems)} problems ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
          f"{len(dropped)} dropped -> {dropped_path}")


def _first_of_each_problem(problems: list[dict], sources: list[str]) -> tuple[list[dict], list[dict]]:
    """Across several sources a problem_id seen before (the same question twice) drops the later row, with why."""
    import json

    if len(sources) == 1:  # each loader already drops its own repeats
        return problems, []
    first: dict[str, dict] = {}
    kept, dropped = [], []
    for problem in problems:
        earlier = first.setdefault(problem["problem_id"], problem)
        if earlier is problem:
            kept.append(problem)
            continue
        dropped.append({"row_id": problem["problem_id"], "table": "problems", "stage": "problems",
                        "filter": "duplicate",
                        "reason": f"{problem['source']} split {problem['split']!r}: the same problem as in "
                                  f"{earlier['source']} split {earlier['split']!r}",
                        "row": json.dumps(problem, ensure_ascii=False, default=str)})
    return kept, dropped


def base_source(base_model: str) -> str | None:
    """What a base model was made from, for its lineage's `parent` (None: built from scratch).

    A GGUF file is named by its file name and content fingerprint (`gguf:NAME.gguf@HASH`), not by where it
    lies on this machine; a local folder by its model id; a Hub id as `hub:NAME`.
    """
    from factory.lineage import model_id
    from factory.modeling import TINY, is_gguf

    if base_model == TINY:
        return None
    if is_gguf(base_model) and Path(base_model).is_file():
        from factory.ids import file_fingerprint

        return f"gguf:{Path(base_model).name}@{file_fingerprint(base_model)[:16]}"
    return model_id(base_model)


def cmd_base(args) -> None:
    """Save the base model: the tiny model built from scratch on the task, or a Hub id, local folder or GGUF file.

    A GGUF file (warmup.base_model: path/to/model.gguf) is dequantized and saved as an ordinary HF folder with its
    tokenizer and chat template.

    The warm-up and every self-training step start from it (params: warmup.base_model, model).
    Example: factory base --problems data/problems.parquet --out models/base
    """
    from factory.lineage import read_table, write_model_lineage
    from factory.modeling import TINY, TinyModelConfig
    from factory.params import as_dict, section
    from factory.problems.arith import FAMILIES
    from train.pretrain import PretrainConfig
    from train.sft import WarmupConfig, build_base

    params = _params(args)
    config = section(params, "warmup", WarmupConfig, path=args.params)
    tiny = section(params, "model", TinyModelConfig, path=args.params)
    pretraining = section(params, "pretrain", PretrainConfig, path=args.params)
    problems = read_table(args.problems, "problems").to_pylist()
    arith_task = any(p["source"] == "arith" for p in problems)  # the corpus must not share its story families
    task_families = tuple((params.get("problems") or {}).get("arith", {}).get("families") or FAMILIES) \
        if arith_task else ()
    summary = build_base(problems=problems, base_model=config.base_model, tiny=tiny, out_dir=args.out,
                         pretraining=pretraining, task_families=task_families)
    made = {"pretrain": as_dict(pretraining)} if config.base_model == TINY else {}
    record = write_model_lineage(
        args.out, stage="base", parent=base_source(config.base_model),
        data={"problems": args.problems}, params={"base_model": config.base_model, "model": as_dict(tiny), **made},
        metrics=summary,
    )
    pretrained = (f", pretrained {summary['pretrain_steps']} steps on {summary['pretrain_documents']} documents, "
                  f"loss {summary['pretrain_first_loss']} -> {summary['pretrain_final_loss']}"
                  if "pretrain_steps" in summary else "")
    print(f"{args.out}: base model {record['model_id']} ({summary['parameters'] / 1e6:.2f}M parameters, "
          f"vocabulary {summary['vocab_size']}{pretrained})")


def cmd_warmup(args) -> None:
    """Train the warm-up model (SFT from the base on gold rationales) with early stopping on dev accuracy.

    Example: factory warmup --problems data/problems.parquet --base models/base --out models/iter_0
    """
    from factory.io import write_json
    from factory.lineage import model_id, read_table, write_model_lineage
    from factory.params import as_dict, section
    from train.common import is_main_process
    from train.sft import WarmupConfig, main

    config = section(_params(args), "warmup", WarmupConfig, path=args.params)
    problems = read_table(args.problems, "problems").to_pylist()
    summary = main(problems=problems, base_dir=args.base, out_dir=args.out, config=config)
    if not is_main_process():  # under `accelerate launch`: the main process writes the rest
        return
    record = write_model_lineage(
        args.out, stage="warmup", parent=model_id(args.base), data={"problems": args.problems},
        params={"warmup": as_dict(config)},
        metrics={k: summary[k] for k in ("best_epoch", "dev_accuracy", "parameters", "train_problems", "steps")},
    )
    if args.curve:
        write_json(args.curve, summary["curve"])
    print(f"{args.out}: model {record['model_id']}, dev accuracy {summary['dev_accuracy']:.3f} "
          f"at epoch {summary['best_epoch']}")


def cmd_train(args) -> None:
    """One iteration's training step: the recipe's own (params `recipe`; `factory recipe --list` lists them).

    Reads params `recipe`, `sample`, `filter`, `dpo`, `self_train`, `orpo` and `preconditions` (the recipe's
    precondition, checked on --label-summary and --steps-summary before training); the second round of sampling runs
    where `executor` says.
    Example: factory train --iteration 1 --problems data/problems.parquet --prev models/iter_0 --base models/base --pairs data/iter_1/pairs.parquet --samples data/iter_1/samples.parquet --labels data/iter_1/labels.parquet --work data/iter_1/self_train --out models/iter_1
    """
    from factory.executor import ExecutorConfig
    from factory.filters import FilterConfig
    from factory.generators.sampling import SamplingConfig, check_backend
    from factory.io import write_json
    from factory.params import section
    from train.common import is_main_process
    from train.dpo import DPOTrainConfig
    from train.iteration import Iteration, SelfTrainConfig
    from train.orpo import ORPORunConfig

    params = _params(args)
    recipe = _recipe(args, params)
    precondition = _check_precondition(args, params, recipe)  # before any training: it may stop the run
    sampling = section(params, "sample", SamplingConfig, path=args.params)
    if recipe.samples_again:  # a second round of sampling follows DPO: fail before DPO, not after
        check_backend(sampling)
    iteration = Iteration(
        recipe=recipe.name, iteration=args.iteration, problems_path=args.problems, prev_dir=args.prev,
        base_dir=args.base, pairs_path=args.pairs, samples_path=args.samples, labels_path=args.labels,
        work=Path(args.work), out=Path(args.out), sampling=sampling,
        filter_config=section(params, "filter", FilterConfig, path=args.params),
        dpo_config=section(params, "dpo", DPOTrainConfig, path=args.params),
        self_train=section(params, "self_train", SelfTrainConfig, path=args.params),
        orpo_config=section(params, "orpo", ORPORunConfig, path=args.params),
        pair_rule=recipe.pairs.name if recipe.pairs else None,
        executor=section(params, "executor", ExecutorConfig, path=args.params))
    summary = recipe.train(iteration)
    if not is_main_process():  # under `accelerate launch`: the main process writes the rest
        return
    summary["precondition"] = precondition.record() if precondition else None
    if args.summary:
        write_json(args.summary, summary)
    if sft := summary.get("sft"):
        print(f"{args.out}: model {summary['model_id']} ({recipe.name}), SFT on {sft['examples']} examples for "
              f"{sft['steps']} steps, dev accuracy {sft['dev_accuracy']:.3f} at step {sft['best_step']}")
    elif orpo := summary.get("orpo"):
        print(f"{args.out}: model {summary['model_id']} ({recipe.name}), ORPO on {orpo['pairs']} pairs "
              f"from {orpo['pairs_files']} iteration(s)")
    else:
        dpo = summary["dpo"]
        print(f"{args.out}: model {summary['model_id']} ({recipe.name}), weighted DPO on {dpo['pairs']} pairs"
              + (f" ({dpo['skipped']})" if "skipped" in dpo else f", reward accuracy {dpo['reward_accuracy']}"))


def _check_precondition(args, params: dict, recipe):
    """The recipe's precondition on this iteration's signals (--label-summary, --steps-summary): a one-line
    warning when it fails or cannot be measured; with params `preconditions.gate: fail`, a failing one stops."""
    import json

    from factory.params import section
    from factory.preconditions import PreconditionFailed, PreconditionsConfig, check_recipe, iteration_signals
    from train.common import is_main_process

    config = section(params, "preconditions", PreconditionsConfig, path=args.params)
    read = [json.loads(Path(path).read_text()) if path else None for path in (args.label_summary, args.steps_summary)]
    check = check_recipe(recipe, iteration_signals(*read), config)
    if check is None or check.holds:
        return check
    if check.holds is False and config.gate == "fail":
        raise PreconditionFailed(f"{check.message}; params preconditions.gate is fail, so it does not train")
    if is_main_process():
        print(f"warning: {check.message}", file=sys.stderr, flush=True)
    return check


def _recipe(args, params: dict):
    """The recipe a command runs: --recipe (a hand run's override), else params `recipe`, checked against params."""
    from factory.recipes import check_params, get_recipe

    if getattr(args, "recipe", None):
        return get_recipe(args.recipe)
    return check_params(params, path=args.params) if params else get_recipe("dpo_st")


def cmd_dpo(args) -> None:
    """Train a model with DPO (+ NLL on chosen) on preference pairs, from the previous model.

    Reads params `dpo` when the params file exists or is named; otherwise the defaults apply.
    Example: factory dpo --pairs data/iter_1/pairs.parquet --model models/iter_0 --out models/iter_1_dpo
    """
    from factory.lineage import model_id, read_table, write_model_lineage
    from factory.params import as_dict, section
    from train.common import is_main_process
    from train.dpo import DPOTrainConfig, main

    config = section(_params(args), "dpo", DPOTrainConfig, path=args.params)
    pairs = read_table(args.pairs, "pairs").to_pylist()
    parent = model_id(args.model)
    summary = main(pairs=pairs, model_dir=args.model, out_dir=args.out, config=config)
    if not is_main_process():  # under `accelerate launch`: the main process writes the rest
        return
    metrics = {k: summary[k] for k in ("train_loss", "reward_accuracy", "reward_margin", "pairs", "steps")}
    record = write_model_lineage(args.out, stage="dpo", parent=parent, data={"pairs": args.pairs},
                                 params={"dpo": as_dict(config)}, metrics=metrics)
    accuracy = "n/a" if summary["reward_accuracy"] is None else f"{summary['reward_accuracy']:.3f}"
    print(f"{args.out}: model {record['model_id']} from {parent}, {summary['pairs']} pairs, {summary['steps']} "
          f"steps, final loss {summary['train_loss']}, reward accuracy {accuracy}")


def cmd_eval(args) -> None:
    """Greedy accuracy per split, decoded with the calculator, as DVC metrics JSON.

    One decoder batch per checkpointed shard, run where params `executor` says (local, or Ray actors): a killed
    run resumes, and neither changes a byte.

    Example: factory eval --model models/iter_0 --problems data/problems.parquet --out metrics/iter_0.json
    """
    import pyarrow as pa

    from factory.evaluate import EvalConfig, evaluate_in_shards, select_problems
    from factory.executor import ExecutorConfig
    from factory.ids import content_hash, file_fingerprint
    from factory.io import write_json
    from factory.lineage import model_id, read_table, write_table
    from factory.params import as_dict, section
    from factory.shards import clear_shards, shard_dir_for

    params = _params(args)
    config = section(params, "eval", EvalConfig, path=args.params)
    if args.splits:
        config = EvalConfig(**{**as_dict(config), "splits": tuple(args.splits.split(","))})
    problems = select_problems(read_table(args.problems, "problems").to_pylist(), config.splits, args.problems)
    mid = model_id(args.model)
    shard_dir = shard_dir_for(args.predictions or args.out)
    evaluation = evaluate_in_shards(
        args.model, problems, config, shard_dir=shard_dir,
        fingerprint=content_hash(mid, file_fingerprint(args.problems), as_dict(config)),
        executor=section(params, "executor", ExecutorConfig, path=args.params))
    metrics = evaluation.metrics()
    write_json(args.out, metrics)
    if args.predictions:
        rows = evaluation.sample_rows(model_id=mid, config=config, iteration=args.iteration)
        write_table(pa.Table.from_pylist(rows), args.predictions, kind="samples", stage="eval",
                    params=as_dict(config), inputs={"problems": args.problems}, model_id=mid)
    clear_shards(shard_dir)
    for split, m in metrics.items():
        print(f"{split}: accuracy {m['accuracy']:.3f} ± {m['stderr']:.3f} (n={m['n']}, unparseable {m['unparseable']})")


def cmd_label(args) -> None:
    """Label samples: extracted answer, calculator checks, and the chosen labelers (gold, vote).

    SAMPLES is Parquet or JSONL with `problem_id` and `text` (and optionally `sample_id`).
    `--labelers vote` labels without reading gold (ScPO); `--votes` writes one row per problem.
    Example: factory label samples.jsonl --problems data/problems.parquet --out labels.parquet --votes votes.parquet
    """
    import pyarrow as pa

    from factory.ids import content_id
    from factory.inputs import check_outputs, read_rows
    from factory.labelers import check_labelers, label_samples, label_summary, vote_table
    from factory.lineage import read_table, write_table

    labelers = check_labelers(args.labelers.split(","))
    if args.votes and "vote" not in labelers:
        raise ValueError("--votes needs the vote labeler (--labelers ...,vote)")
    check_outputs(out=args.out, votes=args.votes, summary=args.summary)
    rows = read_rows(args.samples, "samples")  # a repeated sample_id is an error: it would vote twice
    samples = rows.table
    for field in ("problem_id", "text"):
        if field not in samples.column_names:
            raise ValueError(f"{args.samples}: samples need a {field!r} field (found: {', '.join(samples.column_names)})")
        column = samples.column(field).to_pylist()
        for row, value in enumerate(column):
            if not isinstance(value, str):
                raise ValueError(f"{args.samples}: {rows.where(row)} field {field!r}: expected a string, got {value!r}")
    if "sample_id" not in samples.column_names:
        # rows without ids are distinct samples even when two share a text (both vote): the k-th repeat of a
        # (problem_id, text) gets an id of its own, so every label's sample_id is unique
        ids, seen = [], {}
        for problem_id, text in zip(samples.column("problem_id").to_pylist(), samples.column("text").to_pylist()):
            repeat = seen[problem_id, text] = seen.get((problem_id, text), -1) + 1
            ids.append(content_id("sample", problem_id, text, *([repeat] if repeat else [])))
        samples = samples.append_column("sample_id", pa.array(ids, pa.string()))
    problems = read_table(args.problems, "problems")
    labels = label_samples(samples, problems, samples_source=str(args.samples), labelers=labelers,
                           problems_source=str(args.problems))
    record, inputs = {"labelers": list(labelers)}, {"samples": args.samples, "problems": args.problems}
    write_table(labels, args.out, kind="labels", stage="label", params=record, inputs=inputs)
    votes = vote_table(labels) if "vote" in labelers else None
    if args.votes:
        write_table(votes, args.votes, kind="votes", stage="label", params=record, inputs=inputs)
    statuses = labels.column("answer_status").value_counts().to_pylist()
    summary = ", ".join(f"{s['values']} {s['counts']}" for s in sorted(statuses, key=lambda s: s["values"]))
    wrong = sum(labels.column("calc_wrong").to_pylist())
    if args.summary:
        from factory.io import write_json

        summary_figures = label_summary(labels, votes)
        if "n_tokens" in samples.column_names:  # the sampling budget, for comparing recipes at equal cost
            summary_figures["sample_tokens"] = sum(samples.column("n_tokens").to_pylist())
        write_json(args.summary, summary_figures)
    print(f"{args.out}: {labels.num_rows} labels ({summary}); {wrong} wrong calculator annotations")


def cmd_filter(args) -> None:
    """Drop samples that fail the filters (final answer, length, near-duplicates), keeping each with its reason.

    Reads params `filter` when the params file exists or is named; otherwise the defaults apply.
    Example: factory filter data/iter_1/samples.parquet --labels data/iter_1/labels.parquet --out data/iter_1/kept.parquet --dropped data/iter_1/dropped.parquet --counts metrics/iter_1_filter.json
    """
    from factory.filters import FilterConfig, run_filters
    from factory.inputs import check_outputs, read_rows
    from factory.io import write_json
    from factory.lineage import write_table
    from factory.params import as_dict, section

    config = section(_params(args), "filter", FilterConfig, path=args.params)
    check_outputs(out=args.out, dropped=args.dropped, counts=args.counts)
    samples = read_rows(args.samples, "samples").table
    kept, dropped, counts = run_filters(samples, read_rows(args.labels, "labels").table, config,
                                        samples_source=str(args.samples), labels_source=str(args.labels))
    models = set(kept.column("model_id").to_pylist())
    record, inputs = {"filter": as_dict(config)}, {"samples": args.samples, "labels": args.labels}
    write_table(kept, args.out, kind="samples", stage="filter", params=record, inputs=inputs,
                model_id=models.pop() if len(models) == 1 else None)
    write_table(dropped, args.dropped, kind="dropped", stage="filter", params=record, inputs=inputs)
    if args.counts:
        write_json(args.counts, counts)
    reasons = "; ".join(f"{name}: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items())
                        for name, kinds in counts["dropped"].items() if kinds)
    print(f"{args.out}: kept {counts['kept']} of {counts['input']} samples; "
          f"{counts['input'] - counts['kept']} dropped -> {args.dropped}" + (f" ({reasons})" if reasons else ""))


def cmd_sample(args) -> None:
    """Sample N rationales per problem from a model, with the calculator, in resumable shards.

    Params come from the `sample` section (n, temperature, split, limit, backend: hf | vllm, ...); the shards
    run where `executor` says (local, or Ray actors), which changes no byte.
    Example: factory sample --model models/iter_0 --problems data/problems.parquet --iteration 1 --out data/iter_1/samples.parquet
    """
    from factory.executor import ExecutorConfig
    from factory.generators.sampling import SamplingConfig, sample_to_file
    from factory.params import section

    params = _params(args)
    config = section(params, "sample", SamplingConfig, path=args.params)
    rows = sample_to_file(model_dir=args.model, problems_path=args.problems, out=args.out, config=config,
                          iteration=args.iteration, executor=section(params, "executor", ExecutorConfig,
                                                                      path=args.params))
    print(f"{args.out}: {rows} samples ({config.n} per problem of split {config.split!r})")


def cmd_steps(args) -> None:
    """Make the recipe's step-level data: SCDPO's step-controlled continuations, SIPF's rollouts and PRM, or MCTS-DPO's search trees.

    The recipe (params `recipe`) makes them and reads its own params sections (`steps`, `prm`, `mcts`); for a
    recipe without step data it writes the same tables, empty. Output folder: samples.parquet (generated rows),
    labels.parquet, process.parquet (step scores), nodes.parquet (tree nodes), and prm/ (a process reward model).
    Example: factory steps --model models/iter_0 --problems data/problems.parquet --samples data/iter_1/kept.parquet --labels data/iter_1/labels.parquet --iteration 1 --out data/iter_1/steps
    """
    from factory.io import write_json
    from factory.step_stage import run_steps

    params = _params(args)
    recipe = _recipe(args, params)
    summary = run_steps(recipe=recipe, model_dir=args.model, problems_path=args.problems, samples_path=args.samples,
                        labels_path=args.labels, iteration=args.iteration, out=args.out, params=params,
                        params_path=str(args.params))
    if args.summary:
        write_json(args.summary, summary)
    generated, search = summary.get("generated"), summary.get("search")
    if search:
        made = (f"{search['nodes']} tree nodes ({search['generated_tokens']} tokens) from {search['trees']} trees, "
                f"{search['committed_correct']} of whose committed paths reach the gold answer")
    elif generated:
        made = f"{generated['rows']} generated rows ({generated['tokens']} tokens) from {generated['parents']} samples"
    else:
        made = "no step-level data"
    print(f"{args.out}: {recipe.name}: {made}")


def cmd_pairs(args) -> None:
    """Make preference pairs (TRL's prompt/chosen/rejected format) from labelled samples.

    The recipe's pair rule (params `recipe`) makes them, with params `pairs` and the rule's own sub-section; a
    recipe that trains on no pairs (sft, self_train) gets an empty table, so the pipeline has one shape.
    Example: factory pairs --problems data/problems.parquet --samples data/iter_1/kept.parquet --labels data/iter_1/labels.parquet --model models/iter_0 --iteration 1 --out data/iter_1/pairs.parquet
    """
    from factory.ids import content_hash
    from factory.inputs import check_outputs, read_rows
    from factory.io import write_json
    from factory.lineage import model_id, read_table, write_table
    from factory.modeling import check_model_location
    from factory.pairs import check_inputs, no_pairs, pairs_table
    from factory.params import as_dict
    from factory.recipes import pairs_settings
    from factory.step_stage import read_step_data

    params = _params(args)
    recipe = _recipe(args, params)
    config = pairs_settings(recipe.pairs, params, path=args.params) if recipe.pairs else None
    check_outputs(out=args.out, summary=args.summary)
    problems_table, sample_rows = read_table(args.problems, "problems"), read_rows(args.samples, "samples")
    samples_table, labels_table = sample_rows.table, read_table(args.labels, "labels")
    problems, samples, labels = problems_table.to_pylist(), samples_table.to_pylist(), labels_table.to_pylist()
    for field in ("text", "sample_id", "problem_id"):  # pairs need the ids `factory label` gave every sample
        if field not in samples_table.column_names:
            raise ValueError(f"{args.samples}: samples table has no column {field!r}")
        for index, sample in enumerate(samples):
            if not isinstance(sample[field], str):
                raise ValueError(f"{args.samples}: {sample_rows.where(index)} field {field!r}: expected a string, "
                                 f"got {sample[field]!r}")
    check_inputs(problems, samples, labels, sources={"samples": str(args.samples), "labels": str(args.labels),
                                                     "problems": str(args.problems)})
    check_model_location(args.model, needs="tokenizer_config.json")  # only its tokenizer formats the prompts

    from transformers import AutoTokenizer

    from factory.modeling import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_for = lambda question: format_prompt(tokenizer, question)  # noqa: E731
    if recipe.pairs is None:
        pairs, summary = no_pairs(recipe.name, args.iteration, samples)
    else:
        pairs, summary = pairs_table(recipe.pairs, problems_table, samples_table, labels_table, prompt_for=prompt_for,
                                     iteration=args.iteration, config=config, steps=read_step_data(args.steps))
    # The prompt format is part of what made the rows: record it (not the whole model's weights).
    record = {"recipe": recipe.name, "pairs": as_dict(config) if config else None, "iteration": args.iteration,
              "model": str(args.model), "prompt_format": content_hash(prompt_for("{question}"))}
    inputs = {"problems": args.problems, "samples": args.samples, "labels": args.labels}
    if args.steps:
        inputs["steps"] = args.steps
    write_table(pairs, args.out, kind="pairs", stage="pairs", params=record, inputs=inputs,
                model_id=model_id(args.model))  # the model whose samples these are (audits/wrong_model.sql checks it)
    if args.summary:
        write_json(args.summary, summary)
    skipped = ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items())
    print(f"{args.out}: {summary['pairs']} {summary['recipe']} pairs from {summary['problems_with_pairs']} of "
          f"{summary['problems_seen']} problems (skipped: {skipped})")


def cmd_report(args) -> None:
    """Gather every iteration's metrics into one metrics file and one plot file, and optionally an HTML page.

    The HTML page is self-contained (inline SVG plots, no network): accuracy per iteration (and per recipe
    from `factory compare` files), pair yield, vote share vs correctness, chosen vs rejected lengths,
    pair and answer-status tables and the audit gates' results.
    Example: factory report --metrics metrics/iterations --out metrics/flywheel.json --plot metrics/flywheel_plot.json --html metrics/report.html --compare bench/results/compare-scpo-2seeds.json
    """
    from factory.io import write_json
    from factory.report import flywheel_report, format_table

    params = _params(args)
    rows = flywheel_report(args.metrics, params)
    recipe = params.get("recipe", "dpo_st")
    write_json(args.out, {"recipe": recipe} | {f"iter_{r['iteration']}": {k: v for k, v in r.items() if k != "iteration"}
                                               for r in rows})
    if args.plot:
        write_json(args.plot, rows)
    print(format_table(rows))
    if args.html:
        from factory.html_report import write_html_report

        write_html_report(args.html, root=args.root, metrics_dir=args.metrics, params=params,
                          compare_files=args.compare or ())
        print(f"{args.html}: run report")
    if args.screenshot:
        from factory.browser import screenshot

        screenshot(args.html, args.screenshot)
        print(f"{args.screenshot}: the report as Chromium renders it")


def cmd_recipe(args) -> None:
    """Print a recipe (paper, settings, stages) and the `dvc exp run -S ...` line that runs it; or switch params to it.

    With --write, params.yaml gets `recipe: NAME` and the recipe's settings; settings other recipes need go back
    to their defaults (comments and layout are kept). Then `dvc repro` runs the recipe as its paper sets it up.
    Example: factory recipe scpo --write && dvc repro
    """
    from factory.recipes import base, describe, get_recipe, replace_settings

    if args.list or not args.name:
        width = max(map(len, base.RECIPES))
        for recipe in base.RECIPES.values():
            print(f"{recipe.name:<{width}}  {recipe.paper}: {recipe.summary}")
        return
    recipe = get_recipe(args.name)
    print(describe(recipe))
    if args.write:
        from factory.params import load_params, update_params, validate_params

        changes = replace_settings(load_params(args.params), recipe)
        update_params(args.params, changes)
        validate_params(load_params(args.params), path=args.params)
        print(f"{args.params}: " + ", ".join(f"{key}={value}" for key, value in changes.items()))


def cmd_compare(args) -> None:
    """Run recipes over seeds as DVC experiments and print accuracy per iteration with paired differences.

    List the recipes weakest first: each is compared with every one before it (the first is the control).
    Example: factory compare --recipes sft,self_train,dpo_st --seeds 0,1 --out metrics/compare.json
    """
    from factory.compare import baseline_key, format_summary, run_experiments, summarize
    from factory.io import write_json
    from factory.recipes import get_recipe

    recipes = [get_recipe(r).name for r in args.recipes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = run_experiments(recipes, seeds, out=args.out)
    summaries = {split: summarize(results, split) for split in ("test", "test_ood")}
    write_json(args.out, {"baseline": baseline_key(), "runs": results, "summary": summaries})
    for split in summaries:
        print(format_summary(summaries[split]) + "\n")


def cmd_audit(args) -> None:
    """Query every table of every iteration with DuckDB SQL.

    Views: problems, samples, labels, kept, pairs, votes, dropped, eval (each with `iteration` and `file`),
    models (one row per model folder) and files (one row per table file, with its provenance).
    Example: factory audit "SELECT iteration, count(*) AS pairs FROM pairs GROUP BY ALL ORDER BY 1"
    More:
      factory audit "SELECT iteration, avg((NOT majority_correct)::INT) FROM votes WHERE top_answer IS NOT NULL GROUP BY 1"
      factory audit --format json "SELECT s.model_id FROM pairs p JOIN samples s ON s.sample_id = p.rejected_sample_id WHERE p.pair_id = 'pair-…'"
    The SQL runs read-only and confined to the project's tables (no COPY ... TO, ATTACH, or reading other
    files); --unconfined runs it on a writable connection with DuckDB's full file access.
    --format json writes null for NaN and Infinity; --format csv writes NULL as an empty unquoted field and an
    empty string as "" (read it back with DuckDB's read_csv(..., allow_quoted_nulls = false)).
    """
    from factory.audit import ConfinedCatalog, catalog, query, write_rows

    if args.unconfined:
        columns, rows = query(catalog(args.root, iterations=args.iteration or None), args.sql)
    else:
        with ConfinedCatalog(args.root, iterations=args.iteration or None) as confined:
            con = confined.connect()
            try:
                columns, rows = query(con, args.sql)
            finally:
                con.close()
    write_rows(columns, rows, args.format)


def cmd_gate(args) -> None:
    """Run the audit checks (SQL files returning violating rows) on one iteration's tables; fail if any returns rows.

    Thresholds come from params `audit` (DuckDB variables, e.g. getvariable('max_length_ratio')) and the
    test splits from params `eval.splits`. The tables must hold every view the checks read (the shipped ones:
    problems, samples, labels, pairs, nodes). Each check runs alone on a read-only connection that reads only
    these tables: a check that writes (CREATE, COPY, ATTACH, SET, ...) or reads another file fails the gate.
    Example: factory gate data/problems.parquet data/iter_1/samples.parquet data/iter_1/labels.parquet data/iter_1/votes.parquet data/iter_1/pairs.parquet data/iter_1/steps/nodes.parquet --out metrics/iterations/iter_1/audit.json
    """
    from factory.audit import AuditConfig, ConfinedCatalog, GateFailed, failure_message, load_checks, run_checks
    from factory.io import write_json
    from factory.params import section

    params = _params(args)
    config = section(params, "audit", AuditConfig, path=args.params)
    test_splits = (params.get("eval") or {}).get("splits", ["test", "test_ood"])
    checks = load_checks(args.checks or config.checks)
    with ConfinedCatalog(args.root, paths=args.tables, variables=config.as_variables(test_splits)) as confined:
        results = run_checks(confined, checks)
    report = {"passed": all(r.passed for r in results), "checks": {r.check.name: r.summary() for r in results}}
    if args.out:
        write_json(args.out, report)
    for result in results:
        outcome = (result.error.splitlines()[0] if result.error is not None
                   else f"{len(result.rows)} violating row(s)")
        print(f"{'ok  ' if result.passed else 'FAIL'} {result.check.name}: {outcome}")
    if not report["passed"]:
        raise GateFailed(failure_message(results))


def cmd_lineage(args) -> None:
    """Print the ancestry of a pair, sample, problem or model id, or of a table file.

    Back to the warm-up and the base model: the problem, the samples, the model that generated them, that
    model's training data and parent, each file with its stage, params and dvc.lock entry.
    Example: factory lineage pair-0078309ae8295f55
    """
    import json

    from factory.trace import format_tree, trace

    node = trace(args.id, args.root)
    print(json.dumps(node.as_dict(), indent=2, ensure_ascii=False, default=str) if args.json else format_tree(node))


def cmd_export(args) -> None:
    """Write a Hub-ready dataset folder: Parquet per table and split, a dataset card with lineage, lineage.json.

    `datasets.load_dataset(DIR)` loads the pairs; `load_dataset(DIR, "samples")` another table;
    `load_dataset(DIR, "pairs_chat")` the pairs as chat messages, for a model with any chat template (TRL's
    DPOTrainer), and `load_dataset(DIR, "sft_chat")` the SFT data likewise.
    Example: factory export hub/ && python -c "import datasets; print(datasets.load_dataset('hub'))"
    """
    from factory.export import DEFAULT_TABLES, export_dataset

    tables = args.tables.split(",") if args.tables else DEFAULT_TABLES
    lineage = export_dataset(args.dir, root=args.root, tables=tables, iterations=args.iteration or None)
    counts = ", ".join(f"{s['config']}/{s['split']} {s['rows']}" for s in lineage.get("splits", []))
    print(f"{args.dir}: {counts}")


def cmd_push(args) -> None:
    """Upload an exported folder as a Hub dataset (token from HF_TOKEN or `hf auth login`; never printed).

    Example: factory push my-name/factory-dpo-st --dir hub/   (after: factory export hub/)
    """
    from factory.export import push_dataset

    print(push_dataset(args.dir, args.repo_id, private=args.private, revision=args.revision))


def build_parser() -> argparse.ArgumentParser:
    from factory.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="factory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=func.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("problems", cmd_problems, "write a problems table from a source")
    p.add_argument("source", nargs="+", help="arith | gsm8k:PATH_OR_HUB_ID | jsonl:PATH | hf:NAME_OR_DIR (several: "
                   "their problems in one table)")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--split", help="keep only this split (file sources: the split name to record)")
    p.add_argument("--dropped", help="where dropped rows go (default: OUT with .dropped.parquet)")
    p.add_argument("--carve", action="append", default=[], metavar="FROM:TO=N",
                   help="move N problems of split FROM to split TO (repeatable; `answers` keeps no rationale, "
                        "`unlabeled` no gold), e.g. train:dev=200")
    p.add_argument("--carve-seed", type=int, default=0, help="seed of the order in which carved problems are taken")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (arith reads its `problems.arith`)")

    p = command("base", cmd_base, "save the base model (tiny from scratch, or a Hub id / local folder / GGUF file)")
    p.add_argument("--problems", required=True, help="problems Parquet (the tiny tokenizer learns its text)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (reads `warmup.base_model`, `model`)")

    p = command("warmup", cmd_warmup, "train the warm-up model on gold rationales")
    p.add_argument("--problems", required=True, help="problems Parquet with train and dev splits")
    p.add_argument("--base", required=True, help="base model folder (from `factory base`)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--curve", help="write the dev-accuracy curve as JSON (for dvc plots)")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("dpo", cmd_dpo, "train with DPO (+ NLL) on preference pairs from the previous model")
    p.add_argument("--pairs", required=True, help="pairs Parquet (prompt, chosen, rejected)")
    p.add_argument("--model", required=True, help="previous model folder: the starting policy and the reference")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (reads its `dpo` section)")

    p = command("train", cmd_train, "one iteration's training step: the recipe's (" + ", ".join(RECIPES) + ")")
    p.add_argument("--recipe", metavar="NAME",
                   help="a hand run's recipe (default: params `recipe`): " + " | ".join(RECIPES))
    p.add_argument("--iteration", type=int, required=True, help="this iteration's number")
    p.add_argument("--problems", required=True, help="problems Parquet")
    p.add_argument("--prev", required=True, help="previous iteration's model folder")
    p.add_argument("--base", required=True, help="base model folder (self-training restarts from it)")
    p.add_argument("--pairs", required=True, help="this iteration's pairs Parquet (dpo_st)")
    p.add_argument("--samples", required=True, help="this iteration's samples (self_train pools them)")
    p.add_argument("--labels", required=True, help="labels of --samples")
    p.add_argument("--work", required=True, help="folder for the second round's tables")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--summary", help="write the step's summary as JSON")
    p.add_argument("--label-summary", help="this iteration's label.json: pass@k and the vote, for the precondition")
    p.add_argument("--steps-summary", help="this iteration's steps.json: the step-level signals, for the precondition")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("eval", cmd_eval, "greedy accuracy per split, as DVC metrics")
    p.add_argument("--model", required=True, help="model folder or Hub id")
    p.add_argument("--problems", required=True, help="problems Parquet")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    p.add_argument("--predictions", help="also write the decoded samples (Parquet)")
    p.add_argument("--splits", help="comma-separated splits (default: params eval.splits)")
    p.add_argument("--iteration", type=int, default=0, help="iteration recorded with the predictions")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("sample", cmd_sample, "sample rationales per problem, checkpointed in shards")
    p.add_argument("--model", required=True, help="model folder or Hub id to sample from")
    p.add_argument("--problems", required=True, help="problems Parquet")
    p.add_argument("--iteration", type=int, required=True, help="iteration recorded on every row")
    p.add_argument("--out", required=True, help="samples Parquet to write")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("label", cmd_label, "label samples: gold, calculator checks, majority vote")
    p.add_argument("samples", help="samples Parquet or JSONL (problem_id, text, optional sample_id)")
    p.add_argument("--problems", required=True, help="problems Parquet")
    p.add_argument("--out", required=True, help="labels Parquet to write")
    p.add_argument("--summary", help="also write counts per answer status and the share of problems solved")
    p.add_argument("--labelers", default="gold,vote",
                   help="comma-separated: gold (judge against gold answers), vote (majority vote, reads no gold)")
    p.add_argument("--votes", help="also write the per-problem vote table (Parquet)")

    p = command("filter", cmd_filter, "drop samples that fail the filters, keeping each with its reason")
    p.add_argument("samples", help="samples Parquet (or JSONL with every samples column)")
    p.add_argument("--labels", required=True, help="labels Parquet covering every sample")
    p.add_argument("--out", required=True, help="kept samples Parquet to write")
    p.add_argument("--dropped", required=True, help="dropped rows Parquet to write (filter and reason per row)")
    p.add_argument("--counts", help="also write the counts (input, kept, dropped per filter and reason) as JSON")
    p.add_argument("--iteration", type=int, help="apply params `iterations.K` overrides")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (reads its `filter` section)")

    p = command("pairs", cmd_pairs, "make preference pairs from labelled samples")
    p.add_argument("--recipe", metavar="NAME",
                   help="a hand run's recipe, whose pair rule makes the pairs (default: params `recipe`)")
    p.add_argument("--problems", required=True, help="problems Parquet")
    p.add_argument("--samples", required=True, help="samples Parquet or JSONL (after filtering)")
    p.add_argument("--labels", required=True, help="labels Parquet covering every sample")
    p.add_argument("--model", required=True, help="model folder or Hub id whose tokenizer formats prompts")
    p.add_argument("--iteration", type=int, required=True, help="iteration recorded on every pair")
    p.add_argument("--out", required=True, help="pairs Parquet to write")
    p.add_argument("--steps", help="the `factory steps` folder (scdpo, sipf_orpo and mcts_dpo read it)")
    p.add_argument("--summary", help="also write the pair counts and skip reasons as JSON")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("steps", cmd_steps, "step-level data: step-controlled continuations (scdpo), rollouts and a PRM "
                "(sipf_orpo), search trees (mcts_dpo)")
    p.add_argument("--recipe", metavar="NAME",
                   help="a hand run's recipe (default: params `recipe`); one without step data writes empty tables")
    p.add_argument("--model", required=True, help="the model that samples continuations and rollouts (the previous one)")
    p.add_argument("--problems", required=True, help="problems Parquet")
    p.add_argument("--samples", required=True, help="the iteration's kept samples")
    p.add_argument("--labels", required=True, help="labels of the samples")
    p.add_argument("--iteration", type=int, required=True, help="iteration recorded on every row")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--summary", help="also write the stage's counts as JSON")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("report", cmd_report, "gather the iterations' metrics into one table and plot")
    p.add_argument("--metrics", required=True, help="folder holding iter_K/ metrics folders")
    p.add_argument("--out", required=True, help="metrics JSON to write (one entry per iteration)")
    p.add_argument("--plot", help="also write one row per iteration for dvc plots")
    p.add_argument("--html", help="also write the self-contained HTML run report")
    p.add_argument("--compare", action="append", help="a `factory compare` JSON to plot in the report (repeatable)")
    p.add_argument("--screenshot", help="render the HTML report in headless Chromium to this PNG")
    p.add_argument("--root", default=".", help="project folder holding data/ (for the report's tables)")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (reads `iterations`, `recipe`)")

    p = command("recipe", cmd_recipe, "show a recipe and the command that runs it, or switch params.yaml to it")
    p.add_argument("name", nargs="?", metavar="NAME", help=" | ".join(RECIPES))
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.add_argument("--write", action="store_true", help="write `recipe: NAME` and its settings into params.yaml")
    p.add_argument("--params", default=DEFAULT_PARAMS)

    p = command("compare", cmd_compare, "run recipes over seeds as DVC experiments and compare them")
    p.add_argument("--recipes", default="sft,self_train,dpo_st",
                   help="comma-separated, weakest (control) first: " + ", ".join(RECIPES))
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (sample, dpo and self_train seeds)")
    p.add_argument("--out", default="metrics/compare.json", help="JSON with every run and the summary")

    p = command("audit", cmd_audit, "query every table of every iteration with SQL (DuckDB)")
    p.add_argument("sql", help="a DuckDB SQL query over the views (see the description)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--iteration", type=int, action="append", help="only these iterations (repeat the flag)")
    p.add_argument("--root", default=".", help="project folder holding data/ and models/")
    p.add_argument("--unconfined", action="store_true",
                   help="run the SQL on a writable connection with full file access (COPY ... TO, ATTACH)")

    p = command("gate", cmd_gate, "run the audit checks on tables and fail when an invariant breaks")
    p.add_argument("tables", nargs="+", help="the table files the checks see (a DVC stage's deps)")
    p.add_argument("--checks", help="folder of *.sql checks (default: params audit.checks)")
    p.add_argument("--out", help="write each check's result as JSON")
    p.add_argument("--root", default=".", help="project folder the table paths are relative to")
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (reads `audit` and `eval.splits`)")

    p = command("lineage", cmd_lineage, "print the ancestry of a pair, sample, problem, model or table file")
    p.add_argument("id", help="pair-…, s-…, p-…, m-… or a table file path")
    p.add_argument("--json", action="store_true", help="print the ancestry as JSON")
    p.add_argument("--root", default=".", help="project folder holding data/, models/ and dvc.lock")

    p = command("export", cmd_export, "write a Hub-ready dataset folder with a card naming every split's lineage")
    p.add_argument("dir", help="folder to write (replaced if it is an earlier export)")
    p.add_argument("--tables", help="comma-separated tables (default: problems,samples,labels,pairs,votes,dropped,"
                   "pairs_chat,sft_chat; the last two are pairs and SFT data in TRL's conversational format)")
    p.add_argument("--iteration", type=int, action="append", help="only these iterations (repeat the flag)")
    p.add_argument("--root", default=".", help="project folder holding data/, models/ and dvc.lock")

    p = command("push", cmd_push, "upload an exported folder to the Hugging Face Hub as a dataset")
    p.add_argument("repo_id", help="the dataset repo, e.g. my-name/factory-dpo-st")
    p.add_argument("--dir", required=True, help="the folder `factory export` wrote")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="a branch to upload to (created if missing)")
    return parser


def error_line(error: BaseException, out: str | None = None) -> str:
    """An error as one line for users: an OS error as `PATH: reason`, naming the file the user gave, never
    the temporary file beside it (`.NAME.tmp-PID`, `factory.io.atomic_path`); a full or read-only disk met
    while writing, which names no file, as `OUT: reason` (`out`: the command's --out); any message on one line."""
    import re

    if isinstance(error, OSError) and error.strerror and (error.filename or error.filename2):
        # os.replace(tmp, target) names both: the target is the user's path
        text = f"{error.filename2 or error.filename}: {error.strerror[:1].lower()}{error.strerror[1:]}"
    else:
        text = str(error) or type(error).__name__
        if out and isinstance(error, OSError) and re.search(r"errno (28|30|122)\b", f"errno {error.errno} {text}",
                                                             re.IGNORECASE):  # ENOSPC, EROFS, EDQUOT
            text = f"{out}: {text}"
    text = re.sub(r"\.([^/\\\s'\"]+)\.tmp-\d+", r"\1", text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


TRAINING_COMMANDS = ("warmup", "dpo", "train")  # those that train as N processes under `accelerate launch`
_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run_here(command: str) -> bool:
    """Whether this process runs `command`: always, but under a multi-process launch a command that does not
    train (sampling, the PRM's own loop in `steps`, tables) runs on rank 0 alone, as a plain process, and the
    other ranks leave at once: N copies would only write the same files over each other."""
    if command in TRAINING_COMMANDS or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    if os.environ.get("RANK", "0") != "0":
        print(f"factory {command}: does not train; rank 0 runs it alone", file=sys.stderr)
        return False
    for name in _LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not _run_here(args.command):
        return 0
    try:
        args.func(args)
    except Exception as error:
        # bad input: ValueError (and the libraries' errors about a file: pyarrow's, DuckDB's), OSError (missing,
        # unreadable, unwritable, disk full); anything else is a bug, with its traceback
        library = type(error).__module__.split(".")[0].lstrip("_") in ("pyarrow", "duckdb")
        if os.environ.get("FACTORY_DEBUG") or not (
                library or isinstance(error, (ValueError, OSError, subprocess.CalledProcessError))):
            raise
        print(f"factory {args.command}: error: {error_line(error, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

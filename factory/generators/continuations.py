"""Step-level generators: step-controlled negatives (SCDPO) and Monte Carlo rollouts (SIPF).

Both continue a sample from one of its step prefixes (`factory.reasoning_steps`: a step
is a non-empty line, the `#### N` line is not one, indices are 0-based):

- `step_controlled_negatives` (Lu et al. 2024, SCDPO): from a correct sample,
  keep its first j steps and continue at a rising temperature (step i of the
  continuation at min(start + step*i, max)) until the final answer is wrong:
  a negative that starts erring at step j. Every continuation is returned,
  correct ones too; pairs pick the wrong ones from their labels.
- `mc_rollouts` (Chen et al. 2025, SIPF): from each proper step prefix of a
  sample, M continuations at one temperature; the share that reaches the
  gold answer scores the prefix's last step (`factory.labelers.process`).

Rows are `samples` rows, keyed like `factory.generators.sampling`'s: the
`sample_id` hashes what defines the request (problem, model, generator, the
params that change the text, seed, parent, prefix length, index) and the row's
noise seed comes from (seed, parent, prefix length, index), so a row is the
same in any batch and on any run.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import partial

import pyarrow as pa

from factory.generators.decoding import DecodingConfig, StepTemperature, batch_order, generate
from factory.ids import content_hash, content_id
from factory.labelers.gold import gold_labels
from factory.modeling import format_prompt
from factory.reasoning_steps import prefix_text, split_steps

__all__ = [
    "CUTS",
    "StepsConfig",
    "choose_rollout_samples",
    "continuation_seed",
    "label_rows",
    "mc_rollouts",
    "negatives_in_shards",
    "rollouts_in_shards",
    "prefix_text",
    "step_controlled_negatives",
]

CUTS = ("each", "random")
AGGREGATES = ("mean", "min")


@dataclass(frozen=True, kw_only=True)
class StepsConfig:
    """Step-level generation (params.yaml `steps`): SCDPO continuations and SIPF rollouts."""

    delimiter: str = "\n"
    # SCDPO: step-controlled negatives
    cut: str = "random"  # each: every cut j in [min_prefix_steps, n_steps-1]; random: one j per attempt
    min_prefix_steps: int = 1
    temperature_start: float = 1.1  # generated step i is sampled at min(start + step*i, max)
    temperature_step: float = 0.1
    temperature_max: float = 1.4
    attempts: int = 4  # rounds of retries per parent and cut, until a wrong-answer continuation
    parents_per_problem: int = 2
    negatives_per_problem: int = 2
    # SIPF: Monte Carlo rollouts
    rollouts: int = 4  # M continuations per step prefix
    rollout_samples: int = 300  # samples that get rollouts (0: all)
    rollout_temperature: float = 0.7
    good_threshold: float = 0.0  # a step is good when its score is above this
    aggregate: str = "mean"  # path reward from step scores: mean | min
    # shared
    max_new_tokens: int = 256
    top_p: float = 1.0
    calculator: bool = True
    batch_size: int = 64
    shard_size: int = 32  # problems per checkpointed shard of SCDPO continuations (rollouts: one batch each)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"steps.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.delimiter, str) or not self.delimiter:
            bad("delimiter", "must be a non-empty string")
        if self.cut not in CUTS:
            bad("cut", f"must be one of {', '.join(CUTS)}")
        if self.aggregate not in AGGREGATES:
            bad("aggregate", f"must be one of {', '.join(AGGREGATES)}")
        for name in ("min_prefix_steps", "rollout_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        for name in ("attempts", "parents_per_problem", "negatives_per_problem", "rollouts", "max_new_tokens",
                     "batch_size", "shard_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        if not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not self.temperature_start > 0:
            bad("temperature_start", "must be > 0")
        if not self.temperature_step >= 0:
            bad("temperature_step", "must be >= 0")
        if not self.temperature_max >= self.temperature_start:
            bad("temperature_max", f"must be >= temperature_start ({self.temperature_start!r})")
        if not self.rollout_temperature > 0:
            bad("rollout_temperature", "must be > 0 (rollouts sample)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.good_threshold < 1:
            bad("good_threshold", "must be in [0, 1)")

    def schedule(self) -> StepTemperature:
        return StepTemperature(self.temperature_start, self.temperature_step, self.temperature_max)

    def continuation_params(self) -> dict:
        """What changes a step-controlled continuation's text (hashed into its sample_id)."""
        return {
            "delimiter": self.delimiter, "temperature_start": self.temperature_start,
            "temperature_step": self.temperature_step, "temperature_max": self.temperature_max,
            "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, "calculator": self.calculator,
        }

    def rollout_params(self) -> dict:
        """What changes a rollout's text (hashed into its sample_id)."""
        return {
            "delimiter": self.delimiter, "temperature": self.rollout_temperature, "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "calculator": self.calculator,
        }

    def decoding(self, temperature: float) -> DecodingConfig:
        return DecodingConfig(temperature=temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              calculator=self.calculator, batch_size=self.batch_size)


def continuation_seed(seed: int, parent_sample_id: str, prefix_steps: int, index: int) -> int:
    """A 63-bit noise seed for one continuation of a parent's prefix, independent of batching (as `row_seed`)."""
    return int(content_hash(seed, parent_sample_id, prefix_steps, index), 16) & (2**63 - 1)


def _rows(table_or_rows) -> list[dict]:
    return table_or_rows.to_pylist() if isinstance(table_or_rows, pa.Table) else list(table_or_rows)


def _problems_by_id(problems) -> dict[str, dict]:
    return {p["problem_id"]: p for p in _rows(problems)}


def _labels_by_id(labels) -> dict[str, dict]:
    return {row["sample_id"]: row for row in _rows(labels)}


def _problem_of(sample: dict, problems: dict[str, dict]) -> dict:
    try:
        return problems[sample["problem_id"]]
    except KeyError:
        raise ValueError(f"sample {sample['sample_id']}: problem {sample['problem_id']!r} is not in the problems")\
            from None


def _continuation_row(
    *, problem_id: str, parent: dict, prefix: str, prefix_steps: int, index: int, completion, generator: str,
    params: dict, config: StepsConfig, model_id: str, iteration: int, temperature: float,
    step_temperatures: list[float] | None,
) -> dict:
    return {
        "sample_id": content_id("sample", problem_id, model_id, generator, params, config.seed,
                                parent["sample_id"], prefix_steps, index),
        "problem_id": problem_id,
        "iteration": iteration,
        "model_id": model_id,
        "generator": generator,
        "parent_sample_id": parent["sample_id"],
        "prefix_steps": prefix_steps,
        "sample_index": index,
        "seed": config.seed,
        "temperature": temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "calculator": config.calculator,
        "text": prefix + completion.text,
        "n_tokens": completion.n_tokens,
        "finish_reason": completion.finish_reason,
        "step_temperatures": step_temperatures,
    }


def _cut_range(n_steps: int, config: StepsConfig) -> range:
    return range(config.min_prefix_steps, n_steps)


def random_cut(config: StepsConfig, parent_sample_id: str, n_steps: int, attempt: int) -> int:
    """The cut point of `attempt` for a parent under `cut: random`: uniform over its cut range, seeded."""
    cuts = _cut_range(n_steps, config)
    return cuts[random.Random(content_hash("cut", config.seed, parent_sample_id, attempt)).randrange(len(cuts))]


def step_controlled_negatives(
    model, tokenizer, problems, samples, labels, config: StepsConfig, *, model_id: str, iteration: int,
    show_progress: bool = True,
) -> list[dict]:
    """SCDPO continuations of correct samples, as `samples` rows (generator "step_controlled").

    Parents: samples labelled correct with more than `min_prefix_steps` steps,
    the first `parents_per_problem` of each problem by sample_id. A retry unit
    is (parent, cut j) with `cut: each` (every j in [min_prefix_steps,
    n_steps-1]) or the parent with `cut: random` (a fresh seeded j per
    attempt). Each of `attempts` rounds continues every open unit from
    prompt = question + the parent's first j steps (`prefix_text`), all in one
    batched `generate` call at the rising temperature, then judges them
    against gold: a unit closes once it wrote a continuation whose answer is
    not correct (wrong or unparseable), a problem once it has
    `negatives_per_problem` of them. Every continuation is returned, in round
    order, then problem, parent, cut order; `text` is the prefix plus the
    continuation, `step_temperatures` the temperature of each generated step.
    """
    problems_by_id = _problems_by_id(problems)
    labels_by_id = _labels_by_id(labels)
    order = {problem_id: i for i, problem_id in enumerate(problems_by_id)}
    parents: dict[str, list[tuple[dict, int]]] = {}
    for sample in sorted(_rows(samples), key=lambda s: s["sample_id"]):
        label = labels_by_id.get(sample["sample_id"])
        if label is None or label.get("correct") is not True:
            continue
        n_steps = len(split_steps(sample["text"], config.delimiter))
        if n_steps <= config.min_prefix_steps:
            continue
        problem = _problem_of(sample, problems_by_id)
        chosen = parents.setdefault(problem["problem_id"], [])
        if len(chosen) < config.parents_per_problem:
            chosen.append((sample, n_steps))
    # Retry units in a fixed order: problem, parent (by sample_id), cut. cut None: a random one per attempt.
    units: list[tuple[str, dict, int, int | None]] = []
    for problem_id in sorted(parents, key=order.__getitem__):
        for parent, n_steps in parents[problem_id]:
            cuts = _cut_range(n_steps, config) if config.cut == "each" else [None]
            units += [(problem_id, parent, n_steps, j) for j in cuts]
    schedule = config.schedule()
    decoding = config.decoding(config.temperature_start)
    params = config.continuation_params()
    open_units = set(range(len(units)))
    negatives = dict.fromkeys(parents, 0)
    rows: list[dict] = []
    for attempt in range(config.attempts):
        todo = [u for u in range(len(units))
                if u in open_units and negatives[units[u][0]] < config.negatives_per_problem]
        if not todo:
            break
        requests = []
        for u in todo:
            problem_id, parent, n_steps, j = units[u]
            if j is None:
                j = random_cut(config, parent["sample_id"], n_steps, attempt)
            requests.append((u, j, prefix_text(parent["text"], j, config.delimiter)))
        prompts = [format_prompt(tokenizer, problems_by_id[units[u][0]]["question"]) + prefix
                   for u, _, prefix in requests]
        seeds = [continuation_seed(config.seed, units[u][1]["sample_id"], j, attempt) for u, j, _ in requests]
        completions = generate(model, tokenizer, prompts, seeds, decoding, desc=f"step-controlled {attempt + 1}",
                               show_progress=show_progress, step_temperature=schedule)
        round_rows = []
        for (u, j, prefix), completion in zip(requests, completions):
            problem_id, parent, _, _ = units[u]
            generated_steps = len(split_steps(completion.text))  # the decoder's line count: its temperatures
            round_rows.append(_continuation_row(
                problem_id=problem_id, parent=parent, prefix=prefix, prefix_steps=j, index=attempt,
                completion=completion, generator="step_controlled", params=params, config=config,
                model_id=model_id, iteration=iteration, temperature=config.temperature_start,
                step_temperatures=[schedule.at(i) for i in range(generated_steps)],
            ))
        verdicts = gold_labels([r["text"] for r in round_rows],
                               [problems_by_id[r["problem_id"]].get("gold_answer") for r in round_rows])
        for (u, _, _), correct in zip(requests, verdicts["correct"]):
            if correct is False:
                open_units.discard(u)
                negatives[units[u][0]] += 1
        rows += round_rows
    return rows


def choose_rollout_samples(samples, labels, config: StepsConfig, problems=None) -> list[dict]:
    """The samples that get rollouts: up to `rollout_samples` (0: all), round-robin over problems.

    Eligible: a label whose `correct` is not None (the problem has gold) and
    at least one step. Problems in the order of `problems` when given (else of
    first appearance among `samples`), each problem's samples by sample_id;
    the first of every problem, then the second of every problem, and so on.
    """
    labels_by_id = _labels_by_id(labels)
    by_problem: dict[str, list[dict]] = {}
    if problems is not None:
        by_problem = {p["problem_id"]: [] for p in _rows(problems)}
    for sample in _rows(samples):
        label = labels_by_id.get(sample["sample_id"])
        if label is None or label.get("correct") is None or not split_steps(sample["text"], config.delimiter):
            continue
        by_problem.setdefault(sample["problem_id"], []).append(sample)
    queues = [sorted(group, key=lambda s: s["sample_id"]) for group in by_problem.values() if group]
    chosen: list[dict] = []
    budget = config.rollout_samples or sum(map(len, queues))
    depth = 0
    while len(chosen) < budget and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and len(chosen) < budget:
                chosen.append(queue[depth])
        depth += 1
    return chosen


def mc_rollouts(
    model, tokenizer, problems, samples, labels, config: StepsConfig, *, model_id: str, iteration: int,
    show_progress: bool = True,
) -> list[dict]:
    """Monte Carlo rollouts (generator "rollout") from every proper step prefix of the chosen samples.

    For each sample of `choose_rollout_samples` with n steps and each prefix
    length p in 1..n-1 (the prefix ending with step p-1), `rollouts`
    continuations at `rollout_temperature`, all in one batched `generate`
    call. The last step needs none: its score is the sample's own
    correctness. Rows: sample, then p, then sample_index m.
    """
    return rollout_rows((model, tokenizer), rollout_requests(problems, samples, labels, config), config=config,
                        model_id=model_id, iteration=iteration, show_progress=show_progress)


def rollout_requests(problems, samples, labels, config: StepsConfig) -> list[tuple[dict, dict, int, int, str]]:
    """(problem, sample, p, m, prefix) of every rollout `mc_rollouts` makes, in its row order."""
    problems_by_id = _problems_by_id(problems)
    requests = []
    for sample in choose_rollout_samples(samples, labels, config, problems_by_id.values()):
        problem = _problem_of(sample, problems_by_id)
        n_steps = len(split_steps(sample["text"], config.delimiter))
        for p in range(1, n_steps):
            prefix = prefix_text(sample["text"], p, config.delimiter)
            for m in range(config.rollouts):
                requests.append((problem, sample, p, m, prefix))
    return requests


def _rollout_prompt(tokenizer, request: tuple) -> str:
    problem, _, _, _, prefix = request
    return format_prompt(tokenizer, problem["question"]) + prefix


def rollout_rows(loaded, requests: list[tuple], *, config: StepsConfig, model_id: str, iteration: int,
                 show_progress: bool = False) -> list[dict]:
    """The rows of `requests` (from `rollout_requests`), decoded with the (model, tokenizer) `loaded`."""
    model, tokenizer = loaded
    seeds = [continuation_seed(config.seed, sample["sample_id"], p, m) for _, sample, p, m, _ in requests]
    completions = generate(model, tokenizer, [_rollout_prompt(tokenizer, r) for r in requests], seeds,
                           config.decoding(config.rollout_temperature), desc="rollouts", show_progress=show_progress)
    params = config.rollout_params()
    return [
        _continuation_row(
            problem_id=problem["problem_id"], parent=sample, prefix=prefix, prefix_steps=p, index=m,
            completion=completion, generator="rollout", params=params, config=config, model_id=model_id,
            iteration=iteration, temperature=config.rollout_temperature, step_temperatures=None,
        )
        for (problem, sample, p, m, prefix), completion in zip(requests, completions)
    ]


def rollouts_in_shards(shards, tokenizer, problems, samples, labels, config: StepsConfig, *, model_id: str,
                       iteration: int) -> list[dict]:
    """`mc_rollouts`'s rows, one decoder batch per shard (`batch_order`: the very batches of its one `generate`
    call), run by `shards` (`factory.step_stage.StepShards`: checkpointed, where params `executor` says)."""
    requests = rollout_requests(problems, samples, labels, config)
    order = batch_order(tokenizer, [_rollout_prompt(tokenizer, r) for r in requests])
    rows = shards.run([requests[i] for i in order],
                      partial(rollout_rows, config=config, model_id=model_id, iteration=iteration),
                      shard_size=config.batch_size, key=("rollouts", asdict(config)), desc="rollouts")
    in_order: list[dict] = [{}] * len(rows)
    for position, row in zip(order, rows):
        in_order[position] = row
    return in_order


def negatives_in_shards(shards, tokenizer, problems, samples, labels, config: StepsConfig, *, model_id: str,
                        iteration: int) -> list[dict]:
    """`step_controlled_negatives` over shards of `shard_size` problems, run by `shards` (`StepShards`).

    A problem's retries depend only on its own continuations, so its rows are the same in any shard up to
    the float rounding of its batches; the shard cut, not where a shard runs, fixes those. Rows come in
    `step_controlled_negatives`' order: round, then problem, parent, cut.
    """
    labels_by_id = _labels_by_id(labels)
    by_problem: dict[str, list[dict]] = {}
    for sample in _rows(samples):
        by_problem.setdefault(sample["problem_id"], []).append(sample)
    items = [(problem, group, [labels_by_id[s["sample_id"]] for s in group if s["sample_id"] in labels_by_id])
             for problem in _rows(problems) if (group := by_problem.get(problem["problem_id"]))]
    rows = shards.run(items, partial(_negatives_shard, config=config, model_id=model_id, iteration=iteration),
                      shard_size=config.shard_size, key=("step_controlled", asdict(config)), desc="step-controlled")
    return sorted(rows, key=lambda row: row["sample_index"])  # stable: each round's rows stay in problem order


def _negatives_shard(loaded, items: list[tuple], *, config: StepsConfig, model_id: str, iteration: int) -> list[dict]:
    model, tokenizer = loaded
    return step_controlled_negatives(
        model, tokenizer, [problem for problem, _, _ in items], [s for _, group, _ in items for s in group],
        [label for _, _, group in items for label in group], config, model_id=model_id, iteration=iteration,
        show_progress=False)


def label_rows(rows, problems) -> list[dict]:
    """`labels` rows for generated rows, exactly as `factory label` labels samples (gold + calculator, no vote)."""
    from factory.labelers import label_samples
    from factory.schema import from_rows

    problem_rows = _rows(problems)
    problem_table = pa.table({
        "problem_id": pa.array([p["problem_id"] for p in problem_rows], pa.string()),
        "gold_answer": pa.array([p.get("gold_answer") for p in problem_rows], pa.string()),
    })
    table = rows if isinstance(rows, pa.Table) else from_rows(list(rows), "samples")
    return label_samples(table, problem_table, labelers=("gold",)).to_pylist()

"""Greedy evaluation with the calculator: accuracy per split, as DVC metrics.

`factory eval` decodes every problem of the chosen splits once, greedily, with
calculator-integrated decoding, extracts the final answer and compares it with
gold numerically. Predictions are written as a samples table (plus the label
columns), so a number in the metrics file can be traced to the rows behind it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from factory.answers import answer_status, extract_answer
from factory.generators.decoding import DecodingConfig, batch_order, generate
from factory.ids import content_id
from factory.modeling import format_prompt

EVAL_SEED = 0  # greedy decoding draws no noise; recorded for the samples table
GENERATOR = "eval-greedy"


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Which splits to score and how to decode them (params.yaml `eval`)."""

    splits: tuple[str, ...] = ("test", "test_ood")
    max_new_tokens: int = 256
    batch_size: int = 128
    calculator: bool = True

    def decoding(self) -> DecodingConfig:
        return DecodingConfig(
            temperature=0.0, max_new_tokens=self.max_new_tokens, calculator=self.calculator, batch_size=self.batch_size
        )


@dataclass
class SplitScore:
    n: int = 0
    correct: int = 0
    unparseable: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def stderr(self) -> float:
        """Binomial standard error: how far one seed's accuracy may move by chance."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.n) if self.n else 0.0

    def as_metrics(self) -> dict:
        return {
            "accuracy": round(self.accuracy, 4),
            "stderr": round(self.stderr, 4),
            "n": self.n,
            "unparseable": self.unparseable,
        }


@dataclass
class Evaluation:
    scores: dict[str, SplitScore] = field(default_factory=lambda: defaultdict(SplitScore))
    predictions: list[dict] = field(default_factory=list)

    def metrics(self) -> dict:
        return {split: score.as_metrics() for split, score in sorted(self.scores.items())}

    def sample_rows(self, *, model_id: str, config: EvalConfig, iteration: int) -> list[dict]:
        """The predictions as `samples` rows (plus split, answer, answer_status), traceable like any sample."""
        return [
            {
                **prediction,
                "sample_id": content_id("sample", prediction["problem_id"], model_id, GENERATOR, EVAL_SEED),
                "iteration": iteration,
                "model_id": model_id,
                "generator": GENERATOR,
                "sample_index": 0,
                "seed": EVAL_SEED,
                "temperature": 0.0,
                "top_p": 1.0,
                "max_new_tokens": config.max_new_tokens,
                "calculator": config.calculator,
            }
            for prediction in self.predictions
        ]


def evaluate(model, tokenizer, problems: list[dict], config: EvalConfig, *, show_progress: bool = True) -> Evaluation:
    """Score `problems` (dicts with question, gold_answer, split, problem_id)."""
    return scored(predict(model, tokenizer, problems, config, show_progress=show_progress))


def predict(model, tokenizer, problems: list[dict], config: EvalConfig, *, show_progress: bool = True) -> list[dict]:
    """The greedy completion of every problem, with its extracted answer and its status against gold."""
    prompts = [format_prompt(tokenizer, p["question"]) for p in problems]
    completions = generate(
        model, tokenizer, prompts, [EVAL_SEED] * len(prompts), config.decoding(),
        desc="eval", show_progress=show_progress,
    )
    predictions = []
    for problem, completion in zip(problems, completions):
        extraction = extract_answer(completion.text)
        predictions.append(
            {
                "problem_id": problem["problem_id"],
                "split": problem["split"],
                "text": completion.text,
                "n_tokens": completion.n_tokens,
                "finish_reason": completion.finish_reason,
                "answer": extraction.answer,
                "answer_status": answer_status(extraction.answer, problem.get("gold_answer")),
            }
        )
    return predictions


def scored(predictions: list[dict]) -> Evaluation:
    """The accuracy per split of `predict`'s rows."""
    evaluation = Evaluation(predictions=predictions)
    for prediction in predictions:
        score = evaluation.scores[prediction["split"]]
        score.n += 1
        score.correct += prediction["answer_status"] == "correct"
        score.unparseable += prediction["answer_status"] == "unparseable"
    return evaluation


def predict_shard(loaded, shard: list[dict], *, config: EvalConfig) -> list[dict]:
    """One shard's predictions, from the (model, tokenizer) of `load_model`: what a worker runs."""
    model, tokenizer = loaded
    return predict(model, tokenizer, shard, config, show_progress=False)


def evaluate_in_shards(model_dir: str, problems: list[dict], config: EvalConfig, *, fingerprint: str,
                       shard_dir: Path, executor=None) -> Evaluation:
    """`evaluate` over the model in `model_dir`, one decoder batch per checkpointed shard (`batch_order`: the
    predictions of one `evaluate` call), run where `executor` says; the predictions come in the order of
    `problems`. A killed run resumes from its finished shards."""
    from factory.executor import worker_path
    from factory.modeling import load_model, load_tokenizer
    from factory.shards import run_in_shards

    tokenizer = load_tokenizer(model_dir)
    order = batch_order(tokenizer, [format_prompt(tokenizer, p["question"]) for p in problems])
    rows = run_in_shards([problems[i] for i in order], partial(predict_shard, config=config),
                         load=partial(load_model, worker_path(model_dir)), executor=executor,
                         shard_size=config.batch_size, shard_dir=shard_dir, fingerprint=fingerprint, kind=None,
                         desc="eval")
    by_problem = {row["problem_id"]: row for row in rows}
    return scored([by_problem[p["problem_id"]] for p in problems])


def select_problems(problems: list[dict], splits: tuple[str, ...], source: str | Path) -> list[dict]:
    chosen = [p for p in problems if p["split"] in splits]
    present = {p["split"] for p in chosen}
    missing = [s for s in splits if s not in present]
    if missing:
        found = sorted({p["split"] for p in problems})
        raise ValueError(f"{source}: no problems in split(s) {missing}; splits present: {found}")
    return chosen

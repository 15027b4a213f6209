"""Pretraining of the tiny base: what a pretrained LM is to GSM8K, made on a CPU in minutes.

    factory base --problems data/problems.parquet --out models/base   (params `pretrain`, `model`)

A real flywheel starts from a pretrained chat model: it can already read a
story, write a calculator-annotated line and end its turn, and fine-tuning on a
few thousand gold rationales draws out what it half knows. A Llama built from
random weights and fine-tuned on the task alone has none of that: it sits near
0% for several epochs, then climbs by a seed-dependent amount, and every later
comparison inherits that noise.

So the tiny base is pretrained for a fixed number of steps on a corpus that is
disjoint from every split the flywheel uses: word problems of the *other*
story families (`pretrain.families` may not share one with the task's) with
fewer steps, each as a chat turn with its GSM8K-format rationale, and plain
calculator-annotated arithmetic. The task's own problems, questions or
rationales, are never in it (a corpus question equal to a task question is
refused, though other families cannot produce one).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from factory.modeling import format_completion, format_prompt, trainer_tokenizer
from train.common import Checkpoints, cpu_safe_settings, digest, run_fingerprint, save_model_atomically


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """params.yaml `pretrain`: the tiny base's pretraining corpus and schedule (0 steps: random weights)."""

    steps: int = 600  # optimizer steps; 0 keeps the from-scratch model
    families: tuple[str, ...] = ("shop", "compare", "rate")  # story families of the corpus: none of the task's
    problems: int = 12000  # corpus word problems, each with its rationale
    min_steps: int = 1
    max_steps: int = 2  # fewer than the task's: the corpus teaches the format, the task asks for composition
    max_distractors: int = 1
    arithmetic: int = 3000  # documents of plain calculator-annotated arithmetic
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    batch_size: int = 32
    warmup_steps: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.problems < 0 or self.arithmetic < 0:
            raise ValueError("pretrain: steps, problems and arithmetic must be >= 0")
        if self.steps and not (self.problems or self.arithmetic):
            raise ValueError("pretrain: steps > 0 needs a corpus (problems or arithmetic > 0)")
        # The corpus' word problems come from ArithConfig; checked here so an error names this section's keys.
        from factory.problems.arith import FAMILIES

        unknown = [family for family in self.families if family not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"key 'families': unknown {unknown or 'empty list'}; choose from {list(FAMILIES)}")
        if not 1 <= self.min_steps <= self.max_steps <= 8:
            raise ValueError(f"keys 'min_steps', 'max_steps': need 1 <= min_steps <= max_steps <= 8, "
                             f"got {self.min_steps}, {self.max_steps}")


def check_disjoint(config: PretrainConfig, task_families: tuple[str, ...]) -> None:
    """The corpus may not draw from a story family the task draws from."""
    shared = sorted(set(config.families) & set(task_families))
    if shared and config.problems:
        raise ValueError(f"pretrain.families shares {shared} with problems.arith.families: the pretraining corpus "
                         f"must be disjoint from the task; pick other families")


def _arithmetic_document(rng: random.Random) -> str:
    """A few calculator-annotated operations, as a rationale writes them (`a+b=<<a+b=c>>c`)."""
    lines = []
    for _ in range(rng.randint(2, 5)):
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        op = rng.choice("+-*/")
        if op == "-" and a < b:
            a, b = b, a
        if op == "/":
            a = a - a % b or b
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        lines.append(f"{a}{op}{b}=<<{a}{op}{b}={value}>>{value}")
    return "\n".join(lines)


def corpus(config: PretrainConfig, tokenizer, task_questions: set[str]) -> list[str]:
    """The pretraining documents, in a seeded order: chat-formatted word problems, then arithmetic, shuffled."""
    from factory.problems.arith import ArithConfig, generate_with_programs, render_rationale

    documents = []
    if config.problems:
        arith = ArithConfig(seed=config.seed, sizes={"pretrain": config.problems}, families=config.families,
                            min_steps=config.min_steps, max_steps=config.max_steps,
                            max_distractors=config.max_distractors)
        rng = random.Random(f"{config.seed}:pretrain-rationales")
        for row, program in generate_with_programs(arith):
            if row["question"] in task_questions:
                raise ValueError(f"pretrain: a corpus question is a task question ({row['question'][:60]!r}...); "
                                 f"the corpus must be disjoint from every split")
            documents.append(format_prompt(tokenizer, row["question"])
                             + format_completion(tokenizer, render_rationale(program, rng)))
    rng = random.Random(f"{config.seed}:pretrain-arithmetic")
    documents += [_arithmetic_document(rng) + tokenizer.eos_token for _ in range(config.arithmetic)]
    random.Random(f"{config.seed}:pretrain-order").shuffle(documents)
    return documents


def pretrain(model, tokenizer, documents: list[str], config: PretrainConfig, out_dir) -> dict:
    """Train `model` as a plain LM on `documents` for `config.steps` steps, save it into `out_dir`."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(config.seed)
    model.train()
    start = {"model": model.config.to_dict(), "vocabulary": tokenizer.get_vocab()}  # from scratch: no folder yet
    fingerprint = run_fingerprint("pretrain", model_dir=None, start=digest(start), corpus=digest(documents),
                                  config=asdict(config))
    checkpoints = Checkpoints(out_dir, fingerprint)
    args = SFTConfig(
        output_dir=checkpoints.output_dir(),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=config.warmup_steps,
        max_length=model.config.max_position_embeddings,
        logging_steps=max(1, config.steps // 20),
        seed=config.seed,
        data_seed=config.seed,
        **cpu_safe_settings(),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": documents}),
                         processing_class=trainer_tokenizer(tokenizer))
    print(f"pretraining the base: {len(documents)} documents, {config.steps} steps", flush=True)
    checkpoints.train(trainer)
    save_model_atomically(trainer.model, tokenizer, out_dir)
    checkpoints.clear()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"pretrain_steps": trainer.state.global_step, "pretrain_documents": len(documents),
            "pretrain_first_loss": round(losses[0], 4) if losses else None,
            "pretrain_final_loss": round(losses[-1], 4) if losses else None}

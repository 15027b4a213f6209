"""The synthetic GSM8K-format task of the embedded default.

Multi-step arithmetic word problems that a tiny model can partly learn on a CPU
in minutes. A problem is a small *program*: numbers written in the question
(leaves) combined by 2-6 exact integer operations into the asked quantity,
narrated as a short story (a person, some items or money, containers, rates,
comparisons, transfers) with 0..`max_distractors` sentences whose numbers are
not needed. Its rationale is GSM8K format, one calculator-annotated line per
operation and a final ``#### N``::

    After buying more, Mia has 12+7=<<12+7=19>>19 marbles.
    #### 19

Every program has several valid rationales (`render_rationale`): the order of
independent steps (any topological order; a sum of three or more terms is
added up in any order), the operand order of ``+`` and ``*``, and the phrasing
of each line all vary, while the number of lines does not. So self-generated
correct rationales need not be copies of the gold one.

Every number an operation uses is written as digits in the question (no
"twice" or "half"): what a model must learn is which numbers to combine, with
which operation, in which order, and which to ignore; the arithmetic itself is
the calculator's.

Four story families, drawn uniformly (`ArithConfig.families`):

- ``collect``: a person's items change through events (buys, finds, gives
  away, packs of N, splits into equal piles), then maybe a last operation
  (share equally, pack into boxes, sell at $N each, compare with a friend);
- ``shop``: purchases at $N each are added up, then a coupon or fee, then
  the money left, the change from a bill, or an equal share of the cost;
- ``compare``: people related by "N more", "N fewer", "N times as many" (and
  the inverse: "A has N times as many as B" asks for a division), then a sum
  or a difference;
- ``rate``: N per day/week/hour for D periods in several phases, added up,
  then what is still needed to reach a goal.

Splits and what they carry (`generate_problems`):

==========  =================  ===========  ==========================
split       gold_rationale     gold_answer  steps
==========  =================  ===========  ==========================
train, dev  yes                yes          min_steps..max_steps
answers     no                 yes          min_steps..max_steps
unlabeled   no                 no           min_steps..max_steps
test        no                 yes          min_steps..max_steps
test_ood    no                 yes          ood_min_steps..ood_max_steps
==========  =================  ===========  ==========================

Any other split name in `sizes` is answers-only, out-of-distribution when its
name contains ``ood``. Each split draws from its own seed
(``random.Random(f"{seed}:{split}")``); questions are unique across all
splits. Splits are generated test-first (test, test_ood, dev, train, answers,
unlabeled, then others by name), so a test set does not change when a
training split grows, and training splits never contain a test question.
`n_steps` is filled for every row (all renderings of a program have the same
number of lines), not only where the gold rationale is shown.

Modules: `program` (programs and their rationales), `story` (vocabulary, the
story builder, distractors), `families` (one builder per family); this one
holds the config and the splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from factory.ids import content_id
from factory.problems.arith.families import BUILDERS
from factory.problems.arith.program import Program, Redraw, Step, render_rationale
from factory.problems.arith.story import ITEMS, NAMES, Story, add_distractors
from factory.reasoning_steps import split_steps

__all__ = [
    "DEFAULT_SIZES",
    "FAMILIES",
    "ITEMS",
    "NAMES",
    "ArithConfig",
    "Program",
    "Step",
    "generate_problems",
    "generate_with_programs",
    "render_rationale",
]

SOURCE = "arith"
DEFAULT_SIZES = {"train": 2000, "dev": 300, "answers": 6000, "unlabeled": 6000, "test": 1200, "test_ood": 1200}
SPLITS = tuple(DEFAULT_SIZES)
RATIONALE_SPLITS = ("train", "dev")  # gold_rationale and gold_answer
UNLABELED_SPLITS = ("unlabeled",)  # neither
GENERATION_ORDER = ("test", "test_ood", "dev", "train", "answers", "unlabeled")
FAMILIES = tuple(BUILDERS)  # collect, shop, compare, rate: this order, for a seed's draws
_MAX_ATTEMPTS_PER_PROBLEM = 200


@dataclass(frozen=True, kw_only=True)
class ArithConfig:
    """Knobs of the synthetic task; the same config always gives the same problems."""

    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES), hash=False)
    min_steps: int = 2  # in-distribution splits (train, dev, answers, unlabeled, test)
    max_steps: int = 4
    ood_min_steps: int = 5  # test_ood: harder, more steps
    ood_max_steps: int = 6
    max_distractors: int = 2  # distractor sentences (numbers irrelevant to the question), 0..max per problem
    max_operand: int = 20  # largest count, price, rate or divisor written in a question (difficulty knob)
    max_base: int = 100  # largest starting amount, budget or goal written in a question
    max_factor: int = 5  # largest "N times as many" factor
    max_value: int = 999  # every intermediate and final result lies in 2..max_value
    families: tuple[str, ...] = FAMILIES  # story families to draw from, uniformly
    gold_order_bias: float = 0.0  # gold rationales: chance per line of the next line in story order (0: any ready line)

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"ArithConfig: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 1 <= self.ood_min_steps <= self.ood_max_steps:
            raise ValueError(
                f"ArithConfig: need 1 <= ood_min_steps <= ood_max_steps, got {self.ood_min_steps}, {self.ood_max_steps}"
            )
        if max(self.max_steps, self.ood_max_steps) > 8:
            raise ValueError("ArithConfig: at most 8 steps per problem")
        if self.max_operand < 4 or self.max_factor < 2 or self.max_base < self.max_operand:
            raise ValueError("ArithConfig: need max_operand >= 4, max_factor >= 2, max_base >= max_operand")
        if self.max_value < 2 * self.max_base:
            raise ValueError("ArithConfig: need max_value >= 2 * max_base")
        if not 0.0 <= self.gold_order_bias <= 1.0:
            raise ValueError("ArithConfig: gold_order_bias must lie in [0, 1]")
        if self.max_distractors < 0:
            raise ValueError("ArithConfig: max_distractors must be >= 0")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"ArithConfig: unknown families {unknown}; choose from {list(FAMILIES)}")
        bad = {k: v for k, v in self.sizes.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"ArithConfig: split sizes must be non-negative integers, got {bad}")

    def step_range(self, split: str) -> tuple[int, int]:
        if "ood" in split:
            return self.ood_min_steps, self.ood_max_steps
        return self.min_steps, self.max_steps


def _make_problem(rng: random.Random, config: ArithConfig, lo: int, hi: int) -> tuple[str, Program]:
    """One random (question, program) with lo..hi steps."""
    for _ in range(_MAX_ATTEMPTS_PER_PROBLEM):
        st = Story(random.Random(rng.getrandbits(64)), config)
        n = st.rng.randint(lo, hi)
        family = st.rng.choice(config.families)
        try:
            hero = BUILDERS[family](st, n)
            if config.max_distractors:
                add_distractors(st, hero, st.rng.randint(0, config.max_distractors))
        except Redraw:
            continue
        program = Program(tuple(st.steps), family)
        used = {v for step in program.steps for tag, v in step.args if tag == "s"}
        if program.n_steps != n or any(i not in used for i in range(len(program.steps) - 1)):
            continue  # wrong length, or a computed quantity that the answer does not need
        return st.text(), program
    raise RuntimeError(f"arith: could not make a {lo}-{hi} step problem in {_MAX_ATTEMPTS_PER_PROBLEM} draws; "
                       f"loosen the config ({config})")


def _split_order(sizes: dict[str, int]) -> list[str]:
    known = [s for s in GENERATION_ORDER if s in sizes]
    return known + sorted(s for s in sizes if s not in GENERATION_ORDER)


def generate_with_programs(config: ArithConfig) -> list[tuple[dict, Program]]:
    """`generate_problems`, each row with its program (for more renderings: `render_rationale`)."""
    seen: dict[str, str] = {}  # question -> split
    by_split: dict[str, list[tuple[dict, Program]]] = {}
    for split in _split_order(config.sizes):
        rng = random.Random(f"{config.seed}:{split}")
        lo, hi = config.step_range(split)
        rows: list[tuple[dict, Program]] = []
        misses = 0
        while len(rows) < config.sizes[split]:
            question, program = _make_problem(rng, config, lo, hi)
            if question in seen:
                misses += 1
                if misses > 1000 + 10 * config.sizes[split]:
                    raise RuntimeError(f"arith: too many duplicate questions in split {split!r}; "
                                       f"the config allows too few distinct problems")
                continue
            seen[question] = split
            rationale_rng = random.Random(rng.getrandbits(64))
            rationale = render_rationale(program, rationale_rng, order_bias=config.gold_order_bias)
            n_steps = len(split_steps(rationale))
            labeled = split not in UNLABELED_SPLITS
            row = {
                "problem_id": content_id("problem", question),
                "question": question,
                "gold_answer": str(program.answer) if labeled else None,
                "gold_rationale": rationale if split in RATIONALE_SPLITS else None,
                "source": SOURCE,
                "split": split,
                "n_steps": n_steps,
            }
            rows.append((row, program))
        by_split[split] = rows
    order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    return [pair for split in order for pair in by_split[split]]


def generate_problems(config: ArithConfig) -> list[dict]:
    """All splits' problems as rows of `factory.schema.PROBLEMS`, in split order train, dev, answers, unlabeled,
    test, test_ood (then any other split by name)."""
    return [row for row, _ in generate_with_programs(config)]

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
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from factory.ids import content_id
from factory.steps import split_steps

__all__ = [
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
FAMILIES = ("collect", "shop", "compare", "rate")
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


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------

Arg = tuple[str, int]  # ("n", number as written in the question) or ("s", index of an earlier step)


@dataclass(frozen=True)
class Step:
    """One operation. `+` may take more than two args: a total added up in any order."""

    op: str  # "+", "-", "*", "/"
    args: tuple[Arg, ...]
    kind: str  # which phrases describe its rationale line (see _PHRASES)
    slots: tuple[tuple[str, str], ...]  # words those phrases use (name, unit, ...)
    value: int

    @property
    def n_lines(self) -> int:
        return len(self.args) - 1


@dataclass(frozen=True)
class Program:
    """A problem's computation; the answer is the value of the last step."""

    steps: tuple[Step, ...]
    family: str = ""  # the story family that narrates it (collect, shop, compare, rate)

    @property
    def answer(self) -> int:
        return self.steps[-1].value

    @property
    def n_steps(self) -> int:
        """Lines of every rationale of this program."""
        return sum(step.n_lines for step in self.steps)

    def leaves(self) -> list[int]:
        """The numbers from the question that the program uses, in step order."""
        return [value for step in self.steps for tag, value in step.args if tag == "n"]

    def to_json(self) -> str:
        steps = [{"op": s.op, "args": [list(a) for a in s.args], "kind": s.kind, "slots": dict(s.slots),
                  "value": s.value} for s in self.steps]
        return json.dumps({"family": self.family, "steps": steps}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Program:
        data = json.loads(text)
        steps = tuple(
            Step(d["op"], tuple((a[0], int(a[1])) for a in d["args"]), d["kind"], tuple(sorted(d["slots"].items())),
                 int(d["value"]))
            for d in data["steps"]
        )
        return cls(steps, data.get("family", ""))


class _Fail(Exception):
    """This random draw cannot make a valid problem; draw again."""


def _apply(op: str, values: list[int]) -> int:
    if op == "+":
        return sum(values)
    a, b = values
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise _Fail
        return a // b
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

NAMES = (
    ("Mia", "f"), ("Emma", "f"), ("Ava", "f"), ("Lily", "f"), ("Zoe", "f"), ("Grace", "f"), ("Ella", "f"),
    ("Nora", "f"), ("Ruby", "f"), ("Chloe", "f"), ("Sara", "f"), ("Anna", "f"), ("Lucy", "f"), ("Amy", "f"),
    ("Kate", "f"),
    ("Liam", "m"), ("Noah", "m"), ("Ben", "m"), ("Sam", "m"), ("Jack", "m"), ("Leo", "m"), ("Max", "m"),
    ("Owen", "m"), ("Luke", "m"), ("Ryan", "m"), ("Tom", "m"), ("Eli", "m"), ("Adam", "m"), ("Omar", "m"),
    ("Dan", "m"),
)


@dataclass(frozen=True)
class _Item:
    one: str
    many: str
    edible: bool = False
    colored: bool = False

    @property
    def a(self) -> str:
        return ("an " if self.one[0] in "aeiou" else "a ") + self.one


ITEMS = (
    _Item("apple", "apples", edible=True),
    _Item("marble", "marbles", colored=True),
    _Item("sticker", "stickers", colored=True),
    _Item("book", "books"),
    _Item("coin", "coins"),
    _Item("pencil", "pencils", colored=True),
    _Item("cookie", "cookies", edible=True),
    _Item("card", "cards", colored=True),
    _Item("shell", "shells"),
    _Item("stamp", "stamps"),
    _Item("balloon", "balloons", colored=True),
    _Item("toy car", "toy cars", colored=True),
    _Item("bead", "beads", colored=True),
    _Item("crayon", "crayons", colored=True),
    _Item("cupcake", "cupcakes", edible=True),
    _Item("orange", "oranges", edible=True),
    _Item("egg", "eggs", edible=True),
    _Item("flower", "flowers", colored=True),
    _Item("rock", "rocks"),
    _Item("button", "buttons", colored=True),
)
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"))
COLORS = ("red", "blue", "green", "yellow")
RELATIVES = ("mom", "dad", "aunt", "uncle", "grandma", "grandpa", "brother", "sister", "cousin")
_PREFIXES = ("Then", "Later,", "Next,", "After that,")

# Rationale phrases per step kind. {E} is the calculation with its unit:
# "12+7=<<12+7=19>>19 marbles" or "$3*4=<<3*4=12>>12".
_PHRASES: dict[str, tuple[str, ...]] = {
    # collect
    "start_packs": ("{name} starts with {E}.", "The {conts} hold {E}.", "At first, {name} has {E}."),
    "start_sum": ("{name} starts with {E}.", "At first, {pron} has {E}.", "In all, {name} has {E} at the start."),
    "gain": ("After that, {name} has {E}.", "{name} now has {E}.", "Now {pron} has {E}.", "That makes {E}."),
    "lose": ("{name} has {E} left.", "That leaves {E}.", "Now {pron} has {E}.", "After that, {name} has {E}."),
    "packs_in": ("That is {E} more.", "The new {conts} hold {E}.", "{name} gets {E} in the {conts}."),
    "packs_out": ("That is {E} in all.", "{name} gives up {E}.", "Those are {E} in all."),
    "keep_part": ("{name} keeps {E}.", "One part is {E}.", "Now {pron} has {E}."),
    "per_group": ("Each {cont} gets {E}.", "That is {E} for each.", "Each share is {E}."),
    "n_groups": ("{name} fills {E}.", "That is {E}.", "{pron_cap} needs {E}."),
    "earn": ("{name} makes {E}.", "The {unit_items} sell for {E}.", "{pron_cap} earns {E} in total."),
    "together2": ("Together they have {E}.", "{name} and {friend} have {E}.", "In all, they have {E}."),
    "diff": ("{big} has {E} more.", "The difference is {E}.", "{big} has {E} more than {small}."),
    # shop
    "cost": ("The {items} cost {E}.", "{name} pays {E} for the {items}.", "{pron_cap} spends {E} on {items}."),
    "spent_total": ("{name} spends {E} in total.", "In all, {pron} pays {E}.", "The total cost is {E}."),
    "discount": ("After the coupon, {pron} pays {E}.", "With the discount, the cost is {E}.",
                 "{name} pays {E} after the discount."),
    "fee": ("With the fee, {pron} pays {E}.", "The cost with the fee is {E}.", "{name} pays {E} in all."),
    "money_left": ("{name} has {E} left.", "{pron_cap} has {E} left over.", "That leaves {E}."),
    "change": ("The change is {E}.", "{name} gets {E} back.", "{pron_cap} gets {E} in change."),
    "share": ("Each person pays {E}.", "Each share is {E}.", "That is {E} for each person."),
    # compare
    "person": ("{who} has {E}.", "So {who} has {E}.", "That means {who} has {E}."),
    "together": ("Together they have {E}.", "In all, they have {E}.", "They have {E} in all."),
    # rate
    "phase": ("That is {E}.", "{name} {verb} {E} in those {pers}.", "In that time, {pron} {verb} {E}."),
    "rate_total": ("In all, {name} {verb} {E}.", "Altogether that is {E}.", "{pron_cap} {verb} {E} in total."),
    "remaining": ("{name} still needs {E}.", "{pron_cap} needs {E} more.", "That leaves {E} to go."),
    # the first terms of a total of three or more
    "partial": ("So far that is {E}.", "Adding these gives {E}.", "Together that is {E}."),
}


# ---------------------------------------------------------------------------
# Rendering rationales
# ---------------------------------------------------------------------------


def _pronouns(gender: str) -> dict[str, str]:
    pron, obj, pos = ("she", "her", "her") if gender == "f" else ("he", "him", "his")
    return {"pron": pron, "pron_cap": pron.capitalize(), "obj": obj, "pos": pos}


def render_rationale(program: Program, rng: random.Random, *, order_bias: float = 0.0) -> str:
    """One random valid GSM8K-format rationale of `program`, ending with ``#### answer``.

    Varies the order of independent lines (any topological order; a total of
    three or more terms is added in a random order), the operand order of ``+``
    and ``*``, and the phrasing of each line. The number of lines is always
    `program.n_steps`. `order_bias` is the chance, per line, of taking the
    ready line that comes first in the story instead of a random ready one
    (1.0: lines follow the story; the other variations remain).
    """
    # Expand each step into binary lines: (op, args, kind, slots); an arg is
    # ("n", number), or ("l", index of an earlier line).
    lines: list[tuple[str, list[tuple[str, int]], str, dict[str, str]]] = []
    last_line: dict[int, int] = {}  # step index -> the line holding its value
    for index, step in enumerate(program.steps):
        args = [("l", last_line[a]) if tag == "s" else (tag, a) for tag, a in ((t, v) for t, v in step.args)]
        slots = dict(step.slots)
        if len(args) > 2:
            args = list(args)
            rng.shuffle(args)
            acc = args[0]
            for position, arg in enumerate(args[1:], start=1):
                kind = step.kind if position == len(args) - 1 else "partial"
                lines.append(("+", [acc, arg], kind, slots))
                acc = ("l", len(lines) - 1)
        else:
            lines.append((step.op, list(args), step.kind, slots))
        last_line[index] = len(lines) - 1

    values: dict[int, int] = {}
    done = [False] * len(lines)
    order: list[int] = []
    while len(order) < len(lines):
        ready = [i for i, (_, args, _, _) in enumerate(lines)
                 if not done[i] and all(tag != "l" or done[a] for tag, a in args)]
        pick = ready[0] if order_bias and rng.random() < order_bias else rng.choice(ready)
        done[pick] = True
        order.append(pick)

    out = []
    for i in order:
        op, args, kind, slots = lines[i]
        numbers = [values[a] if tag == "l" else a for tag, a in args]
        value = _apply(op, numbers)
        values[i] = value
        if op in "+*" and rng.random() < 0.5:
            numbers = numbers[::-1]
        expr = f"{numbers[0]}{op}{numbers[1]}"
        core = f"{expr}=<<{expr}={value}>>{value}"
        unit = slots.get("unit", "")
        words = dict(slots)
        words.update(_pronouns(slots.get("gender", "f")))
        words["E"] = "$" + core if unit == "$" else f"{core} {unit}"
        out.append(rng.choice(_PHRASES[kind]).format(**words))
    answer = values[order[-1]] if order else None
    if answer != program.answer:  # the last step is the only sink, so it is rendered last
        raise AssertionError("rationale does not end at the program's answer")
    return "\n".join(out) + f"\n#### {program.answer}"


# ---------------------------------------------------------------------------
# Stories
# ---------------------------------------------------------------------------


@dataclass
class _Sent:
    focus: str | None  # the person the sentence is about (may become a pronoun)
    template: str
    data: dict[str, Any]
    event: bool = False  # may take a "Then"/"Later," prefix


class _Story:
    def __init__(self, rng: random.Random, config: ArithConfig) -> None:
        self.rng = rng
        self.cfg = config
        self.steps: list[Step] = []
        self.sents: list[_Sent] = []
        self.question = ""
        self.qdata: dict[str, Any] = {}
        self.gender: dict[str, str] = {}
        self.items: list[_Item] = []

    # -- building blocks --------------------------------------------------
    def person(self) -> str:
        name, gender = self.rng.choice([n for n in NAMES if n[0] not in self.gender])
        self.gender[name] = gender
        return name

    def item(self) -> _Item:
        item = self.rng.choice([i for i in ITEMS if i not in self.items])
        self.items.append(item)
        return item

    def num(self, lo: int, hi: int) -> int:
        if hi < lo:
            raise _Fail
        return self.rng.randint(lo, hi)

    def value(self, arg: Arg) -> int:
        tag, v = arg
        return v if tag == "n" else self.steps[v].value

    def op(self, op: str, args: list[Arg], kind: str, slots: dict[str, str]) -> Arg:
        value = _apply(op, [self.value(a) for a in args])
        if not 2 <= value <= self.cfg.max_value:  # 2+: no "1 marbles"
            raise _Fail
        self.steps.append(Step(op, tuple(args), kind, tuple(sorted(slots.items())), value))
        return ("s", len(self.steps) - 1)

    def say(self, focus: str | None, templates: tuple[str, ...] | str, event: bool = False, **data: Any) -> None:
        template = templates if isinstance(templates, str) else self.rng.choice(templates)
        self.sents.append(_Sent(focus, template, data, event))

    def ask(self, templates: tuple[str, ...] | str, **data: Any) -> None:
        self.question = templates if isinstance(templates, str) else self.rng.choice(templates)
        self.qdata = data

    def divisor(self, value: int, hi: int) -> int:
        options = [k for k in range(2, min(hi, value // 2) + 1) if value % k == 0]
        if not options:
            raise _Fail
        return self.rng.choice(options)

    # -- realisation --------------------------------------------------------
    def _words(self, focus: str | None, use_pronoun: bool) -> dict[str, str]:
        if focus is None:
            return {}
        words = _pronouns(self.gender[focus])
        if use_pronoun:
            words.update(S=words["pron_cap"], s=words["pron"], Ps=words["pos"].capitalize())
        else:
            words.update(S=focus, s=focus, Ps=focus + "'s")
        return words

    def text(self) -> str:
        rng = self.rng
        out, previous = [], None
        for sent in self.sents:
            use_pronoun = sent.focus is not None and sent.focus == previous and rng.random() < 0.6
            data = dict(sent.data)
            data.update(self._words(sent.focus, use_pronoun))
            line = sent.template.format(**data)
            if sent.event and rng.random() < 0.3:
                first, _, rest = line.partition(" ")
                if first in ("She", "He", "Her", "His"):
                    first = first.lower()
                line = f"{rng.choice(_PREFIXES)} {first} {rest}"
            out.append(line)
            # after a sentence naming a second person ("her brother", a friend), use the name again
            previous = None if "{rel}" in sent.template or "{friend}" in sent.template else sent.focus
        data = dict(self.qdata)
        data.update(self._words(self.qdata.get("name"), False))
        out.append(self.question.format(**data))
        return " ".join(out)


# -- distractors ---------------------------------------------------------------


def _add_distractors(st: _Story, hero: str, count: int) -> None:
    rng, cfg = st.rng, st.cfg
    for _ in range(count):
        kind = rng.randrange(7)
        n = st.num(2, cfg.max_operand)
        if kind == 0:
            other = st.person()
            sent = _Sent(other, rng.choice(("{S} has {n} {items}.", "{S} has {n} {items} at home.")),
                         {"n": n, "items": rng.choice(ITEMS).many})
        elif kind == 1:
            sent = _Sent(hero, "{S} is {n} years old.", {"n": st.num(6, 14)})
        elif kind == 2:
            sent = _Sent(hero, "{Ps} {rel} is {n} years old.", {"n": st.num(6, 40), "rel": rng.choice(RELATIVES)})
        elif kind == 3:
            extra = [i for i in ITEMS if i not in st.items]
            sent = _Sent(hero, rng.choice(("{S} also keeps {n} {items} in a drawer.", "{S} has {n} {items} at home.")),
                         {"n": n, "items": rng.choice(extra).many})
        elif kind == 4:
            sent = _Sent(hero, "{Ps} class has {n} students.", {"n": st.num(12, 30)})
        elif kind == 5:
            other = st.person()
            sent = _Sent(other, "{S} buys {n} {items} for ${p} each.",
                         {"n": n, "p": st.num(2, cfg.max_operand), "items": rng.choice(ITEMS).many})
        else:
            sent = _Sent(None, "It takes {name} {n} minutes to walk to school.", {"n": st.num(5, 30), "name": hero})
        st.sents.insert(rng.randint(0, len(st.sents)), sent)


# -- family: collect -------------------------------------------------------------


def _collect(st: _Story, n: int) -> str:
    rng, cfg = st.rng, st.cfg
    hero = st.person()
    item = st.item()
    cont, conts = rng.choice(CONTAINERS)
    base = {"name": hero, "gender": st.gender[hero], "unit": item.many, "cont": cont, "conts": conts}
    w = {"items": item.many, "item": item.one, "cont": cont, "conts": conts}
    start_steps = rng.choice((0, 0, 1))
    final_steps = rng.choice((0, 1, 1))
    events = n - start_steps - final_steps
    if events < 1:
        raise _Fail

    # start
    if start_steps == 0:
        a = st.num(10, cfg.max_base)
        st.say(hero, ("{S} has {a} {items}.", "{S} has a collection of {a} {items}.",
                      "{S} starts the day with {a} {items}."), a=a, **w)
        x: Arg = ("n", a)
    elif item.colored and rng.random() < 0.5:
        a, b = st.num(3, cfg.max_base // 2), st.num(3, cfg.max_base // 2)
        c1, c2 = rng.sample(COLORS, 2)
        st.say(hero, ("{S} has {a} {c1} {items} and {b} {c2} {items}.",
                      "{S} owns {a} {c1} {items} and {b} {c2} {items}.",
                      "{S} keeps {a} {c1} {items} and {b} {c2} {items} in a box."), a=a, b=b, c1=c1, c2=c2, **w)
        x = st.op("+", [("n", a), ("n", b)], "start_sum", base)
    else:
        k, m = st.num(2, cfg.max_operand), st.num(2, cfg.max_operand)
        st.say(hero, ("{S} has {k} {conts} of {items} with {m} {items} in each {cont}.",
                      "{S} has {k} {conts}, and each {cont} holds {m} {items}.",
                      "{S} owns {k} {conts} of {items}. There are {m} {items} in each {cont}."), k=k, m=m, **w)
        x = st.op("*", [("n", k), ("n", m)], "start_packs", base)

    # events
    last = "gain"
    while events > 0:
        size = 2 if events >= 2 and rng.random() < 0.35 else 1
        events -= size
        value = st.value(x)
        rel = rng.choice(RELATIVES)
        if size == 1:
            choice = rng.choices(("gain", "lose", "keep"), weights=(4, 4, 2))[0]
            if choice == "lose" and value < 4:
                choice = "gain"
            if choice == "keep":
                k = st.divisor(value, min(cfg.max_operand, 10))
                st.say(hero, ("{S} splits {pos} {items} into {k} equal piles and keeps one pile.",
                              "{S} puts {pos} {items} into {k} equal groups and keeps only one group.",
                              "{S} divides {pos} {items} equally into {k} {conts} and keeps one {cont}."),
                       event=True, k=k, **w)
                x = st.op("/", [x, ("n", k)], "keep_part", base)
                last = "lose"
            elif choice == "gain":
                b = st.num(2, cfg.max_operand)
                templates = ["{S} buys {b} more {items}.", "{S} finds {b} more {items}.",
                             "{S} gets {b} {items} as a gift.", "{S} wins {b} {items} at a game.",
                             "{Ps} {rel} gives {obj} {b} more {items}.", "{S} collects {b} more {items}."]
                if rng.random() < 0.2:
                    st.say(None, "{friend} gives {name} {b} {items}.", event=True, friend=st.person(), name=hero,
                           b=b, **w)
                else:
                    st.say(hero, tuple(templates), event=True, b=b, rel=rel, **w)
                x = st.op("+", [x, ("n", b)], "gain", base)
                last = "gain"
            else:
                b = st.num(2, min(cfg.max_operand, value - 1))
                templates = ["{S} gives {b} {items} to {friend}.", "{S} loses {b} of {pos} {items}.",
                             "{S} sells {b} of {pos} {items}.", "{S} gives away {b} {items}.",
                             "{S} uses {b} {items} for a school project.", "{S} trades away {b} {items}."]
                if item.edible:
                    templates.append("{S} eats {b} of the {items}.")
                template = rng.choice(templates)
                friend = st.person() if "{friend}" in template else ""
                st.say(hero, template, event=True, b=b, friend=friend, **w)
                x = st.op("-", [x, ("n", b)], "lose", base)
                last = "lose"
        else:
            k, m = st.num(2, cfg.max_operand), st.num(2, cfg.max_operand)
            if rng.random() < 0.5 or k * m >= value:
                st.say(hero, ("{S} buys {k} {conts} of {items} with {m} {items} in each {cont}.",
                              "{S} gets {k} more {conts} of {items}, and each {cont} has {m} {items}.",
                              "{Ps} {rel} gives {obj} {k} {conts} with {m} {items} in each.",
                              "{S} wins {k} {conts} of {items} with {m} {items} in each {cont}."),
                       event=True, k=k, m=m, rel=rel, **w)
                packs = st.op("*", [("n", k), ("n", m)], "packs_in", base)
                x = st.op("+", [x, packs], "gain", base)
                last = "gain"
            else:
                st.say(hero, ("{S} gives {k} friends {m} {items} each.", "{S} gives {m} {items} to each of {k} friends.",
                              "{S} gives each of {pos} {k} classmates {m} {items}.",
                              "{S} sells {k} {conts} of {items} with {m} {items} in each {cont}."),
                       event=True, k=k, m=m, **w)
                out = st.op("*", [("n", k), ("n", m)], "packs_out", base)
                x = st.op("-", [x, out], "lose", base)
                last = "lose"

    # final
    value = st.value(x)
    if final_steps == 0:
        questions = ["How many {items} does {name} have now?", "How many {items} does {name} have in the end?"]
        if last == "lose":
            questions.append("How many {items} does {name} have left?")
        st.ask(tuple(questions), name=hero, **w)
        return hero
    choice = rng.choice(("per_group", "n_groups", "earn", "together2", "diff"))
    if choice == "per_group":
        k = st.divisor(value, cfg.max_operand)
        setup, question, group = rng.choice((
            ("{S} puts all of {pos} {items} equally into {k} {conts}.", "How many {items} are in each {cont}?", cont),
            ("{S} shares {pos} {items} equally among {k} friends.", "How many {items} does each friend get?",
             "friend"),
            ("{S} splits {pos} {items} into {k} equal piles.", "How many {items} are in each pile?", "pile"),
        ))
        st.say(hero, setup, k=k, **w)
        st.ask(question, name=hero, **w)
        x = st.op("/", [x, ("n", k)], "per_group", {**base, "cont": group})
    elif choice == "n_groups":
        k = st.divisor(value, cfg.max_operand)
        setup, question = rng.choice((
            ("{S} packs {pos} {items} into {conts} of {k}.", "How many {conts} does {name} fill?"),
            ("{S} puts {k} {items} in each {cont}.", "How many {conts} does {name} need for all of {pos} {items}?"),
        ))
        st.say(hero, setup, k=k, **w)
        st.ask(question, name=hero, **w)
        x = st.op("/", [x, ("n", k)], "n_groups", {**base, "unit": conts})
    elif choice == "earn":
        p = st.num(2, cfg.max_operand)
        st.say(hero, ("{S} sells all of {pos} {items} for ${p} each.", "{S} sells each {item} for ${p}."), p=p, **w)
        st.ask(("How much money does {name} make?", "How much money does {name} get for the {items}?"),
               name=hero, **w)
        x = st.op("*", [x, ("n", p)], "earn", {**base, "unit": "$", "unit_items": item.many})
    else:
        friend = st.person()
        if choice == "diff":
            f = st.num(2, min(cfg.max_base, value - 1))
            st.say(friend, ("{S} has {f} {items}.", "{S} has a collection of {f} {items}."), f=f, **w)
            st.ask("How many more {items} does {name} have than {friend}?", name=hero, friend=friend, **w)
            x = st.op("-", [x, ("n", f)], "diff", {**base, "big": hero, "small": friend})
        else:
            f = st.num(2, cfg.max_base)
            st.say(friend, ("{S} has {f} {items}.", "{S} has a collection of {f} {items}."), f=f, **w)
            st.ask(("How many {items} do {name} and {friend} have together?",
                    "How many {items} do {name} and {friend} have in all?"), name=hero, friend=friend, **w)
            x = st.op("+", [x, ("n", f)], "together2", {**base, "friend": friend})
    return hero


# -- family: shop ------------------------------------------------------------------


def _shop(st: _Story, n: int) -> str:
    rng, cfg = st.rng, st.cfg
    combos = [(k, extra, final, n - (k - 1) - extra - final)
              for k in range(1, 5) for extra in (0, 1) for final in (0, 1)
              if 0 <= n - (k - 1) - extra - final <= k]
    if not combos:
        raise _Fail
    k, extra, final, n_products = rng.choice(combos)
    hero = st.person()
    base = {"name": hero, "gender": st.gender[hero], "unit": "$"}
    budget_first = final == 1 and rng.random() < 0.6
    final_kind = rng.choice(("left", "change", "share")) if final else "spend"
    if final_kind == "left" and budget_first:
        budget_index = len(st.sents)
        st.say(hero, "placeholder")
    with_product = [True] * n_products + [False] * (k - n_products)
    rng.shuffle(with_product)
    terms: list[Arg] = []
    for index, product in enumerate(with_product):
        item = st.item()
        w = {"items": item.many, "item": item.one}
        if product:
            q, p = st.num(2, cfg.max_operand), st.num(2, cfg.max_operand)
            templates = ["{S} buys {q} {items} for ${p} each.", "{S} buys {q} {items}. Each {item} costs ${p}.",
                         "{S} buys {q} {items} at ${p} per {item}.", "{S} picks {q} {items}, and each one costs ${p}."]
            if index:
                templates += ["{S} also gets {q} {items} that cost ${p} each.", "{S} also buys {q} {items} for ${p} each."]
            st.say(hero, tuple(templates), event=index > 0, q=q, p=p, **w)
            terms.append(st.op("*", [("n", q), ("n", p)], "cost", {**base, "items": item.many}))
        else:
            p = st.num(3, cfg.max_operand * 2)
            templates = ["{S} buys {a_item} for ${p}.", "{S} pays ${p} for {a_item}."]
            if index:
                templates += ["{S} also pays ${p} for {a_item}.", "{S} also buys {a_item} for ${p}."]
            st.say(hero, tuple(templates), event=index > 0, p=p, a_item=item.a, **w)
            terms.append(("n", p))
    total = st.op("+", terms, "spent_total", base) if k > 1 else terms[0]
    if extra:
        value = st.value(total)
        if value > 4 and rng.random() < 0.5:
            d = st.num(2, min(cfg.max_operand, value - 2))
            st.say(hero, ("{S} has a coupon for ${d} off.", "{S} gets ${d} off with a coupon.",
                          "The store gives {name} a ${d} discount."), d=d, name=hero)
            total = st.op("-", [total, ("n", d)], "discount", base)
        else:
            d = st.num(2, cfg.max_operand)
            st.say(hero, ("{S} also pays ${d} for delivery.", "Delivery costs {name} ${d} more.",
                          "The store adds a ${d} fee."), d=d, name=hero)
            total = st.op("+", [total, ("n", d)], "fee", base)
    value = st.value(total)
    if final_kind == "spend":
        st.ask(("How much money does {name} spend in total?", "How much does {name} pay in all?",
                "How much money does {name} spend?"), name=hero)
    elif final_kind == "left":
        budget = min(cfg.max_value, value + st.num(1, cfg.max_base))
        budget = min(-(-budget // 5) * 5, cfg.max_value)
        if budget <= value:
            raise _Fail
        templates = ("{S} has ${M}.", "{S} goes to the store with ${M}.", "{S} has ${M} to spend.")
        if budget_first:
            st.sents[budget_index] = _Sent(hero, rng.choice(templates), {"M": budget})
        else:
            st.say(hero, ("{S} had ${M} before shopping.", "{S} brought ${M} to the store."), M=budget)
        st.ask(("How much money does {name} have left?", "How much money is left?"), name=hero)
        st.op("-", [("n", budget), total], "money_left", base)
    elif final_kind == "change":
        bills = [b for b in (10, 20, 50, 100, 200, 500) if b > value]
        if not bills:
            raise _Fail
        bill = bills[0] if rng.random() < 0.7 or len(bills) == 1 else bills[1]
        st.say(hero, ("{S} pays with a ${M} bill.", "{S} gives the cashier a ${M} bill."), M=bill)
        st.ask(("How much change does {name} get?", "How much money does {name} get back?"), name=hero)
        st.op("-", [("n", bill), total], "change", base)
    else:
        people = st.divisor(value, cfg.max_operand)
        st.say(hero, ("{S} and {pos} friends split the cost equally, {k} people in all.",
                      "The cost is shared equally by {k} friends."), k=people)
        st.ask(("How much does each person pay?", "How much money does each person pay?"), name=hero)
        st.op("/", [total, ("n", people)], "share", base)
    return hero


# -- family: compare -------------------------------------------------------------


def _compare(st: _Story, n: int) -> str:
    rng, cfg = st.rng, st.cfg
    combos = [(p, q) for p in range(2, 7) for q in ("last", "pair", "diff", "all")
              if p - 1 + {"last": 0, "pair": 1, "diff": 1, "all": p - 1}[q] == n and (q != "all" or p >= 3)]
    if not combos:
        raise _Fail
    count, qtype = rng.choice(combos)
    item = st.item()
    w = {"items": item.many}
    people = [st.person()]
    a = st.num(4, cfg.max_base // 2)
    st.say(people[0], ("{S} has {a} {items}.", "{S} collects {items} and has {a} of them.",
                       "{S} has a box with {a} {items}."), a=a, **w)
    args: list[Arg] = [("n", a)]
    for _ in range(count - 1):
        chain = qtype == "last" or rng.random() < 0.7  # asking for the last person: every one is needed
        ref_index = len(people) - 1 if chain else rng.randrange(len(people))
        ref, ref_arg = people[ref_index], args[ref_index]
        rv = st.value(ref_arg)
        who = st.person()
        slots = {"name": people[0], "gender": st.gender[people[0]], "unit": item.many, "who": who}
        options = [("more", 2), ("rev_fewer", 1)]
        if rv > 3:
            options += [("fewer", 2), ("rev_more", 1)]
        if rv * 2 <= cfg.max_value:
            options += [("times", 2)]
        if any(rv % k == 0 for k in range(2, cfg.max_factor + 1)) and rv >= 4:
            options += [("part", 1)]
        relation = rng.choices([o for o, _ in options], weights=[wt for _, wt in options])[0]
        if relation in ("more", "rev_fewer"):
            k = st.num(2, cfg.max_operand)
            templates = (("{S} has {k} more {items} than {R}.", "{S} has {k} {items} more than {R}.",
                          "{S} owns {k} more {items} than {R} does.") if relation == "more" else
                         ("{R} has {k} fewer {items} than {B}.", "{R} owns {k} fewer {items} than {B} does."))
            arg = st.op("+", [ref_arg, ("n", k)], "person", slots)
        elif relation in ("fewer", "rev_more"):
            k = st.num(2, min(cfg.max_operand, rv - 1))
            templates = (("{S} has {k} fewer {items} than {R}.", "{S} has {k} {items} fewer than {R}.",
                          "{S} owns {k} fewer {items} than {R} does.") if relation == "fewer" else
                         ("{R} has {k} more {items} than {B}.", "{R} owns {k} more {items} than {B} does."))
            arg = st.op("-", [ref_arg, ("n", k)], "person", slots)
        elif relation == "times":
            k = st.num(2, min(cfg.max_factor, cfg.max_value // rv))
            templates = ("{S} has {k} times as many {items} as {R}.",
                         "{S} owns {k} times the number of {items} that {R} has.")
            arg = st.op("*", [ref_arg, ("n", k)], "person", slots)
        else:
            k = rng.choice([d for d in range(2, cfg.max_factor + 1) if rv % d == 0])
            templates = ("{R} has {k} times as many {items} as {B}.",
                         "{R} owns {k} times the number of {items} that {B} has.")
            arg = st.op("/", [ref_arg, ("n", k)], "person", slots)
        template = rng.choice(templates)
        st.say(who if template.startswith("{S}") else None, template, R=ref, B=who, k=k, **w)
        people.append(who)
        args.append(arg)
    last = people[-1]
    slots = {"name": people[0], "gender": st.gender[people[0]], "unit": item.many}
    if qtype == "last":
        st.ask(("How many {items} does {who} have?", "How many {items} does {who} own?"), who=last, **w)
    elif qtype in ("pair", "diff"):
        other = rng.randrange(len(people) - 1)
        i, j = (other, len(people) - 1) if rng.random() < 0.5 else (len(people) - 1, other)
        if qtype == "pair":
            st.ask(("How many {items} do {X} and {Y} have together?", "How many {items} do {X} and {Y} have in all?"),
                   X=people[i], Y=people[j], **w)
            st.op("+", [args[i], args[j]], "together", slots)
        else:
            vi, vj = st.value(args[i]), st.value(args[j])
            if vi == vj:
                raise _Fail
            if vi < vj:
                i, j = j, i
            st.ask("How many more {items} does {X} have than {Y}?", X=people[i], Y=people[j], **w)
            st.op("-", [args[i], args[j]], "diff", {**slots, "big": people[i], "small": people[j]})
    else:
        names = ", ".join(people[:-1]) + " and " + people[-1]
        st.ask(("How many {items} do {names} have in all?", "How many {items} do {names} have together?"),
               names=names, **w)
        st.op("+", args, "together", slots)
    return people[0]


# -- family: rate ------------------------------------------------------------------

_ACTIVITIES = (
    # verb, unit, periods, goal sentence, goal question, total question
    ("reads", "pages", ("day",), ("{Ps} new book has {N} pages.", "{S} wants to read a book with {N} pages."),
     "How many pages does {name} still need to read?", "How many pages does {name} read in all?"),
    ("saves", "$", ("week", "day"), ("{S} wants to buy a bike that costs ${N}.",),
     "How much more money does {name} need for the bike?", "How much money does {name} save in total?"),
    ("earns", "$", ("hour", "day"), ("{S} wants to buy a game that costs ${N}.",),
     "How much more money does {name} need for the game?", "How much money does {name} earn in all?"),
    ("walks", "miles", ("day", "week"), ("{S} plans to walk {N} miles this month.",),
     "How many more miles does {name} need to walk?", "How many miles does {name} walk in total?"),
    ("bakes", "cookies", ("day", "hour"), ("{S} needs {N} cookies for a school party.",),
     "How many more cookies does {name} need to bake?", "How many cookies does {name} bake in all?"),
    ("swims", "laps", ("day", "week"), ("{Ps} coach wants {obj} to swim {N} laps.",),
     "How many more laps does {name} need to swim?", "How many laps does {name} swim in total?"),
)


def _rate(st: _Story, n: int) -> str:
    rng, cfg = st.rng, st.cfg
    combos = [(k, final, n - (k - 1) - final) for k in range(1, 5) for final in (0, 1)
              if k - 1 <= n - (k - 1) - final <= k and n - (k - 1) - final >= 1]
    if not combos:
        raise _Fail
    k, final, n_products = rng.choice(combos)
    verb, unit, periods, goal_sents, goal_q, total_q = rng.choice(_ACTIVITIES)
    per = rng.choice(periods)
    pers = per + "s"
    aper = "an hour" if per == "hour" else "a " + per
    hero = st.person()
    base = {"name": hero, "gender": st.gender[hero], "unit": unit, "verb": verb, "pers": pers}

    def amount(x: int) -> str:
        return f"${x}" if unit == "$" else f"{x} {unit}"

    goal_first = final == 1 and rng.random() < 0.5
    if goal_first:
        goal_index = len(st.sents)
        st.say(hero, "placeholder")
    terms: list[Arg] = []
    for index in range(k):
        r = st.num(2, cfg.max_operand)
        if index < n_products:
            d = st.num(2, min(cfg.max_operand, 10))
            templates = ["{S} {verb} {R} {aper} for {d} {pers}.", "{S} {verb} {R} each {per} for {d} {pers}.",
                         "For {d} {pers}, {s} {verb} {R} every {per}.", "On each of {d} {pers}, {s} {verb} {R}.",
                         "{S} {verb} {R} every {per} for {d} {pers} in a row."]
            if index:
                templates = ["Then {s} {verb} {R} {aper} for {d} more {pers}.",
                             "{S} {verb} {R} {aper} for the next {d} {pers}.",
                             "After that, {s} {verb} {R} each {per} for {d} {pers}."]
            st.say(hero, tuple(templates), verb=verb, R=amount(r), aper=aper, per=per, pers=pers, d=d)
            terms.append(st.op("*", [("n", r), ("n", d)], "phase", base))
        else:
            st.say(hero, ("{S} also {verb} {R} on one extra {per}.", "On the last {per}, {s} {verb} {R} more."),
                   verb=verb, R=amount(r), per=per)
            terms.append(("n", r))
    total = st.op("+", terms, "rate_total", base) if k > 1 else terms[0]
    if final:
        goal = st.value(total) + st.num(2, cfg.max_base)
        if goal > cfg.max_value:
            raise _Fail
        sent = _Sent(hero, rng.choice(goal_sents), {"N": goal})
        if goal_first:
            st.sents[goal_index] = sent
        else:
            st.sents.append(sent)
        st.ask(goal_q, name=hero)
        st.op("-", [("n", goal), total], "remaining", base)
    else:
        st.ask(total_q, name=hero)
    return hero


_BUILDERS = {"collect": _collect, "shop": _shop, "compare": _compare, "rate": _rate}


# ---------------------------------------------------------------------------
# Problems and splits
# ---------------------------------------------------------------------------


def _make_problem(rng: random.Random, config: ArithConfig, lo: int, hi: int) -> tuple[str, Program]:
    """One random (question, program) with lo..hi steps."""
    for _ in range(_MAX_ATTEMPTS_PER_PROBLEM):
        st = _Story(random.Random(rng.getrandbits(64)), config)
        n = st.rng.randint(lo, hi)
        family = st.rng.choice(config.families)
        try:
            hero = _BUILDERS[family](st, n)
            if config.max_distractors:
                _add_distractors(st, hero, st.rng.randint(0, config.max_distractors))
        except _Fail:
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

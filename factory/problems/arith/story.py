"""The story a problem is told as: vocabulary, the `Story` builder, and distractor sentences.

A family builder (`factory.problems.arith.families`) records each operation on
a `Story` together with the sentences that state its numbers; the story then
realises the question text (pronouns, "Then"/"Later," prefixes) and the
`Step`s become the problem's program.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from factory.problems.arith.program import Arg, Redraw, Step, apply_op, pronouns

if TYPE_CHECKING:  # the package imports this module before it defines ArithConfig
    from factory.problems.arith import ArithConfig

NAMES = (
    ("Mia", "f"), ("Emma", "f"), ("Ava", "f"), ("Lily", "f"), ("Zoe", "f"), ("Grace", "f"), ("Ella", "f"),
    ("Nora", "f"), ("Ruby", "f"), ("Chloe", "f"), ("Sara", "f"), ("Anna", "f"), ("Lucy", "f"), ("Amy", "f"),
    ("Kate", "f"),
    ("Liam", "m"), ("Noah", "m"), ("Ben", "m"), ("Sam", "m"), ("Jack", "m"), ("Leo", "m"), ("Max", "m"),
    ("Owen", "m"), ("Luke", "m"), ("Ryan", "m"), ("Tom", "m"), ("Eli", "m"), ("Adam", "m"), ("Omar", "m"),
    ("Dan", "m"),
)


@dataclass(frozen=True)
class Item:
    one: str
    many: str
    edible: bool = False  # may be eaten ("eats 3 of the cookies")
    colored: bool = False  # may come in colours ("5 red marbles and 4 blue marbles")

    @property
    def a(self) -> str:
        return ("an " if self.one[0] in "aeiou" else "a ") + self.one


ITEMS = (
    Item("apple", "apples", edible=True),
    Item("marble", "marbles", colored=True),
    Item("sticker", "stickers", colored=True),
    Item("book", "books"),
    Item("coin", "coins"),
    Item("pencil", "pencils", colored=True),
    Item("cookie", "cookies", edible=True),
    Item("card", "cards", colored=True),
    Item("shell", "shells"),
    Item("stamp", "stamps"),
    Item("balloon", "balloons", colored=True),
    Item("toy car", "toy cars", colored=True),
    Item("bead", "beads", colored=True),
    Item("crayon", "crayons", colored=True),
    Item("cupcake", "cupcakes", edible=True),
    Item("orange", "oranges", edible=True),
    Item("egg", "eggs", edible=True),
    Item("flower", "flowers", colored=True),
    Item("rock", "rocks"),
    Item("button", "buttons", colored=True),
)
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"))
COLORS = ("red", "blue", "green", "yellow")
RELATIVES = ("mom", "dad", "aunt", "uncle", "grandma", "grandpa", "brother", "sister", "cousin")
_PREFIXES = ("Then", "Later,", "Next,", "After that,")


@dataclass
class Sentence:
    focus: str | None  # the person the sentence is about (may become a pronoun)
    template: str
    data: dict[str, Any]
    event: bool = False  # may take a "Then"/"Later," prefix


class Story:
    """A problem under construction: its steps, its sentences and question, and who is in it."""

    def __init__(self, rng: random.Random, config: ArithConfig) -> None:
        self.rng = rng
        self.cfg = config
        self.steps: list[Step] = []
        self.sents: list[Sentence] = []
        self.question = ""
        self.qdata: dict[str, Any] = {}
        self.gender: dict[str, str] = {}
        self.items: list[Item] = []

    # -- building blocks --------------------------------------------------
    def person(self) -> str:
        name, gender = self.rng.choice([n for n in NAMES if n[0] not in self.gender])
        self.gender[name] = gender
        return name

    def item(self) -> Item:
        item = self.rng.choice([i for i in ITEMS if i not in self.items])
        self.items.append(item)
        return item

    def num(self, lo: int, hi: int) -> int:
        if hi < lo:
            raise Redraw
        return self.rng.randint(lo, hi)

    def value(self, arg: Arg) -> int:
        tag, v = arg
        return v if tag == "n" else self.steps[v].value

    def op(self, op: str, args: list[Arg], kind: str, slots: dict[str, str]) -> Arg:
        value = apply_op(op, [self.value(a) for a in args])
        if not 2 <= value <= self.cfg.max_value:  # 2+: no "1 marbles"
            raise Redraw
        self.steps.append(Step(op, tuple(args), kind, tuple(sorted(slots.items())), value))
        return ("s", len(self.steps) - 1)

    def say(self, focus: str | None, templates: tuple[str, ...] | str, event: bool = False, **data: Any) -> None:
        template = templates if isinstance(templates, str) else self.rng.choice(templates)
        self.sents.append(Sentence(focus, template, data, event))

    def ask(self, templates: tuple[str, ...] | str, **data: Any) -> None:
        self.question = templates if isinstance(templates, str) else self.rng.choice(templates)
        self.qdata = data

    def divisor(self, value: int, hi: int) -> int:
        options = [k for k in range(2, min(hi, value // 2) + 1) if value % k == 0]
        if not options:
            raise Redraw
        return self.rng.choice(options)

    # -- realisation --------------------------------------------------------
    def _words(self, focus: str | None, use_pronoun: bool) -> dict[str, str]:
        if focus is None:
            return {}
        words = pronouns(self.gender[focus])
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


def add_distractors(st: Story, hero: str, count: int) -> None:
    """Insert `count` sentences with numbers the question does not need, anywhere in the story."""
    rng, cfg = st.rng, st.cfg
    for _ in range(count):
        kind = rng.randrange(7)
        n = st.num(2, cfg.max_operand)
        if kind == 0:
            other = st.person()
            sent = Sentence(other, rng.choice(("{S} has {n} {items}.", "{S} has {n} {items} at home.")),
                            {"n": n, "items": rng.choice(ITEMS).many})
        elif kind == 1:
            sent = Sentence(hero, "{S} is {n} years old.", {"n": st.num(6, 14)})
        elif kind == 2:
            sent = Sentence(hero, "{Ps} {rel} is {n} years old.", {"n": st.num(6, 40), "rel": rng.choice(RELATIVES)})
        elif kind == 3:
            extra = [i for i in ITEMS if i not in st.items]
            sent = Sentence(hero, rng.choice(("{S} also keeps {n} {items} in a drawer.",
                                              "{S} has {n} {items} at home.")),
                            {"n": n, "items": rng.choice(extra).many})
        elif kind == 4:
            sent = Sentence(hero, "{Ps} class has {n} students.", {"n": st.num(12, 30)})
        elif kind == 5:
            other = st.person()
            sent = Sentence(other, "{S} buys {n} {items} for ${p} each.",
                            {"n": n, "p": st.num(2, cfg.max_operand), "items": rng.choice(ITEMS).many})
        else:
            sent = Sentence(None, "It takes {name} {n} minutes to walk to school.",
                            {"n": st.num(5, 30), "name": hero})
        st.sents.insert(rng.randint(0, len(st.sents)), sent)

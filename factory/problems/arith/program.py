"""Programs (the exact computation behind a problem) and their GSM8K-format rationales.

Kept apart from the stories so that a stored program (`Program.to_json`) can be
rendered again, any number of ways, without the story that narrated it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

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


class Redraw(Exception):
    """This random draw cannot make a valid problem; draw again."""


def apply_op(op: str, values: list[int]) -> int:
    """Exact integer result of `op`; an inexact division is a bad draw (`Redraw`), not an error."""
    if op == "+":
        return sum(values)
    a, b = values
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise Redraw
        return a // b
    raise ValueError(f"unknown op {op!r}")


def pronouns(gender: str) -> dict[str, str]:
    """Template words for a person of `gender` ("f" or "m"), shared by stories and rationales."""
    pron, obj, pos = ("she", "her", "her") if gender == "f" else ("he", "him", "his")
    return {"pron": pron, "pron_cap": pron.capitalize(), "obj": obj, "pos": pos}


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
        args = [("l", last_line[a]) if tag == "s" else (tag, a) for tag, a in step.args]
        slots = dict(step.slots)
        if len(args) > 2:
            rng.shuffle(args)
            acc = args[0]
            for position, arg in enumerate(args[1:], start=1):
                kind = step.kind if position == len(args) - 1 else "partial"
                lines.append(("+", [acc, arg], kind, slots))
                acc = ("l", len(lines) - 1)
        else:
            lines.append((step.op, args, step.kind, slots))
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
        value = apply_op(op, numbers)
        values[i] = value
        if op in "+*" and rng.random() < 0.5:
            numbers = numbers[::-1]
        expr = f"{numbers[0]}{op}{numbers[1]}"
        core = f"{expr}=<<{expr}={value}>>{value}"
        unit = slots.get("unit", "")
        words = dict(slots)
        words.update(pronouns(slots.get("gender", "f")))
        words["E"] = "$" + core if unit == "$" else f"{core} {unit}"
        out.append(rng.choice(_PHRASES[kind]).format(**words))
    answer = values[order[-1]] if order else None
    if answer != program.answer:  # the last step is the only sink, so it is rendered last
        raise AssertionError("rationale does not end at the program's answer")
    return "\n".join(out) + f"\n#### {program.answer}"

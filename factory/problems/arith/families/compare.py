"""The ``compare`` family: people related by "N more", "N fewer", "N times as many", then a sum or a difference.

A relation may be stated backwards, from the person already known ("A has N
more than B" introducing B), so the story's "more", "fewer" and "times" can
mean a subtraction, an addition and a division.
"""

from __future__ import annotations

from factory.problems.arith.program import Arg, Redraw
from factory.problems.arith.story import Story


def build_compare(st: Story, n: int) -> str:
    """Narrate an `n`-line compare problem on `st`; returns its hero, for the distractors."""
    rng, cfg = st.rng, st.cfg
    combos = [(p, q) for p in range(2, 7) for q in ("last", "pair", "diff", "all")
              if p - 1 + {"last": 0, "pair": 1, "diff": 1, "all": p - 1}[q] == n and (q != "all" or p >= 3)]
    if not combos:
        raise Redraw
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
                raise Redraw
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

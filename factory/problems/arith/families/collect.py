"""The ``collect`` family: a person's items change through events, then maybe a last operation.

Events: buys, finds, gives away, packs of N, splits into equal piles; last
operation: share equally, pack into boxes, sell at $N each, compare with a friend.
"""

from __future__ import annotations

from factory.problems.arith.program import Arg, Redraw
from factory.problems.arith.story import COLORS, CONTAINERS, RELATIVES, Story


def build_collect(st: Story, n: int) -> str:
    """Narrate an `n`-line collect problem on `st`; returns its hero, for the distractors."""
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
        raise Redraw

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

"""The ``rate`` family: N per day/week/hour for D periods in phases, added up, then what a goal still needs."""

from __future__ import annotations

from factory.problems.arith.program import Arg, Redraw
from factory.problems.arith.story import Sentence, Story

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


def build_rate(st: Story, n: int) -> str:
    """Narrate an `n`-line rate problem on `st`; returns its hero, for the distractors."""
    rng, cfg = st.rng, st.cfg
    combos = [(k, final, n - (k - 1) - final) for k in range(1, 5) for final in (0, 1)
              if k - 1 <= n - (k - 1) - final <= k and n - (k - 1) - final >= 1]
    if not combos:
        raise Redraw
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
            raise Redraw
        sent = Sentence(hero, rng.choice(goal_sents), {"N": goal})
        if goal_first:
            st.sents[goal_index] = sent
        else:
            st.sents.append(sent)
        st.ask(goal_q, name=hero)
        st.op("-", [("n", goal), total], "remaining", base)
    else:
        st.ask(total_q, name=hero)
    return hero

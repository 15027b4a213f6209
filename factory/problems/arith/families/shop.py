"""The ``shop`` family: purchases added up, then a coupon or fee, then money left, change or a share."""

from __future__ import annotations

from factory.problems.arith.program import Arg, Redraw
from factory.problems.arith.story import Sentence, Story


def build_shop(st: Story, n: int) -> str:
    """Narrate an `n`-line shop problem on `st`; returns its hero, for the distractors."""
    rng, cfg = st.rng, st.cfg
    combos = [(k, extra, final, n - (k - 1) - extra - final)
              for k in range(1, 5) for extra in (0, 1) for final in (0, 1)
              if 0 <= n - (k - 1) - extra - final <= k]
    if not combos:
        raise Redraw
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
            raise Redraw
        templates = ("{S} has ${M}.", "{S} goes to the store with ${M}.", "{S} has ${M} to spend.")
        if budget_first:
            st.sents[budget_index] = Sentence(hero, rng.choice(templates), {"M": budget})
        else:
            st.say(hero, ("{S} had ${M} before shopping.", "{S} brought ${M} to the store."), M=budget)
        st.ask(("How much money does {name} have left?", "How much money is left?"), name=hero)
        st.op("-", [("n", budget), total], "money_left", base)
    elif final_kind == "change":
        bills = [b for b in (10, 20, 50, 100, 200, 500) if b > value]
        if not bills:
            raise Redraw
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

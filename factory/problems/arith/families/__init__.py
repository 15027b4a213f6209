"""The story families: each narrates a random program of a given number of lines on a `Story`.

A builder raises `Redraw` when its random choices cannot make a valid problem.
"""

from __future__ import annotations

from factory.problems.arith.families.collect import build_collect
from factory.problems.arith.families.compare import build_compare
from factory.problems.arith.families.rate import build_rate
from factory.problems.arith.families.shop import build_shop

BUILDERS = {"collect": build_collect, "shop": build_shop, "compare": build_compare, "rate": build_rate}

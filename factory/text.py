"""Text similarity shared by the near-duplicate filter and the pairing rules.

DPO-ST (Wang et al., ACL 2024) measures how alike two rationales are by the
Jaccard similarity of their token sets: it removes near-duplicates above 0.7
and keeps the least similar positive × negative pairs. Both uses must see the
same tokens, so the tokenisation lives here, once.

>>> sorted(word_set("She has 12+7=<<12+7=19>>19 Marbles.\\n#### 19"))
['####', '12+7=19', '19', 'has', 'marbles.', 'she']
>>> jaccard({"a", "b"}, {"b", "c"})
0.3333333333333333
"""

from __future__ import annotations

import re

# A calculator annotation `<<12+7=19>>`: model-facing bookkeeping, not wording.
_ANNOTATION = re.compile(r"<<.*?>>", re.DOTALL)


def word_set(text: str) -> frozenset[str]:
    """Lowercased whitespace-separated words of `text`, calculator annotations removed.

    The annotation is deleted in place, so `3*4=<<3*4=12>>12` reads `3*4=12` as
    the visible rationale does. Punctuation stays attached to its word.
    """
    return frozenset(_ANNOTATION.sub("", text).lower().split())


def jaccard(a: set | frozenset, b: set | frozenset) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0).

    >>> jaccard(set(), set()), jaccard({"x"}, set())
    (1.0, 0.0)
    """
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)

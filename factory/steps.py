"""Splitting a rationale into steps: one definition used wherever steps are counted.

A step is a non-empty line of the rationale; the final-answer line (`#### N`)
is not a step. Step indices are 0-based everywhere, so "the first wrong step
is 2" means two good steps came before it, which is exactly the number of
steps a step-controlled continuation keeps (`prefix_steps`).
"""

from __future__ import annotations

FINAL_ANSWER_MARKER = "####"


def split_steps(text: str, delimiter: str = "\n") -> list[str]:
    r"""Non-empty lines, final-answer line excluded.

    >>> split_steps("a=<<1+1=2>>2\n\nb=<<2*3=6>>6\n#### 6")
    ['a=<<1+1=2>>2', 'b=<<2*3=6>>6']
    """
    steps = []
    for line in text.split(delimiter):
        line = line.strip()
        if not line or line.startswith(FINAL_ANSWER_MARKER):
            continue
        steps.append(line)
    return steps


def step_index_at(text: str, offset: int, delimiter: str = "\n") -> int:
    """0-based index of the step that contains character `offset` of `text`.

    Counts the non-empty, non-final-answer lines that end before `offset`.
    """
    return len(split_steps(text[:offset].rsplit(delimiter, 1)[0], delimiter)) if delimiter in text[:offset] else 0

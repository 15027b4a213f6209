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


def prefix_text(text: str, n_steps: int, delimiter: str = "\n") -> str:
    r"""The raw text of the first `n_steps` steps, through the delimiter that ends the last of them.

    What a step-level continuation, rollout or pair prompt starts from: any
    text appended to it keeps those steps, so
    `split_steps(prefix_text(t, j) + more)[:j] == split_steps(t)[:j]`.

    >>> prefix_text("a=<<1+1=2>>2\n\nb=<<2*3=6>>6\n#### 6", 1)
    'a=<<1+1=2>>2\n'
    >>> prefix_text("a\nb", 2), prefix_text("a\nb", 0)
    ('a\nb\n', '')
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if n_steps == 0:
        return ""
    seen, start = 0, 0
    while start <= len(text):
        end = text.find(delimiter, start)
        line_end = len(text) if end < 0 else end
        line = text[start:line_end].strip()
        if line and not line.startswith(FINAL_ANSWER_MARKER):
            seen += 1
            if seen == n_steps:
                return text[:line_end] + delimiter
        if end < 0:
            break
        start = end + len(delimiter)
    raise ValueError(f"text has {seen} steps, fewer than {n_steps}: {text[:80]!r}")

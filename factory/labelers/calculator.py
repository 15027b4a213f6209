"""Calculator labeler: check every `<<lhs=rhs>>` annotation after the fact.

>>> calculator_labels(["a <<2+3=5>>5\\nb <<5*4=21>>21\\n#### 21"])["first_error_step"]
[1]
"""

from __future__ import annotations

from factory.calculator import check_annotations
from factory.steps import split_steps


def calculator_labels(texts: list[str]) -> dict[str, list]:
    columns: dict[str, list] = {
        "n_steps": [], "calc_total": [], "calc_wrong": [], "calc_invalid": [], "first_error_step": []
    }
    for text in texts:
        check = check_annotations(text)
        columns["n_steps"].append(len(split_steps(text)))
        columns["calc_total"].append(check.total)
        columns["calc_wrong"].append(check.wrong)
        columns["calc_invalid"].append(check.invalid)
        columns["first_error_step"].append(check.first_error_step)
    return columns

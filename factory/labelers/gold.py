"""Gold-answer labeler: extract each sample's final answer and judge it against gold.

Contract (as TRL's reward functions): columns in, one value per row out, and
`None` where there is nothing to judge against, never a silent False.

>>> gold_labels(["so 2+3=<<2+3=5>>5\\n#### 5", "I think it is 7", "no idea"], ["5", "8", None])["answer_status"]
['correct', 'wrong', 'unparseable']
"""

from __future__ import annotations

from factory.answers import answer_status, extract_answer


def gold_labels(texts: list[str], gold_answers: list[str | None]) -> dict[str, list]:
    answers, sources, statuses, correct = [], [], [], []
    for text, gold in zip(texts, gold_answers, strict=True):
        extraction = extract_answer(text)
        status = answer_status(extraction.answer, gold)
        answers.append(extraction.answer)
        sources.append(extraction.source)
        statuses.append(status)
        correct.append(None if gold is None else status == "correct")
    return {"answer": answers, "answer_source": sources, "answer_status": statuses, "correct": correct}

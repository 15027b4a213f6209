"""Each recipe's precondition: the signal its method relies on, measured from data the factory already has.

A recipe only helps when what it assumes about the current model holds:
DPO-ST and the other gold-judged recipes need correct samples (pass@k); ScPO
needs the majority answer to be mostly right; MCTS-DPO needs the model's
self-evaluation to tell right from wrong; SIPF needs a process reward model
that predicts held-out step labels better than always guessing the commoner
label; SCDPO needs its step-controlled continuations to go wrong. The stages
that see the data compute the signals once (label: `label_signals`; steps:
`self_eval_signal`, `step_negative_yield`, the PRM's held-out figures) into
their metrics files; `iteration_signals` flattens those files into one dict
of named signals, which the report shows and which `factory train` checks
against the iteration's recipe's `precondition` before it trains
(`check_recipe`), warning or, with params `preconditions.gate: fail`,
stopping. A signal that cannot be measured (no gold answer on the sampled
split, one class only) is None: the check says "unmeasured", never "holds".
Light imports: nothing here needs torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from math import comb
from typing import Any

GATES = ("warn", "fail")
# Vote-share buckets of a problem's top answer: [low, high), the last one closed.
TOP_SHARE_BUCKETS = ((0.0, 0.5), (0.5, 0.75), (0.75, 1.0))


@dataclass(frozen=True, kw_only=True)
class PreconditionsConfig:
    """params.yaml `preconditions`: what a failing precondition does, and the thresholds of each recipe's."""

    gate: str = "warn"  # warn: a warning before training, recorded in train.json | fail: stop before training
    min_pass_at_n: float = 0.0  # dpo_st, dpo, self_train: pass@n over gold problems must exceed this
    min_majority_accuracy: float = 0.5  # scpo, scpo_semi: majority-vote accuracy on gold problems, at least
    min_self_eval_auc: float = 0.6  # mcts_dpo: AUC of self-evaluation P(yes), correct vs wrong terminals, at least
    min_negatives_per_parent: float = 0.5  # scdpo: wrong step-controlled continuations per parent, at least

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        for name in ("min_pass_at_n", "min_majority_accuracy", "min_self_eval_auc"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


class PreconditionFailed(ValueError):
    """With `preconditions.gate: fail`: the recipe relies on a signal this iteration measured below its threshold."""


@dataclass(frozen=True, kw_only=True)
class Check:
    """One precondition's verdict: `holds` is None when the signal could not be measured."""

    signal: str
    value: float | None
    threshold: float | None
    holds: bool | None
    why: str
    recipe: str = ""  # set by `check_recipe`

    @property
    def message(self) -> str:
        if self.holds is None:
            return f"recipe {self.recipe}: precondition unmeasured: {self.signal} cannot be measured here ({self.why})"
        verdict = "holds" if self.holds else "fails"
        return (f"recipe {self.recipe}: precondition {verdict}: {self.signal} = {self.value:.4g}, "
                f"threshold {self.threshold:.4g} ({self.why})")

    def record(self) -> dict[str, Any]:
        """What train.json keeps under `precondition`."""
        return {"signal": self.signal, "value": self.value, "threshold": self.threshold, "holds": self.holds,
                "message": self.message}


def at_least(signals: dict, signal: str, threshold: float | str, *, why: str, strict: bool = False) -> Check:
    """`signals[signal] >= threshold` (`>` when `strict`); a str threshold names another signal (a baseline)."""
    value = signals.get(signal)
    bound = signals.get(threshold) if isinstance(threshold, str) else threshold
    holds = None if value is None or bound is None else value > bound if strict else value >= bound
    return Check(signal=signal, value=value, threshold=bound, holds=holds, why=why)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021) for c correct of n samples: 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 1, 4)
    (0.25, 0.5, 0.0, 1.0)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def label_signals(problem_ids: list[str], correct: list[bool | None], votes: Iterable[dict] | None = None) -> dict:
    """label.json's precondition signals: pass@k over the problems with a gold answer, and the vote on them.

    A problem has gold when gold judged any of its samples (`correct` not
    None). pass@k is averaged over those problems for k = 1 .. the fewest
    samples any of them has. `votes` (rows of the `votes` table) adds the
    majority vote on gold problems: right when the unique top answer is
    correct (a tie or no answer is not a right majority), overall and by the
    top answer's vote share.
    """
    judged: dict[str, list[bool]] = {}
    for problem_id, verdict in zip(problem_ids, correct, strict=True):
        if verdict is not None:
            judged.setdefault(problem_id, []).append(verdict)
    signals: dict[str, Any] = {"gold_problems": len(judged)}
    n_min = min((len(v) for v in judged.values()), default=0)
    signals["pass_at_k"] = {str(k): round(sum(pass_at_k(len(v), sum(v), k) for v in judged.values()) / len(judged), 4)
                            for k in range(1, n_min + 1)}
    if votes is not None:
        signals["majority_on_gold"] = majority_on_gold(
            [(row["top_share"], row["majority_correct"] is True) for row in votes if row["problem_id"] in judged])
    return signals


def majority_on_gold(problems: list[tuple[float, bool]]) -> dict:
    """Majority-vote accuracy over (top share, majority right) of gold problems, overall and by vote share.

    >>> majority_on_gold([(0.25, False), (0.5, True), (1.0, True), (0.75, False)])["by_top_share"][1]
    {'top_share': '[0.5, 0.75)', 'problems': 1, 'majority_accuracy': 1.0}
    """
    def accuracy(rights: list[bool]) -> float | None:
        return round(sum(rights) / len(rights), 4) if rights else None

    buckets = []
    for low, high in TOP_SHARE_BUCKETS:
        last = high == TOP_SHARE_BUCKETS[-1][1]
        rights = [right for share, right in problems if low <= share < high or (last and share == high)]
        buckets.append({"top_share": f"[{low}, {high}{']' if last else ')'}", "problems": len(rights),
                        "majority_accuracy": accuracy(rights)})
    return {"problems": len(problems), "majority_accuracy": accuracy([right for _, right in problems]),
            "by_top_share": buckets}


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U / n+ n-); None with one class.

    >>> auc([0.9, 0.5], [0.5, 0.1])
    0.875
    >>> auc([0.3], []) is None
    True
    """
    if not positives or not negatives:
        return None
    scores = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j][0] == scores[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mean_rank * sum(label for _, label in scores[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def self_eval_signal(nodes: list[dict]) -> dict:
    """MCTS-DPO: how well the policy's self-evaluation P(yes) separates gold-correct from gold-wrong terminal nodes."""
    judged = [n for n in nodes if n["terminal"] and n["outcome"] is not None and n["self_eval"] is not None]
    right = [n["self_eval"] for n in judged if n["outcome"] > 0]
    wrong = [n["self_eval"] for n in judged if n["outcome"] < 0]
    value = auc(right, wrong)

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {"auc": None if value is None else round(value, 4), "correct_terminals": len(right),
            "wrong_terminals": len(wrong), "mean_p_yes_correct": mean(right), "mean_p_yes_wrong": mean(wrong)}


def step_negative_yield(continuations: list[dict], verdicts: list[bool | None]) -> dict:
    """SCDPO: what the step-controlled continuations yielded, per parent they started from."""
    parents = {row["parent_sample_id"] for row in continuations}
    negatives = sum(v is False for v in verdicts)
    return {"parents": len(parents), "continuations": len(continuations), "negatives": negatives,
            "still_correct": sum(v is True for v in verdicts),
            "negatives_per_parent": round(negatives / len(parents), 4) if parents else None}


def iteration_signals(label: dict | None, steps: dict | None) -> dict[str, Any]:
    """One iteration's named signals from its label.json and steps.json (None where not measured)."""
    label, steps = label or {}, steps or {}
    pass_k = label.get("pass_at_k") or {}
    majority = (label.get("vote") or {}).get("majority_on_gold") or {}
    prm = (steps.get("process") or {}).get("prm") or {}
    return {
        "sample_accuracy": label.get("sample_accuracy"),
        "solved_fraction": label.get("solved_fraction"),
        "pass_at_k": pass_k or None,
        "pass_at_n": pass_k[max(pass_k, key=int)] if pass_k else None,
        "majority_accuracy_gold": majority.get("majority_accuracy"),
        "majority_gold_problems": majority.get("problems"),
        "self_eval_auc": (steps.get("self_eval") or {}).get("auc"),
        "prm_heldout_accuracy": prm.get("heldout_accuracy"),
        "prm_heldout_baseline": prm.get("heldout_majority_baseline"),
        "step_negative_yield": (steps.get("step_negatives") or {}).get("negatives_per_parent"),
    }


def check_recipe(recipe, signals: dict, config: PreconditionsConfig) -> Check | None:
    """The recipe's precondition on these signals; None for a recipe that declares none."""
    return replace(recipe.precondition(signals, config), recipe=recipe.name) if recipe.precondition else None

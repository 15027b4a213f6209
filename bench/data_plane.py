"""Data-plane benchmark: label -> filter -> pairs on synthetic GSM8K-format samples.

Run from the repository root (defaults: 100,000 problems x 10 samples = 1,000,000 samples):

    python bench/data_plane.py
    python bench/data_plane.py --problems 2000 --samples-per-problem 10   # a quick run

The input is synthetic but shaped like real sampling output, deterministic from
`--seed`: multi-step rationales with `<<a*b=c>>` calculator annotations, and
some samples with a wrong annotation, a wrong or missing `#### N`, a truncated
ending, commas, decimals, fractions, negative numbers, LaTeX, non-ASCII text,
exact and near duplicates.

What is timed, for each side, is the computation of the three CLI stages from
in-memory Arrow tables to their outputs, nothing else (not building the input,
not Parquet reading or writing):

- factory: `label_samples` + `vote_table` (label), `run_filters` (filter) and
  `pairs_table` (pairs: DPO-ST, the default recipe), the functions
  `factory label/filter/pairs` call;
- baseline: the same logic as a straightforward per-row Python program (for
  loops over dict rows, in the style of the papers' scripts) written below,
  calling the project's per-item reference functions (`extract_answer`,
  `answer_status`, `check_annotations`, `split_steps`), and for pairs the
  library's per-row reference rule (`dpo_st_pairs`), not a copy of it.

Each side runs `--repeats` times, alternated, and the medians are compared
(on this shared machine single runs vary by 10-20%). The first run's outputs
are checked to be identical: labels, votes, kept samples, dropped rows with
their reasons, filter counts and pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's factory, run from anywhere

from factory.answers import answer_status, extract_answer  # noqa: E402
from factory.calculator import check_annotations  # noqa: E402
from factory.filters import FilterConfig, run_filters  # noqa: E402
from factory.ids import canonical_json  # noqa: E402
from factory.labelers import label_samples, vote_table  # noqa: E402
from factory.arrow import threads  # noqa: E402
from factory.pairs import PairsConfig, pairs_table  # noqa: E402
from factory.recipes.dpo_st import PAIRS as DPO_ST_RULE  # noqa: E402
from factory.recipes.dpo_st import dpo_st_pairs  # noqa: E402
from factory.schema import DROPPED, LABELS, PROBLEMS, SAMPLES, VOTES, from_rows  # noqa: E402
from factory.reasoning_steps import split_steps  # noqa: E402
from factory.text import jaccard, word_set  # noqa: E402

ITERATION = 1
MAX_NEW_TOKENS = 256
PROMPT = "Question: {}\nAnswer:\n"

# --- the synthetic input -----------------------------------------------------------------------

NAMES = ("Mia", "Tom", "Ava", "Noah", "Lily", "Ben", "Zoe", "Eli", "Ruby", "Owen", "Ivy", "Dan")
ITEMS = ("marbles", "apples", "stickers", "coins", "cookies", "pens", "books", "stamps", "shells", "cards")
EVENTS = {
    "+": ("{name} buys {b} more {item}.", "{name} finds {b} more {item}."),
    "-": ("{name} gives away {b} {item}.", "{name} sells {b} of the {item}."),
    "*": ("{name} gets {b} times as many {item}.", "{name} fills {b} bags with that many {item} each."),
    "/": ("{name} shares the {item} equally among {b} friends.", "{name} splits the {item} into {b} piles."),
}
# The ways a sample words one step (the gold rationale uses the first).
STEPS = (
    "{name} has {expr}=<<{expr}={result}>>{shown} {item}.",
    "So {name} now has {expr}=<<{expr}={result}>>{shown} {item}.",
    "After that, there are {expr}=<<{expr}={result}>>{shown} {item}.",
    "That leaves {expr}=<<{expr}={result}>>{shown} {item} in total.",
    "{expr}=<<{expr}={result}>>{shown}",
    "Then {name} has {expr} = <<{expr}={result}>>{shown} {item} left.",
    "We compute {expr} and get <<{expr}={result}>>{shown}.",
    "The number of {item} is now {expr}=<<{expr}={result}>>{shown}.",
    "{name} ends up with {expr}=<<{expr}={result}>>{shown} {item} after this step.",
    "Next: {expr}=<<{expr}={result}>>{shown}, which is how many {item} {name} keeps.",
)
# Rarer writing the fast paths must hand to the reference functions, or get right themselves.
ODD_ANNOTATIONS = ("<<{a} x {b}={r}>>", "<<({a}+0)*1={r}>>", "<<{a}{op}{b}>>", "<<twelve={r}>>", "<<0{a}+0={r}>>",
                   "<<{r}*100%={r}>>", "<<10/3=3.33>>", "<<{a}\u00d71={a}>>", "<<2**3=8>>", "<<1/0=1>>")
ODD_ENDINGS = ("#### {answer_commas}", "#### ${answer}", "#### {answer}.0", "#### {answer} {item}",
               "The answer is {answer}.", "So {name} has {answer} {item} in the end.", "Answer: {answer}",
               "The final answer is $\\boxed{{{answer}}}$.", "#### {answer}/1", "#### -{answer}", "#### ",
               "#### {answer}\u00a0{item}", "\u2014 {answer} \u20ac", "#### 1 1/2", "#### 0.5e3",
               "#### {answer}\n#### {wrong}")
# (kind, weight): what a sample is.
KINDS = (("correct", 136), ("duplicate", 10), ("calc_error", 20), ("wrong_answer", 18), ("truncated", 6),
         ("odd_ending", 1), ("odd_annotation", 1), ("bare", 2), ("long", 2))


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _chain(rng: random.Random) -> list[tuple[str, str, str, float]]:
    """2-4 steps (op, a, b, result) of a story; some results are decimals or in the thousands."""
    value: float = rng.randint(5, 60)
    steps = []
    for _ in range(rng.randint(2, 4)):
        op = rng.choice("+-*/")
        if op == "-" and value <= 2 or op == "/" and value != int(value):
            op = "+"
        if op == "+":
            b = rng.randint(2, 60)
            result = value + b
        elif op == "-":
            b = rng.randint(1, int(value) - 1)
            result = value - b
        elif op == "*":
            b = rng.choice((2, 3, 4, 5, 6, 12, 100))
            result = value * b
        else:
            divisors = [d for d in (2, 3, 4, 5, 6) if value % d == 0]
            if not divisors and rng.random() < 0.8:
                op, divisors = "+", [rng.randint(2, 60)]
            b = rng.choice(divisors) if divisors else rng.choice((2, 4))
            result = value + b if op == "+" else value / b
        steps.append((op, _number(value), str(b), result))
        value = result
    return steps


def _rationale(rng: random.Random, chain, name: str, item: str, *, wording: list[int],
               error_at: int | None = None) -> tuple[str, str]:
    """The lines of a rationale (without its ending) and the answer it reaches."""
    lines, carried = [], None
    for index, (op, a, b, result) in enumerate(chain):
        if carried is not None:  # an earlier slip propagates
            a = carried
            result = {"+": float(a) + float(b), "-": float(a) - float(b), "*": float(a) * float(b),
                      "/": float(a) / float(b)}[op]
        shown = _number(result)
        if index == error_at:
            shown = _number(result + rng.choice((-10, -2, -1, 1, 2, 10)))
            carried = shown
        elif carried is not None:
            carried = shown
        expr = f"{a}{op}{b}"
        written = shown if index == error_at else _number(result)
        lines.append(STEPS[wording[index]].format(name=name, item=item, expr=expr, result=written, shown=shown))
    return "\n".join(lines), carried if carried is not None else _number(chain[-1][3])


def _sample_text(rng: random.Random, kind: str, chain, name: str, item: str, earlier: list[str]) -> str:
    wording = [rng.randrange(len(STEPS)) for _ in chain]
    if kind == "duplicate" and earlier:
        return rng.choice(earlier)
    if kind == "bare":
        return f"#### {_number(chain[-1][3])}"
    error_at = rng.randrange(len(chain)) if kind == "calc_error" else None
    body, answer = _rationale(rng, chain, name, item, wording=wording, error_at=error_at)
    if kind == "wrong_answer":
        answer = str(int(float(answer)) + rng.choice((-3, -1, 1, 5)))
    if kind == "odd_annotation":
        op, a, b, result = chain[0]
        odd = rng.choice(ODD_ANNOTATIONS).format(a=a, b=b, op=op, r=_number(result))
        body = f"First, {a}{op}{b}={odd}{_number(result)}.\n{body}"
    if kind == "odd_ending":
        commas = f"{float(answer):,}".removesuffix(".0")
        wrong = str(int(float(answer)) + 1)
        ending = rng.choice(ODD_ENDINGS).format(answer=answer, answer_commas=commas, item=item, name=name,
                                                wrong=wrong)
    else:
        ending = f"#### {answer}"
    text = f"{body}\n{ending}"
    if kind == "long":
        text = f"{body}\nLet me check that again.\n{body}\n{ending}"
    if kind == "truncated":
        text = text[: rng.randint(len(text) // 3, len(text) - len(ending) - 1)]
    return text


def synthetic_input(n_problems: int, samples_per_problem: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(problems, samples) Arrow tables, the same for the same arguments."""
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS, strict=True)
    problems: dict[str, list] = {field.name: [] for field in PROBLEMS}
    samples: dict[str, list] = {field.name: [] for field in SAMPLES}
    for p in range(n_problems):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        chain = _chain(rng)
        problem_id = "p-" + hashlib.blake2b(f"{seed}/{p}".encode(), digest_size=8).hexdigest()
        start = chain[0][1]
        events = " ".join(rng.choice(EVENTS[op]).format(name=name, item=item, b=b) for op, _, b, _ in chain)
        gold, answer = _rationale(rng, chain, name, item, wording=[0] * len(chain))
        unlabeled = rng.random() < 0.01
        problems["problem_id"].append(problem_id)
        problems["question"].append(f"{name} has {start} {item}. {events} How many {item} are there now?")
        problems["gold_answer"].append(None if unlabeled else answer)
        problems["gold_rationale"].append(None if unlabeled else f"{gold}\n#### {answer}")
        problems["source"].append("synthetic")
        problems["split"].append("answers")
        problems["n_steps"].append(len(chain))
        earlier: list[str] = []
        for index in range(samples_per_problem):
            kind = rng.choices(kinds, weights)[0]
            text = _sample_text(rng, kind, chain, name, item, earlier)
            earlier.append(text)
            truncated = kind == "truncated"
            digest = hashlib.blake2b(f"{problem_id}/{index}".encode(), digest_size=8).hexdigest()
            row = {
                "sample_id": f"s-{digest}", "problem_id": problem_id, "iteration": ITERATION, "model_id": "m-bench",
                "generator": "bench", "parent_sample_id": None, "prefix_steps": None, "sample_index": index,
                "seed": seed, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS,
                "calculator": index % 2 == 0, "step_temperatures": None, "text": text,
                "n_tokens": MAX_NEW_TOKENS if truncated else len(text) // 3 + rng.randint(0, 20),
                "finish_reason": "length" if truncated else "stop",
            }
            for key, value in row.items():
                samples[key].append(value)
    return pa.table(problems, schema=PROBLEMS), pa.table(samples, schema=SAMPLES)


# --- the baseline: the same logic, one dict row at a time ------------------------------------------


def baseline_labels(problems: list[dict], samples: list[dict]) -> list[dict]:
    gold = {p["problem_id"]: p["gold_answer"] for p in problems}
    labels = []
    for sample in samples:
        text, gold_answer = sample["text"], gold[sample["problem_id"]]
        extraction = extract_answer(text)
        status = answer_status(extraction.answer, gold_answer)
        check = check_annotations(text)
        labels.append({
            "sample_id": sample["sample_id"], "problem_id": sample["problem_id"], "answer": extraction.answer,
            "answer_canonical": extraction.answer,  # numbers are their own canonical text (factory.labelers.canonical)
            "answer_source": extraction.source, "answer_status": status,
            "correct": None if gold_answer is None else status == "correct", "n_steps": len(split_steps(text)),
            "calc_total": check.total, "calc_wrong": check.wrong, "calc_invalid": check.invalid,
            "first_error_step": check.first_error_step,
        })
    k = Counter(label["problem_id"] for label in labels)
    votes = Counter((label["problem_id"], label["answer"]) for label in labels if label["answer"] is not None)
    counts_of = defaultdict(set)
    for (problem_id, _), count in votes.items():
        counts_of[problem_id].add(count)
    rank_of = {p: {c: r for r, c in enumerate(sorted(cs, reverse=True), start=1)} for p, cs in counts_of.items()}
    for label in labels:
        answered = label["answer"] is not None
        count = votes[(label["problem_id"], label["answer"])] if answered else 0
        label |= {"vote_count": count, "vote_share": count / k[label["problem_id"]],
                  "vote_rank": rank_of[label["problem_id"]][count] if answered else None, "step_scores": None}
    return labels


def baseline_votes(labels: list[dict]) -> list[dict]:
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for label in labels:
        by_problem[label["problem_id"]].append(label)
    rows = []
    for problem_id in sorted(by_problem):
        group = by_problem[problem_id]
        answers: dict[str, list] = defaultdict(list)
        for label in group:
            if label["answer"] is not None:
                answers[label["answer"]].append(label["correct"])
        top = max((len(c) for c in answers.values()), default=0)
        leaders = [a for a, c in answers.items() if len(c) == top]
        answered = sum(len(c) for c in answers.values())
        entropy = (-sum(len(c) * math.log2(len(c)) for c in answers.values()) / answered + math.log2(answered)
                   if answers else 0.0)
        leader = answers[leaders[0]] if len(leaders) == 1 else None
        rows.append({
            "problem_id": problem_id, "n_samples": len(group), "n_answered": answered, "n_answers": len(answers),
            "top_answer": leaders[0] if len(leaders) == 1 else None, "top_votes": top,
            "top_share": top / len(group), "tied": len(leaders) > 1, "entropy": max(entropy, 0.0),
            "majority_correct": None if leader is None or all(c is None for c in leader)
            else any(c is True for c in leader),
        })
    return rows


def baseline_filters(samples: list[dict], labels: list[dict], config: FilterConfig) -> tuple[list, list, dict]:
    label_of = {label["sample_id"]: label for label in labels}
    rows = [sample | {k: v for k, v in label_of[sample["sample_id"]].items() if k not in sample} for sample in samples]
    dropped: list[dict] = []
    counts: dict[str, dict[str, int]] = {}

    def apply(name: str, reasons: list[str | None]) -> list[dict]:
        kinds: Counter = Counter()
        kept = []
        for row, reason in zip(rows, reasons, strict=True):
            if reason is None:
                kept.append(row)
                continue
            kinds[reason.split(" (", 1)[0]] += 1
            dropped.append({"row_id": row["sample_id"], "table": "samples", "stage": "filter", "filter": name,
                            "reason": reason, "row": canonical_json(row)})
        counts[name] = dict(sorted(kinds.items()))
        return kept

    reasons = []
    for row in rows:
        if row["finish_reason"] == "length":
            budget = row["max_new_tokens"]
            reasons.append(f"truncated at max_new_tokens (finish_reason=length, max_new_tokens={budget})")
        elif row["answer_status"] == "unparseable":
            reasons.append("no final answer (answer_status=unparseable)")
        else:
            reasons.append(None)
    rows = apply("final_answer", reasons)
    reasons = []
    for row in rows:
        if row["n_steps"] < config.min_steps:
            reasons.append(f"too few steps (n_steps={row['n_steps']} < min_steps={config.min_steps})")
        elif row["n_tokens"] > config.max_tokens:
            reasons.append(f"too many tokens (n_tokens={row['n_tokens']} > max_tokens={config.max_tokens})")
        else:
            reasons.append(None)
    rows = apply("length", reasons)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        groups[(row["problem_id"], row["correct"])].append(index)
    reasons = [None] * len(rows)
    for indices in groups.values():
        indices.sort(key=lambda i: (rows[i]["sample_index"], rows[i]["sample_id"], rows[i]["text"]))
        kept_words: list[tuple[str, frozenset]] = []
        for i in indices:
            words = word_set(rows[i]["text"])
            best_id, best = None, -1.0
            for kept_id, other in kept_words:
                similarity = jaccard(words, other)
                if similarity > best:
                    best_id, best = kept_id, similarity
            if best > config.dedup_threshold:
                reasons[i] = f"near-duplicate (of {best_id}, Jaccard {best:.3f} > {config.dedup_threshold})"
            else:
                kept_words.append((rows[i]["sample_id"], words))
    rows = apply("near_duplicate", reasons)
    kept = [{name: row[name] for name in SAMPLES.names} for row in rows]
    return kept, dropped, {"input": len(samples), "kept": len(kept), "dropped": counts}


def baseline_pairs(problems: list[dict], samples: list[dict], labels: list[dict],
                   config: PairsConfig) -> tuple[list[dict], dict]:
    """The library's per-row reference of the DPO-ST rule (`factory.recipes.dpo_st.dpo_st_pairs`)."""
    return dpo_st_pairs(problems, samples, labels, prompt_for=PROMPT.format, iteration=ITERATION, config=config)


# --- both sides, timed and compared ----------------------------------------------------------------

TARGET_SECONDS, TARGET_RATIO = 10.0, 20.0


def _timed(problems, samples, filter_config: FilterConfig, pairs_config: PairsConfig, *, label, vote, filters,
           pairs) -> tuple[dict, dict[str, float]]:
    """One side's label (+ votes), filter and pairs stages, each timed."""
    timer = StageTimer()
    labels = label(problems, samples)
    votes = vote(labels)
    timer.lap("label")
    kept, dropped, counts = filters(samples, labels, filter_config)
    timer.lap("filter")
    pair_rows, summary = pairs(problems, kept, labels, pairs_config)
    timer.lap("pairs")
    return {"labels": labels, "votes": votes, "kept": kept, "dropped": dropped, "counts": counts, "pairs": pair_rows,
            "summary": summary}, timer.seconds


def factory(problems: pa.Table, samples: pa.Table, filter_config: FilterConfig,
            pairs_config: PairsConfig) -> tuple[dict, dict[str, float]]:
    """The functions `factory label`, `factory filter` and `factory pairs` call."""
    return _timed(problems, samples, filter_config, pairs_config,
                  label=lambda problems, samples: label_samples(samples, problems), vote=vote_table,
                  filters=run_filters,
                  pairs=lambda problems, kept, labels, config: pairs_table(
                      DPO_ST_RULE, problems, kept, labels, prompt_for=PROMPT.format, iteration=ITERATION,
                      config=config))


def baseline(problems: list[dict], samples: list[dict], filter_config: FilterConfig,
             pairs_config: PairsConfig) -> tuple[dict, dict[str, float]]:
    """The per-row program: the same stages over dict rows."""
    return _timed(problems, samples, filter_config, pairs_config, label=baseline_labels, vote=baseline_votes,
                  filters=baseline_filters, pairs=baseline_pairs)


class StageTimer:
    """Wall seconds per stage, and CPU seconds (all threads) in total."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self.start
        self.seconds["cpu"] = time.process_time() - self.cpu_start
        self.start = now


def total(seconds: dict[str, float]) -> float:
    """Wall seconds of all stages."""
    return sum(value for stage, value in seconds.items() if stage != "cpu")


def differences(fast: dict, slow: dict) -> list[str]:
    """The outputs that differ (empty: identical)."""
    expected = {
        "labels": pa.Table.from_pylist(slow["labels"], schema=LABELS),
        "votes": pa.Table.from_pylist(slow["votes"], schema=VOTES),
        "kept": pa.Table.from_pylist(slow["kept"], schema=SAMPLES),
        "dropped": pa.Table.from_pylist(slow["dropped"], schema=DROPPED),
        "pairs": from_rows(slow["pairs"], "pairs"),
    }
    wrong = [name for name, table in expected.items() if not fast[name].equals(table)]
    return wrong + [name for name in ("counts", "summary") if fast[name] != slow[name]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=100_000)
    parser.add_argument("--samples-per-problem", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the medians are compared")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    start = time.perf_counter()
    problems, samples = synthetic_input(args.problems, args.samples_per_problem, args.seed)
    print(f"input: {args.problems:,} problems x {args.samples_per_problem} = {samples.num_rows:,} samples "
          f"(seed {args.seed}), built in {time.perf_counter() - start:.1f} s (not timed); "
          f"{threads()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    filter_config, pairs_config = FilterConfig(), PairsConfig()
    problem_rows, sample_rows = problems.to_pylist(), samples.to_pylist()
    runs: dict[str, list[dict[str, float]]] = {"factory": [], "baseline": []}
    for repeat in range(args.repeats):  # alternated, so that machine noise hits both sides alike
        fast, fast_seconds = factory(problems, samples, filter_config, pairs_config)
        slow, slow_seconds = baseline(problem_rows, sample_rows, filter_config, pairs_config)
        runs["factory"].append(fast_seconds)
        runs["baseline"].append(slow_seconds)
        for name, seconds in (("factory", fast_seconds), ("baseline", slow_seconds)):
            stages = "  ".join(f"{stage} {value:6.2f} s" for stage, value in seconds.items() if stage != "cpu")
            print(f"run {repeat + 1} {name:9} {stages}  total {total(seconds):7.2f} s  (CPU {seconds['cpu']:.2f} s)",
                  flush=True)
        if repeat == 0:
            wrong = differences(fast, slow)
            kept, pairs = fast["counts"]["kept"], fast["summary"]["pairs"]
        del fast, slow
    print(f"kept {kept:,} of {samples.num_rows:,} samples; {pairs:,} pairs")
    print("outputs identical: labels, votes, kept, dropped rows with reasons, filter counts, pairs, pairs summary"
          if not wrong else f"OUTPUTS DIFFER: {', '.join(wrong)}")
    totals = {name: statistics.median(total(seconds) for seconds in seconds_list) for name, seconds_list in runs.items()}
    ratio = totals["baseline"] / totals["factory"]
    print(f"median of {args.repeats}: factory {totals['factory']:.2f} s, baseline {totals['baseline']:.2f} s")
    print(f"ratio: {ratio:.1f}x (baseline time / factory time); targets: factory under {TARGET_SECONDS:g} s "
          f"({'met' if totals['factory'] < TARGET_SECONDS else 'missed'}), ratio at least {TARGET_RATIO:g}x "
          f"({'met' if ratio >= TARGET_RATIO else 'missed'})")
    if args.json:
        figures = {"command": "python bench/data_plane.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "samples": samples.num_rows, "seed": args.seed, "cpus": threads(), "repeats": args.repeats,
                   "median_s": totals, "ratio": round(ratio, 2), "identical": not wrong, "runs": runs}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

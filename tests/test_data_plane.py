"""The columnar data plane equals its per-row reference: labels, word-set similarity, filters, pairs, row JSON.

Each fast path hands the rows its grammar does not cover to the reference, so the tests feed both
sides awkward text (commas, decimals, fractions, signs, LaTeX, missing or repeated `####`, wrong and
invalid annotations, unfinished ones, `<<<`, tabs, CR, non-breaking spaces, non-ASCII, duplicates)
and small chunk sizes, so that chunk and group boundaries fall everywhere.
"""

import json
from collections import Counter

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.filters import FilterConfig, build_filters, join_labels, run_filters
from factory.filters import similarity as similarity_module
from factory import arrow as columnar
from factory.arrow import canonical_json_rows, json_strings
from factory.filters.similarity import jaccard as bulk_jaccard
from factory.filters.similarity import word_bitsets
from factory.ids import canonical_json
from factory.labelers import label_samples
from factory.labelers.annotations import calculator_labels
from factory.labelers.gold import gold_labels
from factory.pairs import PairsConfig
from factory.pairs import pairs_table as rule_table
from factory.recipes.dpo_st import PAIRS as DPO_ST_RULE
from factory.recipes.dpo_st import dpo_st_pairs
from factory.schema import DROPPED, LABELS, PAIRS, SAMPLES, validate
from factory.text import jaccard, word_set


def pairs_table(*tables, **kwargs):
    """The `pairs` stage's table for the DPO-ST rule: its bulk version, or the reference where it declines."""
    return rule_table(DPO_ST_RULE, *tables, **kwargs)


FRAGMENTS = [
    "Mia", "has", "apples.", "THE", "ANSWER", "Answer:", "The answer is", "A:", "Final answer:", "so",
    "12", "19", "1,080", "-3", "0.50", "3/4", "1 1/2", "$18", "007", "1,0800", "2.5e3", "\u22124", "\u0663", "-$5",
    "<<12+7=19>>", "<<12+7=20>>", "<<48/2=24>>", "<<10/3=3.33>>", "<<2/8=0.3>>", "<<2/8=0.2>>", "<<1/0=1>>",
    "<<12 x 3 = 36>>", "<<2**3=8>>", "<<twelve=12>>", "<<05+3=8>>", "<<12*3>>", "<<12*3=", "<<<1+1=2>>",
    "<<1+1=2>>>", "<<a b>>", ">>", "<<", "<<1/3000000=0>>", "<<0.5*10=5>>", "<<999999999*999999999=1>>",
    "#### ", "####", "\\boxed{", "}", "\\frac{1}{3}", "=", "(", ")",
    " ", " ", " ", "\n", "\n", "\n\n", "\t", "\r\n", "\xa0", "\u2028", "\x1c", "  ", "\n  ", "\n#",
    "\u00e9", "\u20ac", "\u0130", "\u00df", '"', "\\",
]
ENDINGS = ["", "\n#### 19", "\n#### 1,080", "\n#### $18 apples.", "\n#### -0.50", "\n#### 19\n", "\n#### 19 \r\n",
           "\nThe answer is 19.", "\nSo she has 12 left", "\n####"]
texts = st.builds(lambda parts, ending: "".join(parts) + ending,
                  st.lists(st.sampled_from(FRAGMENTS), max_size=25), st.sampled_from(ENDINGS))
golds = st.sampled_from(["19", "1080", "1,080", "18", "-0.5", "0.5", "1/3", "abc", "", None])

HAND_MADE = [
    "a <<2+3=5>>5\nb <<5*4=21>>21\n#### 21", "", "<<<1+1=2>>", "x<<1/0=1>>\n  #### 3", "\t<<10/3=3.33>>\n\n####",
    "\u00e9 <<2*3=7>>7\n b <<1+1=3>>", "<<1+2=3", "a\nb\n<<12 * 3 = 36>>\n<<2**3=8>>", "1/3000000: <<1/3000000=0>>",
    "<<2/8=0.3>>x<<2/8=0.2>>", "###\n####x\n #### y\n", "#\n##\n", "#### 1,080", "#### $18", "#### $-5",
    "#### 18 apples #### 5", "#### 18.", "#### 1,0800", "#### 18 3/4", "#### 5 <<x>>", "#### 007.50 kg", "a\n#### -0.0",
    "x 6 / 2", "a $ 5", "so 13-7=6, which is", "-$ 5 q", "( -5 apples", "1,500 done", "3.5. ok", "x=-7\n", "  12",
    "12 5", "_5 x", "a.5 b", "6/ 2 c", "Noah has 13-7=<<13-", "#### 1000001", "#### 999999.9999999",
]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that every chunk and group boundary case occurs in small inputs."""
    monkeypatch.setattr(columnar, "CHUNK_ROWS", 3)
    monkeypatch.setattr(similarity_module, "CHUNK_ROWS", 4)


def reference_labels(texts: list[str], gold_answers: list) -> dict[str, list]:
    return gold_labels(texts, gold_answers) | calculator_labels(texts)


def label_inputs(texts: list[str], gold_answers: list) -> tuple[pa.Table, pa.Table]:
    ids = pa.array([f"p-{i}" for i in range(len(texts))], pa.string())
    problems = pa.table({"problem_id": ids, "gold_answer": pa.array(gold_answers, pa.string())})
    samples = pa.table({"sample_id": pa.array([f"s-{i}" for i in range(len(texts))], pa.string()), "problem_id": ids,
                        "text": pa.array(texts, pa.string())})
    return samples, problems


def assert_labels_match(texts: list[str], gold_answers: list) -> None:
    samples, problems = label_inputs(texts, gold_answers)
    labels = label_samples(samples, problems)
    for name, values in reference_labels(texts, gold_answers).items():
        assert labels.column(name).to_pylist() == values, name


def test_labels_of_hand_made_edge_cases_match_the_reference(small_chunks):
    assert_labels_match(HAND_MADE, ["19", None, "1,080", "abc"] * 9 + ["1000000", "1000000"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(texts, golds), min_size=1, max_size=12))
def test_labels_match_the_reference(small_chunks, rows):
    assert_labels_match([t for t, _ in rows], [g for _, g in rows])


def test_votes_count_answers_per_problem():
    samples = pa.table({"sample_id": ["a", "b", "c", "d"], "problem_id": ["p", "p", "p", "q"],
                        "text": ["#### 5", "#### 5.0", "#### 6", "no idea"]})
    problems = pa.table({"problem_id": ["p", "q"], "gold_answer": ["5", None]})
    labels = label_samples(samples, problems)
    assert labels.column("vote_count").to_pylist() == [2, 2, 1, 0]
    assert labels.column("vote_rank").to_pylist() == [1, 1, 2, None]
    assert labels.column("correct").to_pylist() == [True, True, False, None]


def test_an_unknown_problem_is_named_with_its_row():
    samples = pa.table({"sample_id": ["a", "b"], "problem_id": ["p", "x"], "text": ["#### 5", "#### 6"]})
    with pytest.raises(ValueError, match=r"s\.parquet: row 2 field 'problem_id': 'x' is not in the problems file"):
        label_samples(samples, pa.table({"problem_id": ["p"], "gold_answer": ["5"]}), samples_source="s.parquet")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(texts, st.integers(0, 2)), max_size=14), st.booleans())
def test_word_set_jaccard_in_bulk_matches_the_reference(small_chunks, rows, sparse):
    groups = [g for _, g in rows]
    only = [i for i in range(len(rows)) if i % 3] if sparse else None
    bitsets = word_bitsets(pa.array([t for t, _ in rows], pa.string()), groups, only=only)
    compared = range(len(rows)) if only is None else only
    pairs = [(i, j) for i in compared for j in compared if groups[i] == groups[j]]
    values = bulk_jaccard(bitsets, [i for i, _ in pairs], [j for _, j in pairs]).tolist() if pairs else []
    sets = [word_set(t) for t, _ in rows]
    assert values == [jaccard(sets[i], sets[j]) for i, j in pairs]


def sample_row(index, problem, text, **over):
    row = {"sample_id": f"s-{index:03d}", "problem_id": problem, "iteration": 1, "model_id": "m-test",
           "generator": "hf", "parent_sample_id": None, "prefix_steps": None, "sample_index": index % 4, "seed": 0,
           "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 256, "calculator": True, "text": text,
           "n_tokens": 20, "finish_reason": "stop"}
    return row | over


POOL = ["Tom has 3*4=<<3*4=12>>12 pens.\n#### 12", "TOM HAS 3*4=<<3*4=13>>12 PENS.\n#### 12",
        "Tom has 3*4=12 pens so far.\n#### 12", "#### 12", "Tom has\u00a0twelve pens.\n#### 12", "",
        "so 3 4 5 6 7 8 9\n#### 9", "so 3 4 5 6 7 8 9 10\n#### 9", "<<a b>> c d", "\u00c9l has 12\n#### 12"]
sample_specs = st.lists(st.tuples(st.sampled_from(POOL), st.sampled_from(["p-1", "p-2", "p-3"]),
                                  st.sampled_from([True, False, None]), st.integers(0, 3), st.integers(0, 300),
                                  st.sampled_from(["stop", "stop", "length"])), max_size=16)


def filter_inputs(specs) -> tuple[pa.Table, pa.Table]:
    samples, labels = [], []
    for index, (text, problem, correct, steps, tokens, finish) in enumerate(specs):
        samples.append(sample_row(index, problem, text, n_tokens=tokens, finish_reason=finish))
        status = {True: "correct", False: "wrong", None: "unparseable"}[correct]
        labels.append({"sample_id": f"s-{index:03d}", "problem_id": problem, "answer": "12", "answer_source": "hashes",
                       "answer_status": status, "correct": correct, "n_steps": steps, "calc_total": 0, "calc_wrong": 0,
                       "calc_invalid": 0, "first_error_step": None})
    return pa.Table.from_pylist(samples, schema=SAMPLES), validate(pa.Table.from_pylist(labels[::-1], schema=LABELS
                                                                                       ), "labels")


def reference_filters(samples: pa.Table, labels: pa.Table, config: FilterConfig):
    rows = join_labels(samples.to_pylist(), labels.to_pylist())
    dropped, counts = [], {}
    for rule in build_filters(config):
        result = rule.apply(rows)
        rows, dropped, counts[rule.name] = result.kept, dropped + result.dropped, result.counts["dropped"]
    return pa.Table.from_pylist(rows, schema=SAMPLES), pa.Table.from_pylist(dropped, schema=DROPPED), counts


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample_specs, st.sampled_from([0.0, 0.5, 0.7, 1.0]))
def test_run_filters_matches_the_per_row_filters(small_chunks, specs, threshold):
    samples, labels = filter_inputs(specs)
    config = FilterConfig(dedup_threshold=threshold)
    kept, dropped, counts = run_filters(samples, labels, config)
    expected_kept, expected_dropped, expected_counts = reference_filters(samples, labels, config)
    assert kept.equals(expected_kept)
    assert dropped.equals(expected_dropped)
    assert counts["dropped"] == expected_counts and counts["kept"] == kept.num_rows


def pair_inputs(specs, gold_rationales):
    problems = [{"problem_id": p, "question": f"What about {p}?", "gold_answer": "12", "gold_rationale": g}
                for p, g in zip(["p-1", "p-2", "p-3"], gold_rationales, strict=True)]
    samples = [{"sample_id": f"s-{i:03d}", "problem_id": problem, "text": text}
               for i, (text, problem, *_rest) in enumerate(specs)]
    labels = [{"sample_id": f"s-{i:03d}", "problem_id": problem, "correct": correct}
              for i, (_, problem, correct, *_rest) in enumerate(specs)]
    return problems, samples, labels


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample_specs, st.lists(st.sampled_from([None, "", POOL[0], POOL[2], "Gold 12.\n#### 12"]), min_size=3,
                              max_size=3), st.sampled_from([1, 2, 3, 5, 10]), st.booleans())
def test_pairs_table_matches_the_dpo_st_rule(small_chunks, specs, gold_rationales, k, include_gold):
    problems, samples, labels = pair_inputs(specs, gold_rationales)
    config = PairsConfig(pairs_per_problem=k, include_gold=include_gold)
    prompt = "Q: {}\n".format
    table, summary = pairs_table(pa.Table.from_pylist(problems), pa.Table.from_pylist(samples, schema=pa.schema(
        [("sample_id", pa.string()), ("problem_id", pa.string()), ("text", pa.string())])),
        pa.Table.from_pylist(labels, schema=pa.schema([("sample_id", pa.string()), ("problem_id", pa.string()),
                                                       ("correct", pa.bool_())])),
        prompt_for=prompt, iteration=2, config=config)
    rows, expected_summary = dpo_st_pairs(problems, samples, labels, prompt_for=prompt, iteration=2, config=config)
    assert table.equals(pa.Table.from_pylist(rows, schema=PAIRS))
    assert summary == expected_summary


def test_pairs_table_hands_inputs_that_do_not_join_to_the_rule():
    problems, samples, labels = pair_inputs([(POOL[0], "p-1", True, 0, 0, "stop")], [None, None, None])
    with pytest.raises(ValueError, match="no label for sample 's-000'"):
        pairs_table(pa.Table.from_pylist(problems), pa.Table.from_pylist(samples), pa.Table.from_pylist(
            [{"sample_id": "s-x", "problem_id": "p-1", "correct": True}]), prompt_for=str, iteration=1,
            config=PairsConfig())


def test_pairs_table_hands_repeated_and_empty_sample_ids_to_the_rule():
    specs = [(POOL[0], "p-1", True), (POOL[1], "p-1", False), (POOL[2], "p-1", False)]
    problems, samples, labels = pair_inputs(specs, [None, None, None])
    samples[2]["sample_id"] = labels[2]["sample_id"] = samples[1]["sample_id"]
    with pytest.raises(ValueError, match="row 3: sample 's-001' appears twice"):
        pairs_table(pa.Table.from_pylist(problems), pa.Table.from_pylist(samples), pa.Table.from_pylist(labels[:2]),
                    prompt_for=str, iteration=1, config=PairsConfig())
    # A positive with id "" and the gold rationale's text ties with the gold pair, whose chosen id is "" too.
    problems, samples, labels = pair_inputs(specs, [POOL[0], None, None])
    samples[0]["sample_id"] = labels[0]["sample_id"] = ""
    config = PairsConfig(pairs_per_problem=1)
    table, summary = pairs_table(pa.Table.from_pylist(problems), pa.Table.from_pylist(samples),
                                 pa.Table.from_pylist(labels), prompt_for=str, iteration=1, config=config)
    rows, expected = dpo_st_pairs(problems, samples, labels, prompt_for=str, iteration=1, config=config)
    assert table.equals(pa.Table.from_pylist(rows, schema=PAIRS)) and summary == expected
    assert table.column("chosen_sample_id").to_pylist() == [""]  # the rule's stable sort keeps the sample first


strings = st.one_of(st.none(), st.text(st.sampled_from('ab"\\\n\r\t\x08\x0c\x01\x1f\x7f\u00e9\u2028 '), max_size=8))
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e16, 1e-5, 0.7]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(strings, st.integers(-2**40, 2**40), floats, st.one_of(st.none(), st.booleans()),
                          st.one_of(st.none(), st.lists(floats, max_size=3))), max_size=12))
def test_row_json_is_canonical_json(rows):
    table = pa.table({"text": pa.array([r[0] for r in rows], pa.string()), "n": [r[1] for r in rows],
                      "x": pa.array([r[2] for r in rows], pa.float64()), "ok": pa.array([r[3] for r in rows],
                                                                                       pa.bool_()),
                      "scores": pa.array([r[4] for r in rows], pa.list_(pa.float64()))})
    assert canonical_json_rows(table).to_pylist() == [canonical_json(row) for row in table.to_pylist()]
    assert json_strings(table.column("text").combine_chunks()).to_pylist() == [
        None if r[0] is None else json.dumps(r[0], ensure_ascii=False) for r in rows]


def test_empty_inputs_give_empty_outputs():
    samples, problems = label_inputs([], [])
    assert label_samples(samples, problems).num_rows == 0
    samples, labels = filter_inputs([])
    kept, dropped, counts = run_filters(samples, labels, FilterConfig())
    assert (kept.num_rows, dropped.num_rows, counts["kept"]) == (0, 0, 0)
    table, summary = pairs_table(pa.table({"problem_id": pa.array([], pa.string()), "question": pa.array(
        [], pa.string())}), kept, labels, prompt_for=str, iteration=1, config=PairsConfig())
    assert table.num_rows == 0 and summary["pairs"] == 0 and Counter(summary["skipped"]) == Counter()

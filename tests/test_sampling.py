"""N samples per problem: schema rows, stable ids, batching-independent texts."""

from factory.generators.sampling import SamplingConfig, row_seed, sample_rationales
from factory.schema import from_rows

PROBLEMS = [
    {"problem_id": "p-a", "question": "Mia has 12 marbles. She buys 7 more. How many marbles does Mia have?"},
    {"problem_id": "p-b", "question": "Tom has 3 boxes with 4 pens in each box. How many pens?"},
]


def test_samples_are_valid_rows_with_request_ids(tiny_model):
    model, tokenizer = tiny_model
    config = SamplingConfig(n=3, temperature=1.0, max_new_tokens=12, batch_size=4, seed=7)
    rows = sample_rationales(model, tokenizer, PROBLEMS, config, model_id="m-test", iteration=1,
                             show_progress=False)
    table = from_rows(rows, "samples")
    assert table.num_rows == 6
    assert [(r["problem_id"], r["sample_index"]) for r in rows] == [
        ("p-a", 0), ("p-a", 1), ("p-a", 2), ("p-b", 0), ("p-b", 1), ("p-b", 2)]
    assert len({r["sample_id"] for r in rows}) == 6
    # Pinned: the HF backend's ids did not move when the backend became a setting.
    assert rows[0]["sample_id"] == "s-04e0512c33716aaf" and {r["generator"] for r in rows} == {"hf"}
    assert {(r["model_id"], r["iteration"], r["seed"], r["temperature"], r["calculator"]) for r in rows} == {
        ("m-test", 1, 7, 1.0, True)}
    assert all(r["n_tokens"] <= 12 and r["finish_reason"] in {"stop", "length"} for r in rows)


def test_batch_size_changes_nothing_but_the_seed_changes_texts(tiny_model):
    model, tokenizer = tiny_model
    kwargs = dict(model_id="m-test", iteration=1, show_progress=False)
    small = sample_rationales(model, tokenizer, PROBLEMS,
                              SamplingConfig(n=2, temperature=1.0, max_new_tokens=10, batch_size=1), **kwargs)
    large = sample_rationales(model, tokenizer, PROBLEMS,
                              SamplingConfig(n=2, temperature=1.0, max_new_tokens=10, batch_size=8), **kwargs)
    assert small == large
    other = sample_rationales(model, tokenizer, PROBLEMS,
                              SamplingConfig(n=2, temperature=1.0, max_new_tokens=10, seed=1), **kwargs)
    assert [r["text"] for r in other] != [r["text"] for r in small]
    assert {r["sample_id"] for r in other}.isdisjoint(r["sample_id"] for r in small)


def test_row_seed_is_pinned():
    assert row_seed(0, "p-a", 0) == row_seed(0, "p-a", 0) != row_seed(0, "p-a", 1)
    assert 0 <= row_seed(0, "p-a", 0) < 2**63

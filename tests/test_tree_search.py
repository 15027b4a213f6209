"""MCTS-DPO: PUCT selection and backup on hand-made trees, the search on the tiny model, its rows and pairs."""

from __future__ import annotations

import math

import pytest
import torch
from test_step_generators import BIAS, NewlineBiased

from factory.generators.decoding import DecodingConfig, generate
from factory.generators.tree import (
    MCTSConfig,
    Node,
    _first_step,
    backup,
    commit,
    commit_path,
    expand,
    exhausted,
    node_value,
    path_text,
    priors,
    puct_score,
    rebuild,
    select_leaf,
    tree_search,
)
from factory.modeling import format_prompt
from factory.pairs import StepData
from factory.recipes.mcts_dpo import MCTSPairs, mcts_dpo_pairs
from factory.schema import from_rows
from factory.reasoning_steps import split_steps


def node(name: str, parent: Node | None, *, prior=None, value=None, terminal=False, index=0) -> Node:
    made = Node(name, parent, 0 if parent is None else parent.depth + 1, "" if parent is None else f"{name}\n",
                child_index=index,
                prior=prior, value=value, terminal=terminal)
    if parent is not None:
        parent.children.append(made)
    return made


def evaluated(made: Node, value: float) -> Node:
    made.value, made.visits, made.value_sum = value, 1, value
    backup(made.parent, [value]) if made.parent else None
    return made


# ---------------------------------------------------------------- selection and backup by hand


def test_puct_picks_the_highest_q_plus_exploration_bonus():
    root = node("root", None)
    a = evaluated(node("a", root, prior=0.6, index=0), 0.2)
    b = evaluated(node("b", root, prior=0.3, index=1), 0.5)
    c = evaluated(node("c", root, prior=0.1, index=2), 0.1)
    assert root.visits == 3 and root.q == pytest.approx(0.8 / 3)
    # Q + c * p * sqrt(3) / (1 + 1): a 0.2 + 0.5196, b 0.5 + 0.2598, c 0.1 + 0.0866 (c_puct = 1)
    scores = {n.node_id: puct_score(n, root.visits, 1.0) for n in (a, b, c)}
    assert scores["a"] == pytest.approx(0.2 + 0.6 * math.sqrt(3) / 2)
    assert select_leaf(root, 1.0) is b  # 0.7598 beats a's 0.7196
    assert select_leaf(root, 2.0) is a  # more exploration: the prior wins
    assert select_leaf(root, 0.0) is b  # pure exploitation: the highest Q


def test_selection_descends_to_an_unexpanded_node_and_skips_exhausted_subtrees():
    root = node("root", None)
    a = evaluated(node("a", root, prior=0.9, index=0), 0.9)
    b = evaluated(node("b", root, prior=0.1, index=1), -0.5)
    a1 = evaluated(node("a1", a, prior=1.0, terminal=True), 1.0)  # a's only child is terminal: a is exhausted
    assert exhausted(a) and not exhausted(b)
    assert select_leaf(root, 1.0) is b
    b.terminal = True
    assert exhausted(root) and select_leaf(root, 1.0) is None
    assert a1.visits == 1 and a.visits == 2 and root.visits == 3


def test_ties_go_to_the_earlier_child():
    root = node("root", None)
    first = evaluated(node("x", root, prior=0.5, index=0), 0.0)
    evaluated(node("y", root, prior=0.5, index=1), 0.0)
    assert select_leaf(root, 1.0) is first
    assert commit(root) is first and first.committed


def test_backup_adds_every_childs_value_and_visit_to_each_ancestor():
    root = node("root", None)
    a = evaluated(node("a", root, prior=1.0), 0.5)
    children = expand(a, [("s1\n", 3, -1.0, False), ("s2\n", 3, -2.0, False), ("s1\n", 3, -1.0, False)],
                      length_penalty=1.0, created=2)
    assert [c.step for c in children] == ["s1\n", "s2\n"] and [c.draws for c in children] == [2, 1]
    for child, value in zip(children, (1.0, -1.0)):
        child.value, child.visits, child.value_sum = value, 1, value
    backup(a, [1.0, -1.0])
    assert (a.visits, a.value_sum) == (3, 0.5) and (root.visits, root.value_sum) == (3, 0.5)
    assert path_text(children[0]) == "a\ns1\n"


def test_commit_prefers_visits_then_q_and_runs_through_exhausted_subtrees():
    root = node("root", None)
    a = evaluated(node("a", root, prior=0.5, index=0), 0.1)
    b = evaluated(node("b", root, prior=0.5, index=1), 0.9)
    evaluated(node("a1", a, prior=1.0), 0.3)
    assert commit(root) is a  # 2 visits beat 1, whatever b's Q
    # b's subtree is exhausted (one terminal child): committing there goes on down to the terminal node
    root2 = node("root2", None)
    only = evaluated(node("only", root2, prior=1.0), 0.2)
    end = evaluated(node("end", only, prior=1.0, terminal=True), 1.0)
    assert commit_path(root2) is end and only.committed and end.committed
    assert b.q == 0.9


def test_priors_are_a_softmax_of_length_normalised_log_likelihoods():
    # Same per-token likelihood, different lengths: with length_penalty 1 they tie, with 0 the short one wins.
    assert priors([-2.0, -4.0], [2, 4], 1.0) == pytest.approx([0.5, 0.5])
    short, long = priors([-2.0, -4.0], [2, 4], 0.0)
    assert short == pytest.approx(1 / (1 + math.exp(-2))) and short + long == pytest.approx(1.0)


def test_value_weighs_outcome_and_self_evaluation():
    config = MCTSConfig(outcome_weight=1.0, self_eval_weight=0.5)
    assert node_value(1.0, 0.9, config) == pytest.approx(1.0 + 0.5 * 0.8)
    assert node_value(None, 0.25, config) == pytest.approx(-0.25)
    assert node_value(-1.0, None, config) == -1.0


def test_the_first_step_of_a_generated_text():
    assert _first_step("Then 2+3=5", "step") == "Then 2+3=5\n"  # the decoder strips the trailing newline
    assert _first_step("\nThen 2+3=5\nNext", "step") == "\nThen 2+3=5\n"  # an empty line is not a step
    assert _first_step("#### 5", "stop") == "#### 5"


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="mcts.width must be an integer >= 1, got 0"):
        MCTSConfig(width=0)
    with pytest.raises(ValueError, match=r"mcts.self_eval_prompt must contain \{steps\}"):
        MCTSConfig(self_eval_prompt="{prompt} ok?")
    with pytest.raises(ValueError, match="cannot both be 0"):
        MCTSConfig(outcome_weight=0, self_eval_weight=0)


# ---------------------------------------------------------------- the decoder's step stop and log-probs


def test_decoder_stops_after_one_step_and_reports_its_log_probability(tiny_model):
    model, tokenizer = tiny_model
    prompt = format_prompt(tokenizer, "Tom has 3 boxes with 4 pens in each box. How many pens?")
    config = DecodingConfig(temperature=1.0, max_new_tokens=40, calculator=False)
    biased = NewlineBiased(model, tokenizer, BIAS)
    done = generate(biased, tokenizer, [prompt] * 3, [1, 2, 3], config, show_progress=False,
                    stop_at_step_end=True, logprobs=True)
    plain = generate(biased, tokenizer, [prompt] * 3, [1, 2, 3], config, show_progress=False)
    assert all(c.finish_reason == "step" for c in done)
    for step_only, whole in zip(done, plain):
        # The same noise writes the same tokens: the one-step text is where the whole text's first line ends.
        assert whole.text.startswith(step_only.text) and "\n" in whole.text[len(step_only.text):] + "\n"
        assert step_only.n_tokens < whole.n_tokens and whole.logprob is None
    # Greedy, one row, every forward pass recorded: the log-probability is the sum of each step's top log-prob.
    recorder = NewlineBiased(model, tokenizer, BIAS, record=True)
    (greedy,) = generate(recorder, tokenizer, [prompt], [0], DecodingConfig(max_new_tokens=40, calculator=False),
                         show_progress=False, stop_at_step_end=True, logprobs=True)
    assert len(recorder.log) == greedy.n_tokens  # the last token is chosen, never fed back
    expected = sum(logits[0].float().log_softmax(-1).max().item() for _, logits in recorder.log)
    assert greedy.logprob == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- the search on the tiny model

PROBLEMS = [
    {"problem_id": f"p-{i}", "question": q, "gold_answer": gold, "split": "answers"}
    for i, (q, gold) in enumerate([
        ("Mia has 12 marbles. She buys 7 more. How many marbles does Mia have?", "19"),
        ("Tom has 3 boxes with 4 pens in each box. How many pens?", "12"),
        ("Ann had 20 coins and gave away 5. Then she found 2. How many coins?", "17"),
    ])
]
SEARCH = MCTSConfig(width=3, simulations=2, max_depth=3, max_step_tokens=24, batch_size=8)


@pytest.fixture(scope="module")
def searched(tiny_model):
    model, tokenizer = tiny_model
    biased = NewlineBiased(model, tokenizer, BIAS)
    return tree_search(biased, tokenizer, PROBLEMS, SEARCH, model_id="m-test", iteration=1, show_progress=False)


def test_search_rows_are_a_valid_nodes_table_and_rebuild_visits_and_q(searched):
    rows, summary = searched
    table = from_rows(rows, "nodes")
    assert table.num_rows == summary["nodes"] > len(PROBLEMS)
    rebuilt = rebuild(rows)
    for row in rows:
        visits, q = rebuilt[row["node_id"]]
        assert visits == row["visits"] and (q is None) == (row["q"] is None)
        assert q is None or q == pytest.approx(row["q"], abs=1e-12)
    roots = [r for r in rows if r["parent_node_id"] is None]
    assert len(roots) == len(PROBLEMS) and all(r["value"] is None and r["committed"] for r in roots)
    # Every sampled candidate is a draw of some node (identical steps share one).
    assert summary["candidates"] == sum(r["draws"] for r in rows if r["parent_node_id"])
    assert summary["candidates"] == summary["expansions"] * SEARCH.width


def test_every_tree_commits_a_path_down_to_a_terminal_node_within_the_depth(searched):
    rows, _ = searched
    by_id = {r["node_id"]: r for r in rows}
    for root in (r for r in rows if r["parent_node_id"] is None):
        path, current = [root], root
        while True:
            nxt = [r for r in rows if r["parent_node_id"] == current["node_id"] and r["committed"]]
            if not nxt:
                break
            assert len(nxt) == 1
            current = nxt[0]
            path.append(current)
        assert current["terminal"] and current["depth"] <= SEARCH.max_depth
        assert current["outcome"] in (1.0, -1.0)
    terminals = [r for r in rows if r["terminal"]]
    assert all(r["outcome"] in (1.0, -1.0) for r in terminals)
    assert all(by_id[r["parent_node_id"]]["depth"] + 1 == r["depth"] for r in rows if r["parent_node_id"])
    non_terminal_steps = [r["step"] for r in rows if r["parent_node_id"] and not r["terminal"]]
    assert non_terminal_steps and all(s.endswith("\n") and len(split_steps(s)) == 1 for s in non_terminal_steps)


def test_search_is_deterministic(tiny_model, searched):
    model, tokenizer = tiny_model
    again, _ = tree_search(NewlineBiased(model, tokenizer, BIAS), tokenizer, PROBLEMS, SEARCH, model_id="m-test",
                           iteration=1, show_progress=False)
    assert [r["node_id"] for r in again] == [r["node_id"] for r in searched[0]]
    assert [r["visits"] for r in again] == [r["visits"] for r in searched[0]]


def test_problems_need_a_gold_answer(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="problem 'p-x' has no gold answer"):
        tree_search(model, tokenizer, [{"problem_id": "p-x", "question": "?", "gold_answer": None}], SEARCH,
                    model_id="m-test", iteration=1, show_progress=False)


# ---------------------------------------------------------------- pairs from trees


def tree_rows(children_q: list[float | None], *, committed: bool = True, terminal: bool = True) -> list[dict]:
    def row(node_id, parent, depth, step, q, index=0, is_committed=False, terminal=False):
        return {"node_id": node_id, "parent_node_id": parent, "problem_id": "p-0", "iteration": 1,
                "model_id": "m-test", "depth": depth, "child_index": index, "created": depth, "step": step,
                "draws": 1, "n_tokens": 5, "logprob": -1.0, "prior": 0.5, "terminal": terminal, "answer": None,
                "outcome": None, "self_eval": 0.5, "value": None if parent is None else q, "visits": 1,
                "q": q, "committed": is_committed}

    rows = [row("n-root", None, 0, "", 0.0, is_committed=True),
            row("n-a", "n-root", 1, "First 1+1=2.\n", 0.0, is_committed=committed)]
    rows += [row(f"n-a{i}", "n-a", 2, f"Then step {i}.\n", q, index=i, terminal=terminal)
             for i, q in enumerate(children_q)]
    return rows


def make_pairs(rows, margin=0.2, min_terminals=1):
    return mcts_dpo_pairs(PROBLEMS, [], [], prompt_for=lambda q: f"Q: {q}\nA:\n", iteration=1,
                          config=MCTSPairs(min_q_margin=margin, min_terminals=min_terminals),
                          steps=StepData(nodes=rows, recipe="mcts_dpo"))


def test_pairs_take_the_best_and_worst_sibling_under_committed_nodes():
    pairs, summary = make_pairs(tree_rows([0.1, 0.9, -0.4, None]))
    (pair,) = [p for p in pairs if p["prefix_steps"] == 1]
    assert pair["chosen"] == "Then step 1.\n" and pair["rejected"] == "Then step 2.\n"
    assert pair["prompt"] == f"Q: {PROBLEMS[0]['question']}\nA:\nFirst 1+1=2.\n"
    assert (pair["chosen_node_id"], pair["rejected_node_id"]) == ("n-a1", "n-a2")
    assert pair["chosen_sample_id"] is None and summary["pairs_with_gold"] == 0
    assert summary["skipped"]["no_siblings"] == 1  # the root has one child
    from_rows(pairs, "pairs")


def test_pairs_need_a_margin_and_a_committed_parent():
    assert make_pairs(tree_rows([0.5, 0.6]))[1]["skipped"]["no_q_margin"] == 1
    assert make_pairs(tree_rows([0.5, 0.6]), margin=0.05)[1]["pairs"] == 1
    assert make_pairs(tree_rows([0.1, 0.9], committed=False))[1]["pairs"] == 0


def test_pairs_need_siblings_whose_q_rests_on_gold_outcomes():
    # Children with no terminal node below them have a Q of self-evaluation alone: not paired by default.
    assert make_pairs(tree_rows([0.1, 0.9], terminal=False))[1]["skipped"]["ungrounded"] == 1
    assert make_pairs(tree_rows([0.1, 0.9], terminal=False), min_terminals=0)[1]["pairs"] == 1  # the paper's rule
    with pytest.raises(ValueError, match="min_terminals must be an integer >= 0"):
        MCTSPairs(min_terminals=-1)


def test_pairs_refuse_step_data_of_another_recipe():
    with pytest.raises(ValueError, match="made for recipe 'scdpo'"):
        mcts_dpo_pairs(PROBLEMS, [], [], prompt_for=str, iteration=1, config=MCTSPairs(),
                       steps=StepData(recipe="scdpo"))


def test_audit_checks_pass_on_a_search_and_catch_a_tampered_tree(searched, tmp_path):
    from factory.audit import catalog, load_checks, run_checks
    from factory.lineage import write_table

    rows, _ = searched
    pairs, _ = mcts_dpo_pairs(PROBLEMS, [], [], prompt_for=lambda q: q, iteration=1,
                              config=MCTSPairs(min_q_margin=0.0, min_terminals=0),
                              steps=StepData(nodes=rows, recipe="mcts_dpo"))
    assert pairs
    checks = [c for c in load_checks("audits") if c.name in ("tree_values", "tree_pairs")]
    assert len(checks) == 2

    def results(nodes, pair_rows):
        write_table(from_rows(nodes, "nodes"), tmp_path / "data/iter_1/steps/nodes.parquet", kind="nodes",
                    stage="steps")
        write_table(from_rows(pair_rows, "pairs"), tmp_path / "data/iter_1/pairs.parquet", kind="pairs",
                    stage="pairs")
        return {r.check.name: r for r in run_checks(catalog(tmp_path), checks)}

    assert all(r.passed for r in results(rows, pairs).values())
    tampered = [dict(r) for r in rows]
    inner = next(r for r in tampered if r["parent_node_id"] and r["visits"] > 1)
    inner["visits"] += 1
    swapped = [dict(pairs[0], chosen=pairs[0]["rejected"], rejected=pairs[0]["chosen"])]
    found = results(tampered, swapped)
    # The node's own visits no longer add up, nor do its parent's children's.
    assert {row[0] for row in found["tree_values"].rows} == {inner["node_id"], inner["parent_node_id"]}
    assert found["tree_pairs"].rows[0][-1] == "text differs from the nodes' steps"


def test_lineage_of_a_tree_pair_walks_its_nodes_up_to_the_question(searched, tmp_path):
    from factory.lineage import write_table
    from factory.trace import trace

    rows, _ = searched
    pairs, _ = mcts_dpo_pairs(PROBLEMS, [], [], prompt_for=lambda q: q, iteration=1,
                              config=MCTSPairs(min_q_margin=0.0, min_terminals=0),
                              steps=StepData(nodes=rows, recipe="mcts_dpo"))
    write_table(from_rows([dict(p, source="test") for p in PROBLEMS], "problems"), tmp_path / "data/problems.parquet",
                kind="problems", stage="problems")
    write_table(from_rows(rows, "nodes"), tmp_path / "data/iter_1/steps/nodes.parquet", kind="nodes", stage="steps",
                model_id="m-test")
    write_table(from_rows(pairs, "pairs"), tmp_path / "data/iter_1/pairs.parquet", kind="pairs", stage="pairs")
    deepest = max(pairs, key=lambda p: p["prefix_steps"])
    tree = trace(deepest["pair_id"], tmp_path)
    assert [p.kind for p in tree.parents] == ["problem", "chosen", "rejected", "file"]
    chosen = tree.parents[1]
    assert chosen.id == deepest["chosen_node_id"] and chosen.facts["step"] == deepest["chosen"]
    chain, node = [], chosen
    while node.parents and node.parents[0].kind == "parent node":
        node = node.parents[0]
        chain.append(node)
    assert chain[-1].facts["depth"] == 0 and [p.kind for p in chain[-1].parents] == ["model", "file"]
    assert trace(chain[-1].id, tmp_path).facts["step"] == ""

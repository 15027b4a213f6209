"""MCTS-DPO (Xie et al., 2024): step-level preferences from Monte Carlo tree search.

Paper: Yuxi Xie et al., "Monte Carlo Tree Search Boosts Reasoning via
Iterative Preference Learning", 2024.

- Set-up: 1 sample per problem (`sample.n`): it reads no samples, and the
  problems it searches are the sampled ones; the budget goes to its trees.
- Step data (`steps@k`, `make_steps`): a search tree over steps for each of
  the first `mcts.problems` (350) problems the iteration sampled, all trees
  advanced together (`factory.generators.tree`). A node is a step prefix. Each
  round selects a leaf per tree by PUCT, Q + c p sqrt(N(parent)) / (1 + N),
  with p the softmax over siblings of the step's log-likelihood /
  n_tokens^lambda; expands it into `mcts.width` (4) candidate next steps
  sampled at T = 1 in one batched decode (identical candidates are one
  child); evaluates each child: value = `outcome_weight` (+-1 by the gold
  answer at a terminal node) + `self_eval_weight` (2 P(yes) - 1), P(yes) the
  policy's own answer to `mcts.self_eval_prompt`; and backs the values up.
  After `mcts.simulations` (4) rounds the search commits to the most visited
  child and re-roots, down to a terminal node. Every node is a `nodes` row.
- Pairs: under each node of the committed path, the highest-Q child over the
  lowest-Q one when their Q differs by at least `pairs.mcts_dpo.min_q_margin`
  (0.2); prompt = question + the shared steps, so DPO's loss falls on the
  diverging step. Judged by the search's values, not by gold directly.
- Training: weighted DPO + NLL from the previous model, as `dpo`: on-policy,
  iterated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from factory.ids import content_id
from factory.pairs import PairsConfig, StepData, summarize
from factory.preconditions import Check, PreconditionsConfig, at_least
from factory.recipes.base import PairRule, Recipe, register
from factory.recipes.baselines import train_dpo
from factory.reasoning_steps import split_steps

NO_SIBLINGS = "no_siblings"  # a committed node with fewer than two distinct children
NO_Q_MARGIN = "no_q_margin"  # its best and worst children's Q differ by less than min_q_margin
UNGROUNDED = "ungrounded"  # fewer than two children with min_terminals terminal nodes in their subtree


@dataclass(frozen=True, kw_only=True)
class MCTSPairs(PairsConfig):
    """params `pairs` plus `pairs.mcts_dpo`."""

    rule: ClassVar[str] = "mcts_dpo"
    section: ClassVar[str | None] = "mcts_dpo"
    # The best sibling's Q must exceed the worst's by at least this much.
    min_q_margin: float = 0.2
    # Siblings whose subtree holds fewer terminal nodes (judged against gold) than this are not paired;
    # 0 is the paper's rule, for a policy whose self-evaluation is informative.
    min_terminals: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.min_q_margin >= 0.0:
            raise ValueError(f"min_q_margin must be >= 0, got {self.min_q_margin!r}")
        if self.min_terminals < 0:
            raise ValueError(f"min_terminals must be an integer >= 0, got {self.min_terminals!r}")


def make_steps(inputs):
    """One search tree per problem the iteration sampled, the first `mcts.problems` with a gold answer."""
    from factory.generators.tree import MCTSConfig
    from factory.params import as_dict
    from factory.preconditions import self_eval_signal
    from factory.step_stage import StepTables

    config = inputs.section("mcts", MCTSConfig)
    nodes, search = _search(inputs, config)
    summary = {"search": search, "generated": {"rows": len(nodes), "tokens": search["generated_tokens"],
                                               "correct": search["correct_terminal_nodes"],
                                               "parents": search["expansions"]},
               "self_eval": self_eval_signal(nodes)}  # the precondition: does P(yes) tell right from wrong?
    return StepTables(nodes=nodes, params={"mcts": as_dict(config)}, summary=summary)


def _search(inputs, config) -> tuple[list, dict]:
    """MCTS-DPO's trees: one per problem the iteration sampled, the first `config.problems` with a gold answer.

    The problems are cut into shards of `config.shard_size` trees, run where params `executor` says
    (`StepShards`): a shard's trees advance together, in one worker.
    """
    from dataclasses import asdict
    from functools import partial

    from factory.generators.tree import merge_searches, search_shard
    from factory.lineage import read_table
    from factory.step_stage import StepShards

    sampled = set(read_table(inputs.labels_path, "labels").column("problem_id").to_pylist())
    problems = [p for p in read_table(inputs.problems_path, "problems").to_pylist()
                if p["problem_id"] in sampled and p["gold_answer"] is not None]
    if config.problems:
        problems = problems[: config.problems]
    shards = StepShards(inputs).run(
        problems, partial(search_shard, config=config, model_id=inputs.policy_id, iteration=inputs.iteration),
        shard_size=config.shard_size, key=("mcts", asdict(config)), desc="tree search", kind=None)
    return merge_searches(shards)


def mcts_dpo_pairs(problems: list[dict], samples: list[dict], labels: list[dict], *, prompt_for: Callable[[str], str],
                   iteration: int, config: MCTSPairs, steps: StepData | None = None) -> tuple[list[dict], dict]:
    """Tree-search step pairs (MCTS-DPO, Xie et al., 2024): at each depth, the best and worst sibling.

    For every node on the path each search committed to (`committed`, the
    question included) with two or more visited children whose subtrees hold
    at least `config.min_terminals` terminal nodes (so their Q rests on gold
    outcomes, not on self-evaluation alone): chosen = the child with the
    highest Q, rejected = the one with the lowest (ties: earlier child), kept
    when their Q differs by at least `config.min_q_margin`.
    prompt = question + the node's steps (`prefix_steps` counts them), so the
    loss falls on the diverging step alone. `samples` and `labels` are not
    read: the trees are the data.
    """
    steps = steps or StepData()
    steps.check_made_for(config.rule)
    question = {p["problem_id"]: p["question"] for p in problems}
    by_id = {node["node_id"]: node for node in steps.nodes}
    children: dict[str, list[dict]] = {}
    for node in steps.nodes:
        if node["parent_node_id"] is not None:
            if node["parent_node_id"] not in by_id:
                raise ValueError(f"step nodes: node {node['node_id']!r} has parent {node['parent_node_id']!r}, "
                                 "which is not in the file")
            children.setdefault(node["parent_node_id"], []).append(node)

    def path(node: dict) -> str:
        parts = []
        while node is not None:
            parts.append(node["step"])
            node = by_id.get(node["parent_node_id"]) if node["parent_node_id"] else None
        return "".join(reversed(parts))

    terminals: dict[str, int] = {}  # terminal nodes in each node's subtree, children before parents
    for node in sorted(steps.nodes, key=lambda n: -n["depth"]):
        terminals[node["node_id"]] = int(node["terminal"]) + sum(terminals[c["node_id"]]
                                                                 for c in children.get(node["node_id"], []))
    rows: list[dict] = []
    skipped = dict.fromkeys((NO_SIBLINGS, UNGROUNDED, NO_Q_MARGIN), 0)
    margins: list[float] = []
    for node in steps.nodes:
        if not node["committed"] or node["terminal"]:
            continue
        visited = sorted((c for c in children.get(node["node_id"], []) if c["q"] is not None),
                         key=lambda c: c["child_index"])
        if len(visited) < 2:
            skipped[NO_SIBLINGS] += 1
            continue
        visited = [c for c in visited if terminals[c["node_id"]] >= config.min_terminals]
        if len(visited) < 2:
            skipped[UNGROUNDED] += 1
            continue
        best = max(visited, key=lambda c: (c["q"], -c["child_index"]))
        worst = min(visited, key=lambda c: (c["q"], c["child_index"]))
        margin = best["q"] - worst["q"]
        if margin < config.min_q_margin or best is worst:
            skipped[NO_Q_MARGIN] += 1
            continue
        if node["problem_id"] not in question:
            raise ValueError(f"step nodes: node {node['node_id']!r} has problem {node['problem_id']!r}, "
                             "which is not in the problems file")
        prefix = path(node)
        margins.append(margin)
        rows.append({
            "pair_id": content_id("pair", config.rule, iteration, node["problem_id"], best["node_id"],
                                  worst["node_id"]),
            "problem_id": node["problem_id"],
            "iteration": iteration,
            "recipe": config.rule,
            "prompt": prompt_for(question[node["problem_id"]]) + prefix,
            "chosen": best["step"],
            "rejected": worst["step"],
            "chosen_sample_id": None,
            "rejected_sample_id": None,
            "weight": 1.0,
            "prefix_steps": len(split_steps(prefix)),
            "chosen_node_id": best["node_id"],
            "rejected_node_id": worst["node_id"],
        })
    summary = summarize(config, iteration, samples, rows, skipped)
    summary |= {"trees": len({n["problem_id"] for n in steps.nodes}),
                "mean_q_margin": round(sum(margins) / len(margins), 4) if margins else None,
                "pairs_by_prefix_steps": {str(steps): count for steps, count
                                          in sorted(Counter(r["prefix_steps"] for r in rows).items())},
                "terminal_chosen": sum(by_id[r["chosen_node_id"]]["terminal"] for r in rows),
                "correct_chosen": sum(by_id[r["chosen_node_id"]]["outcome"] == 1 for r in rows),
                "wrong_rejected": sum(by_id[r["rejected_node_id"]]["outcome"] == -1 for r in rows)}
    return rows, summary


def self_evaluation_informative(signals, config: PreconditionsConfig) -> Check:
    """Node values weigh the policy's own P(yes): it must tell gold-correct from gold-wrong terminal nodes."""
    return at_least(signals, "self_eval_auc", config.min_self_eval_auc,
                    why="self-evaluation P(yes) is part of every node's value; at AUC 0.5 it is noise")


RECIPE = register(Recipe(
    module=__name__, name="mcts_dpo", paper="Xie et al., 2024", train=train_dpo, make_steps=make_steps,
    pairs=PairRule(make=mcts_dpo_pairs, settings=MCTSPairs, gold_judged=False), setup={"sample.n": 1},
    precondition=self_evaluation_informative,
    summary="DPO on step pairs from tree search: the best sibling step over the worst by Q"))

"""Monte Carlo tree search over reasoning steps (MCTS-DPO, Xie et al. 2024).

A node is a step prefix: the root is the question, each child one more step
(a non-empty line, `factory.reasoning_steps`; the `#### N` line is a node of its own).
One search round, for every unfinished tree at once:

1. **select**: from the tree's current root, descend by PUCT,
   Q(a) + c_puct * p(a) * sqrt(N(parent)) / (1 + N(a)), into children that
   are not exhausted, down to a node not expanded yet;
2. **expand**: sample `width` candidate next steps from it at `temperature`
   (one batched `generate` call for every tree, stopping each row at the end
   of its first line); identical candidates are one child (`draws` counts
   them); p is the softmax over siblings of the step's log-likelihood divided
   by n_tokens ** `length_penalty`;
3. **evaluate** each new child: value = outcome_weight * outcome +
   self_eval_weight * (2 * self_eval - 1), where outcome is +1 or -1 by the
   gold answer at a terminal node (a final-answer line, end of text, or
   `max_depth`) and 0 elsewhere, and self_eval is the model's own
   P(yes) / (P(yes) + P(no)) after an evaluation prompt (`self_eval_prompt`);
4. **back up**: every ancestor, up to the first root, adds each child's value
   and one visit per child.

So a node's visits are its own evaluation (none for the first root) plus its
children's visits, and Q is the mean value of its subtree: `rebuild` recomputes
both from the rows' `value` alone. After `simulations` rounds the search
commits to the current root's most visited child (ties: higher Q, earlier
child) and re-roots there; a tree ends when it commits to a terminal node or
its root's subtree is exhausted (then it commits on down to a terminal node:
there is nothing left to search). Every node is a `nodes`
row (`factory.schema.NODES`); `committed` marks the path the search chose.

Where we depart from the paper: a terminal node is never re-selected (its
value is exact, so a tree whose leaves are all terminal stops rather than
re-visit them), and backups run to the first root so the visit identity holds
for every node of the tree, not only below the current root.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from factory.generators.decoding import DecodingConfig, generate
from factory.ids import content_hash, content_id
from factory.labelers.gold import gold_labels
from factory.modeling import format_prompt

__all__ = ["MCTSConfig", "Node", "backup", "commit", "commit_path", "expand", "exhausted", "merge_searches",
           "path_text", "priors", "puct_score", "rebuild", "search_shard", "select_leaf", "tree_search"]


@dataclass(frozen=True, kw_only=True)
class MCTSConfig:
    """Tree search (params.yaml `mcts`), for recipe `mcts_dpo`."""

    problems: int = 350  # trees per iteration: the first problems of the iteration's sampled ones (0: all)
    width: int = 4  # candidate next steps sampled per expansion
    temperature: float = 1.0
    top_p: float = 1.0
    simulations: int = 4  # select-expand-evaluate-backup rounds before each commit
    max_depth: int = 6  # nodes on a path below the question; a node this deep is terminal
    c_puct: float = 1.0
    length_penalty: float = 1.0  # lambda: the prior uses log p(step) / n_tokens ** lambda
    outcome_weight: float = 1.0
    self_eval_weight: float = 0.5  # 0: no self-evaluation pass
    self_eval_prompt: str = "{prompt}{steps}\nIs the last step correct? Answer Yes or No:"
    self_eval_yes: str = " Yes"
    self_eval_no: str = " No"
    max_step_tokens: int = 96  # a step longer than this ends its path ("length")
    calculator: bool = True
    batch_size: int = 64
    shard_size: int = 64  # trees per checkpointed shard: a shard's trees advance together, shards side by side
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"mcts.{name} {why}, got {getattr(self, name)!r}")

        for name in ("width", "simulations", "max_depth", "max_step_tokens", "batch_size", "shard_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        if isinstance(self.problems, bool) or not isinstance(self.problems, int) or self.problems < 0:
            bad("problems", "must be an integer >= 0")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 (expansion samples)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        for name in ("c_puct", "length_penalty", "outcome_weight", "self_eval_weight"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if self.outcome_weight == 0 and self.self_eval_weight == 0:
            bad("outcome_weight", "and self_eval_weight cannot both be 0 (every value would be 0)")
        for key in ("{prompt}", "{steps}"):
            if key not in self.self_eval_prompt:
                bad("self_eval_prompt", f"must contain {key}")
        if not self.self_eval_yes or not self.self_eval_no or self.self_eval_yes == self.self_eval_no:
            bad("self_eval_yes", "and self_eval_no must be two different non-empty strings")

    def search_params(self) -> dict:
        """What changes a tree (hashed into its root's node_id)."""
        return {name: getattr(self, name) for name in (
            "width", "temperature", "top_p", "simulations", "max_depth", "c_puct", "length_penalty",
            "outcome_weight", "self_eval_weight", "self_eval_prompt", "self_eval_yes", "self_eval_no",
            "max_step_tokens", "calculator")}

    def decoding(self) -> DecodingConfig:
        return DecodingConfig(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_step_tokens,
                              calculator=self.calculator, batch_size=self.batch_size)


@dataclass(eq=False)
class Node:
    """One step prefix of a search tree. `value` is None only for the first root (nothing to evaluate)."""

    node_id: str
    parent: Node | None
    depth: int
    step: str = ""  # this node's step text; a non-terminal step ends with its newline
    child_index: int = 0
    created: int = 0  # the search round that made it (0: the first root)
    draws: int = 1  # candidates of the parent's expansion that wrote this step
    n_tokens: int = 0
    logprob: float | None = None
    prior: float | None = None
    terminal: bool = False
    answer: str | None = None
    outcome: float | None = None  # +1 / -1 by the gold answer, terminal nodes only
    self_eval: float | None = None
    value: float | None = None
    visits: int = 0
    value_sum: float = 0.0
    committed: bool = False
    children: list[Node] = field(default_factory=list)

    @property
    def expanded(self) -> bool:
        return bool(self.children)  # an expansion makes at least one child (width >= 1)

    @property
    def q(self) -> float | None:
        return self.value_sum / self.visits if self.visits else None


def path_text(node: Node) -> str:
    """The steps from the first root down to `node`, concatenated: the text after the question's prompt."""
    parts = []
    while node is not None:
        parts.append(node.step)
        node = node.parent
    return "".join(reversed(parts))


def exhausted(node: Node) -> bool:
    """Nothing left to search below `node`: it is terminal, or expanded with every child exhausted."""
    return node.terminal or (node.expanded and all(exhausted(child) for child in node.children))


def puct_score(child: Node, parent_visits: int, c_puct: float) -> float:
    """PUCT: Q + c_puct * prior * sqrt(N(parent)) / (1 + N(child)); an unvisited child's Q counts as 0."""
    return (child.q or 0.0) + c_puct * (child.prior or 0.0) * math.sqrt(parent_visits) / (1 + child.visits)


def select_leaf(root: Node, c_puct: float) -> Node | None:
    """Descend from `root` by PUCT through children that are not exhausted, to a node not yet expanded.

    Ties go to the earlier child. None when the whole subtree is exhausted.
    """
    node = root
    if exhausted(node):
        return None
    while node.expanded:
        open_children = [child for child in node.children if not exhausted(child)]
        node = max(open_children, key=lambda child: (puct_score(child, node.visits, c_puct), -child.child_index))
    return node


def priors(logprobs: list[float], n_tokens: list[int], length_penalty: float) -> list[float]:
    """Siblings' PUCT priors: softmax of log p(step) / n_tokens ** length_penalty (the length-normalised likelihood)."""
    scaled = [lp / max(n, 1) ** length_penalty for lp, n in zip(logprobs, n_tokens)]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def backup(node: Node, values: list[float]) -> None:
    """Add `values` (one per new child of `node`) to `node` and every ancestor: one visit each."""
    while node is not None:
        node.visits += len(values)
        node.value_sum += sum(values)
        node = node.parent


def commit(root: Node) -> Node | None:
    """The child the search commits to: most visited, then higher Q, then earlier. None when there is none."""
    if not root.children:
        return None
    chosen = max(root.children, key=lambda c: (c.visits, c.q if c.q is not None else -math.inf, -c.child_index))
    chosen.committed = True
    return chosen


def commit_path(root: Node) -> Node:
    """Commit once from `root`, then on through exhausted subtrees (nothing left to search there) to a terminal
    node; returns the new root (`root` itself when it has no children)."""
    node = commit(root) or root
    while not node.terminal and node.expanded and exhausted(node):
        node = commit(node)
    return node


def expand(parent: Node, candidates: list[tuple[str, int, float, bool]], *, length_penalty: float,
           created: int) -> list[Node]:
    """Make `parent`'s children from (step, n_tokens, logprob, terminal) candidates; identical steps are one child."""
    by_step: dict[str, Node] = {}
    for step, n_tokens, logprob, terminal in candidates:
        if step in by_step:
            by_step[step].draws += 1
            continue
        by_step[step] = Node(content_id("node", parent.node_id, step), parent, parent.depth + 1, step,
                             child_index=len(by_step), created=created, n_tokens=n_tokens, logprob=logprob,
                             terminal=terminal)
    children = list(by_step.values())
    for child, prior in zip(children, priors([c.logprob for c in children], [c.n_tokens for c in children],
                                            length_penalty)):
        child.prior = prior
    parent.children = children
    return children


def node_value(outcome: float | None, self_eval: float | None, config: MCTSConfig) -> float:
    """outcome_weight * outcome (0 off terminals) + self_eval_weight * (2 * self_eval - 1) (0 without one)."""
    value = config.outcome_weight * (outcome or 0.0)
    if self_eval is not None:
        value += config.self_eval_weight * (2 * self_eval - 1)
    return value


def rebuild(rows: list[dict]) -> dict[str, tuple[int, float | None]]:
    """(visits, Q) of every node, recomputed from the rows' parent links and `value` alone.

    visits = 1 for its own evaluation (none for a null value) + the children's
    visits; Q = the mean value over the node and its evaluated descendants.
    """
    children: dict[str | None, list[dict]] = {}
    for row in rows:
        children.setdefault(row["parent_node_id"], []).append(row)
    totals: dict[str, tuple[int, float]] = {}

    def total(row: dict) -> tuple[int, float]:  # iterative post-order: trees can be deep
        stack, order = [row], []
        while stack:
            current = stack.pop()
            order.append(current)
            stack.extend(children.get(current["node_id"], []))
        for current in reversed(order):
            own = current["value"] is not None
            visits = int(own) + sum(totals[c["node_id"]][0] for c in children.get(current["node_id"], []))
            value_sum = (current["value"] or 0.0) + sum(totals[c["node_id"]][1]
                                                        for c in children.get(current["node_id"], []))
            totals[current["node_id"]] = (visits, value_sum)
        return totals[row["node_id"]]

    for root in children.get(None, []):
        total(root)
    return {node_id: (visits, value_sum / visits if visits else None) for node_id, (visits, value_sum) in totals.items()}


def _first_step(text: str, finish_reason: str) -> str:
    """A generated step through the newline ending its first non-empty line (text a token carried past it is
    left for the child to write); a final-answer line, EOS or length stop keeps the text as it is."""
    if finish_reason != "step":
        return text
    start = 0
    while (end := text.find("\n", start)) >= 0:
        if text[start:end].strip():
            return text[: end + 1]
        start = end + 1
    return text + "\n"  # the decoder strips trailing newlines


def self_evaluate(model, tokenizer, texts: list[str], config: MCTSConfig) -> tuple[list[float], int]:
    """P(yes) / (P(yes) + P(no)) after each evaluation prompt, batched: the first token where the answers differ.

    Also returns the prompt tokens scored.
    """
    import torch

    yes_ids = tokenizer.encode(config.self_eval_yes, add_special_tokens=False)
    no_ids = tokenizer.encode(config.self_eval_no, add_special_tokens=False)
    shared = 0  # tokens both answers start with (" " in a small vocabulary) join the prompt
    while shared < min(len(yes_ids), len(no_ids)) and yes_ids[shared] == no_ids[shared]:
        shared += 1
    if shared == min(len(yes_ids), len(no_ids)):
        raise ValueError(f"mcts.self_eval_yes {config.self_eval_yes!r} and self_eval_no {config.self_eval_no!r} "
                         "do not differ in any token: pick other answers")
    yes, no = yes_ids[shared], no_ids[shared]
    encoded = [tokenizer.encode(t, add_special_tokens=False) + yes_ids[:shared] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [0.0] * len(texts)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every row's last position is its own last token
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]):] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                           position_ids=positions.to(model.device), logits_to_keep=1).logits[:, -1, :].float()
            pair = logits[:, [yes, no]].softmax(-1)[:, 0].tolist()
            for i, p in zip(chunk, pair):
                scores[i] = p
    model.train(was_training)
    return scores, sum(map(len, encoded))


def expansion_seed(seed: int, node_id: str, index: int) -> int:
    """A 63-bit noise seed for candidate `index` of a node's expansion, independent of batching."""
    return int(content_hash(seed, node_id, index), 16) & (2**63 - 1)


@dataclass
class _Tree:
    problem: dict
    prompt: str
    first_root: Node
    root: Node
    done: bool = False


def tree_search(model, tokenizer, problems: list[dict], config: MCTSConfig, *, model_id: str, iteration: int,
                show_progress: bool = True) -> tuple[list[dict], dict]:
    """Search one tree per problem (problems need a gold answer), all advanced together; `nodes` rows and a summary.

    Rows come tree by tree (problems' order), each in creation order (round,
    then parent, then child index). The summary counts generated tokens
    (every candidate step), self-evaluation prompt tokens, and how often the
    committed path reaches the gold answer.
    """
    from tqdm.auto import tqdm

    trees = []
    for problem in problems:
        if problem.get("gold_answer") is None:
            raise ValueError(f"problem {problem['problem_id']!r} has no gold answer: tree search judges terminal "
                             "nodes against it")
        root = Node(content_id("node", problem["problem_id"], model_id, config.search_params(), config.seed), None, 0)
        root.committed = True
        trees.append(_Tree(problem, format_prompt(tokenizer, problem["question"]), root, root))
    decoding = config.decoding()
    counts = {"generated_tokens": 0, "self_eval_tokens": 0, "candidates": 0, "expansions": 0}
    rounds = 0
    with tqdm(total=config.max_depth * config.simulations, desc="tree search", unit="round",
              disable=not show_progress) as bar:
        for _ in range(config.max_depth):
            for _ in range(config.simulations):
                leaves = [(tree, leaf) for tree in trees if not tree.done
                          for leaf in [select_leaf(tree.root, config.c_puct)] if leaf is not None]
                bar.update(1)
                if not leaves:
                    break
                rounds += 1
                _expand_and_evaluate(model, tokenizer, leaves, config, decoding, rounds, counts)
            for tree in trees:
                if not tree.done:
                    tree.root = commit_path(tree.root)
                    tree.done = tree.root.terminal
            if all(tree.done for tree in trees):
                break
        bar.total = bar.n  # trees that all end early leave rounds unused
        bar.refresh()
    rows = [row for tree in trees for row in _rows(tree, model_id=model_id, iteration=iteration)]
    finals = [tree.root for tree in trees]  # each tree's root ends at the end of its committed path
    summary = {"trees": len(trees), "nodes": len(rows), "rounds": rounds, **counts,
               "terminal_nodes": sum(r["terminal"] for r in rows),
               "correct_terminal_nodes": sum(r["outcome"] == 1 for r in rows),
               "committed_correct": sum(leaf.outcome == 1 for leaf in finals),
               "committed_unfinished": sum(not leaf.terminal for leaf in finals)}
    return rows, summary


def search_shard(loaded, problems: list[dict], *, config: MCTSConfig, model_id: str, iteration: int) -> list[dict]:
    """One shard's trees (`tree_search` with the (model, tokenizer) `loaded`) as one row: its `nodes` rows and its
    summary, as JSON (exact for every value they hold). What a worker runs."""
    model, tokenizer = loaded
    rows, summary = tree_search(model, tokenizer, problems, config, model_id=model_id, iteration=iteration,
                                show_progress=False)
    return [{"nodes": json.dumps(rows), "summary": json.dumps(summary)}]


def merge_searches(shards: list[dict]) -> tuple[list[dict], dict]:
    """The `nodes` rows and summary of all `search_shard` rows: rows in shard order, counts added up, `rounds`
    the most any shard ran (shards search side by side)."""
    rows = [row for shard in shards for row in json.loads(shard["nodes"])]
    summaries = [json.loads(shard["summary"]) for shard in shards]
    if not summaries:
        return rows, tree_search(None, None, [], MCTSConfig(), model_id="", iteration=0, show_progress=False)[1]
    return rows, {key: max(s[key] for s in summaries) if key == "rounds" else sum(s[key] for s in summaries)
                  for key in summaries[0]}


def _expand_and_evaluate(model, tokenizer, leaves: list[tuple[_Tree, Node]], config: MCTSConfig, decoding,
                         round_index: int, counts: dict) -> None:
    requests = [(tree, leaf, i) for tree, leaf in leaves for i in range(config.width)]
    prompts = [tree.prompt + path_text(leaf) for tree, leaf, _ in requests]
    seeds = [expansion_seed(config.seed, leaf.node_id, i) for _, leaf, i in requests]
    completions = generate(model, tokenizer, prompts, seeds, decoding, desc=f"expand round {round_index}",
                           show_progress=False, stop_at_step_end=True, logprobs=True)
    counts["generated_tokens"] += sum(c.n_tokens for c in completions)
    counts["candidates"] += len(completions)
    counts["expansions"] += len(leaves)
    by_leaf: dict[int, list] = {}
    for (_, leaf, _), completion in zip(requests, completions):
        terminal = completion.finish_reason != "step" or leaf.depth + 1 >= config.max_depth
        by_leaf.setdefault(id(leaf), []).append(
            (_first_step(completion.text, completion.finish_reason), completion.n_tokens, completion.logprob,
             terminal))
    new: list[tuple[_Tree, Node, list[Node]]] = []
    for tree, leaf in leaves:
        children = expand(leaf, by_leaf[id(leaf)], length_penalty=config.length_penalty, created=round_index)
        new.append((tree, leaf, children))
    flat = [(tree, child) for tree, _, children in new for child in children]
    terminals = [(tree, child) for tree, child in flat if child.terminal]
    verdicts = gold_labels([path_text(child) for _, child in terminals],
                           [tree.problem["gold_answer"] for tree, _ in terminals])
    for (_, child), answer, correct in zip(terminals, verdicts["answer"], verdicts["correct"]):
        child.answer, child.outcome = answer, 1.0 if correct else -1.0
    if config.self_eval_weight > 0:
        texts = [config.self_eval_prompt.format(prompt=tree.prompt, steps=path_text(child)) for tree, child in flat]
        scores, prompt_tokens = self_evaluate(model, tokenizer, texts, config)
        counts["self_eval_tokens"] += prompt_tokens
        for (_, child), score in zip(flat, scores):
            child.self_eval = score
    for _, leaf, children in new:
        for child in children:
            child.value = node_value(child.outcome, child.self_eval, config)
            child.visits, child.value_sum = 1, child.value
        backup(leaf, [child.value for child in children])


def _rows(tree: _Tree, *, model_id: str, iteration: int) -> list[dict]:
    nodes, frontier = [], [tree.first_root]
    while frontier:  # every node, then sorted into creation order
        node = frontier.pop()
        nodes.append(node)
        frontier.extend(node.children)
    nodes.sort(key=lambda n: (n.created, n.depth, _ancestry(n)))
    return [{
        "node_id": n.node_id,
        "parent_node_id": n.parent.node_id if n.parent else None,
        "problem_id": tree.problem["problem_id"],
        "iteration": iteration,
        "model_id": model_id,
        "depth": n.depth,
        "child_index": n.child_index,
        "created": n.created,
        "step": n.step,
        "draws": n.draws,
        "n_tokens": n.n_tokens,
        "logprob": n.logprob,
        "prior": n.prior,
        "terminal": n.terminal,
        "answer": n.answer,
        "outcome": n.outcome,
        "self_eval": n.self_eval,
        "value": n.value,
        "visits": n.visits,
        "q": n.q,
        "committed": n.committed,
    } for n in nodes]


def _ancestry(node: Node) -> tuple[int, ...]:
    indices = []
    while node.parent is not None:
        indices.append(node.child_index)
        node = node.parent
    return tuple(reversed(indices))

"""`factory lineage ID`: the ancestry of a pair, sample, problem, model or table file.

A pair leads to its problem and its two samples (or, for a tree-search pair,
its two tree nodes, each up its tree to the question, the searching model and
the nodes file); a sample to its problem, the
model that generated it and the sample it continues (if any); a model to its
training data and its parent model, back to the base model. Every file on the
way is shown with the stage that wrote it, the params it recorded and its
`dvc.lock` entry (stage, md5, command). The walk reads only provenance, model
lineage and the tables through DuckDB: no torch, no transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from factory.audit import catalog, discover, model_records
from factory.ids import ID_PREFIXES, file_fingerprint
from factory.lineage import dvc_lock_entry, dvc_lock_outputs


@dataclass
class Node:
    """One step of the ancestry: what it is, its facts, and what it came from."""

    kind: str
    id: str
    facts: dict = field(default_factory=dict)
    parents: list[Node] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "id": self.id, **self.facts, "from": [p.as_dict() for p in self.parents]}


class Tracer:
    """Walks ancestry inside one project root; files and models are described once per walk."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self.con = catalog(self.root)
        self.files = {f.path: f for f in discover(self.root)}
        self.models = {m["model_id"]: m for m in model_records(self.root)}
        self.lock = dvc_lock_outputs(self.root)
        self._fingerprints: dict[str, str] | None = None
        self._described: set[str] = set()  # models and files already shown in this walk

    def trace(self, target: str) -> Node:
        if (self.root / target).is_file() or target in self.files:
            return self.file_node(Path(target).as_posix())
        if target.startswith(ID_PREFIXES["pair"]):
            return self.pair(target)
        if target.startswith(ID_PREFIXES["sample"]):
            return self.sample(target)
        if target.startswith(ID_PREFIXES["problem"]):
            return self.problem(target)
        if target.startswith(ID_PREFIXES["node"]):
            return self.tree_node(target)
        if target.startswith(ID_PREFIXES["model"]) or target.startswith("hub:"):
            return self.model(target)
        raise ValueError(f"{target!r}: not an id (prefixes: {', '.join(ID_PREFIXES.values())}) "
                         "nor a table file of this project")

    def _row(self, view: str, column: str, value: str) -> dict | None:
        if view not in self._views():
            return None
        relation = self.con.execute(f"SELECT * FROM {view} WHERE {column} = ? LIMIT 1", [value])
        columns = [d[0] for d in relation.description]
        row = relation.fetchone()
        return dict(zip(columns, row)) if row else None

    def _views(self) -> set[str]:
        return {f.view for f in self.files.values() if f.view}

    def pair(self, pair_id: str) -> Node:
        row = self._row("pairs", "pair_id", pair_id)
        if row is None:
            raise ValueError(f"{pair_id}: no such pair in this project's pairs tables")
        node = Node("pair", pair_id, {"iteration": row["iteration"], "recipe": row["recipe"], "weight": row["weight"]})
        node.parents.append(self.problem(row["problem_id"], brief=True))
        for side in ("chosen", "rejected"):
            sample_id, node_id = row[f"{side}_sample_id"], row.get(f"{side}_node_id")
            if node_id is not None:
                node.parents.append(self.tree_node(node_id, role=side))
            elif sample_id is None:
                node.parents.append(Node(side, "gold rationale", {"problem_id": row["problem_id"]}))
            else:
                node.parents.append(self.sample(sample_id, role=side))
        node.parents.append(self.file_node(row["file"]))
        return node

    def sample(self, sample_id: str, *, role: str = "sample") -> Node:
        row = None
        for view in ("samples", "eval"):
            row = self._row(view, "sample_id", sample_id)
            if row is not None:
                break
        if row is None:
            raise ValueError(f"{sample_id}: no such sample in this project's samples tables")
        label = self._row("labels", "sample_id", sample_id)
        facts = {"iteration": row["iteration"], "problem_id": row["problem_id"], "generator": row["generator"],
                 "temperature": row["temperature"], "seed": row["seed"]}
        if label:
            facts |= {"answer": label["answer"], "answer_status": label["answer_status"],
                      "vote_share": label["vote_share"]}
        node = Node(role, sample_id, facts)
        if row.get("parent_sample_id"):
            node.parents.append(self.sample(row["parent_sample_id"], role="parent sample"))
        node.parents.append(self.model(row["model_id"]))
        node.parents.append(self.file_node(row["file"]))
        return node

    def tree_node(self, node_id: str, *, role: str = "tree node") -> Node:
        """A search-tree node (mcts_dpo): its step and statistics, then its parent, up to the question."""
        row = self._row("nodes", "node_id", node_id)
        if row is None:
            raise ValueError(f"{node_id}: no such node in this project's nodes tables")
        facts = {key: row[key] for key in ("iteration", "problem_id", "depth", "step", "visits", "q", "value",
                                           "outcome", "self_eval", "committed")}
        node = Node(role, node_id, facts)
        if row["parent_node_id"]:
            node.parents.append(self.tree_node(row["parent_node_id"], role="parent node"))
        else:
            node.parents += [self.model(row["model_id"]), self.file_node(row["file"])]
        return node

    def problem(self, problem_id: str, *, brief: bool = False) -> Node:
        row = self._row("problems", "problem_id", problem_id)
        if row is None:
            raise ValueError(f"{problem_id}: no such problem in this project's problems table")
        node = Node("problem", problem_id, {"split": row["split"], "source": row["source"],
                                            "gold_answer": row["gold_answer"], "question": row["question"]})
        if not brief:
            node.parents.append(self.file_node(row["file"]))
            used = []
            for view in sorted({"samples", "pairs"} & self._views()):
                used += [f"{count} {view} in iteration {it}" for it, count in self.con.execute(
                    f"SELECT iteration, count(*) FROM {view} WHERE problem_id = ? GROUP BY ALL ORDER BY 1",
                    [problem_id]).fetchall()]
            node.facts["used_in"] = used
        return node

    def model(self, model_id: str) -> Node:
        record = self.models.get(model_id)
        if record is None:
            return Node("model", model_id, {"note": "not a model folder of this project (a Hub id or a model "
                                                    "made elsewhere)"})
        if model_id in self._described:
            return Node("model", model_id, {"path": record["path"], "note": "described above"})
        self._described.add(model_id)
        node = Node("model", model_id, {"path": record["path"], "stage": record["stage"],
                                        "code_version": record["code_version"],
                                        "params": json.loads(record["params"]),
                                        "metrics": json.loads(record["metrics"]),
                                        "dvc": dvc_lock_entry(record["path"], self.lock)})
        for name, fingerprint in sorted(json.loads(record["data"]).items()):
            path = self._path_of(fingerprint)
            node.parents.append(self.file_node(path, role=f"training data: {name}") if path else
                                Node("data", name, {"fingerprint": fingerprint, "note": "file not found in data/"}))
        if record["parent"]:
            node.parents.append(self.model(record["parent"]))
        return node

    def file_node(self, path: str, *, role: str | None = None) -> Node:
        """A table file: its stage, params and lock entry; from its input files and the model of its rows."""
        facts = {"role": role} if role else {}
        if path in self._described:
            return Node("file", path, facts | {"note": "described above"})
        self._described.add(path)
        table_file = self.files.get(path)
        provenance = (table_file.provenance if table_file else None) or {}
        if provenance:
            facts |= {"table": provenance["table"], "stage": provenance["stage"], "rows": provenance["rows"],
                      "code_version": provenance["code_version"], "params": provenance["params"]}
        facts["dvc"] = dvc_lock_entry(path, self.lock)
        node = Node("file", path, facts)
        for name, fingerprint in sorted(provenance.get("inputs", {}).items()):
            source = self._path_of(fingerprint)
            node.parents.append(self.file_node(source, role=f"input: {name}") if source else
                                Node("data", name, {"fingerprint": fingerprint, "note": "file not found in data/"}))
        if provenance.get("model_id"):
            node.parents.append(self.model(provenance["model_id"]))
        return node

    def _path_of(self, fingerprint: str) -> str | None:
        """The project file with this content fingerprint (models record their data by content)."""
        if self._fingerprints is None:
            self._fingerprints = {file_fingerprint(self.root / p): p for p in self.files}
        return self._fingerprints.get(fingerprint)


def format_tree(node: Node, depth: int = 0) -> str:
    """The ancestry as an indented tree: a line per node, its facts below it, what it came from nested."""
    pad = "    " * depth
    lines = [f"{pad}{'<- ' if depth else ''}{node.kind} {node.id}"]
    for key, value in node.facts.items():
        if value is None or value == {} or value == []:
            continue
        if key == "dvc":
            value = f"stage {value['stage']}, out {value['out']}, md5 {value['md5']}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        lines.append(f"{pad}   {key}: {value}")
    lines += [format_tree(parent, depth + 1) for parent in node.parents]
    return "\n".join(lines)


def trace(target: str, root: str | Path = ".") -> Node:
    return Tracer(root).trace(target)

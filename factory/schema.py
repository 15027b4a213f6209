"""Every table factory writes, declared once.

Column names here are a public contract: users' SQL and scripts depend on them.
Tables may carry extra columns (they are kept, after the declared ones), but the
declared ones must be present with their types, and non-nullable ones must
have no nulls. `validate` names the file, the column and the first bad row
(rows are numbered from 1 in every message). `check_input` adds what an input
table must also satisfy: unique ids and finite numbers.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# Values of labels.answer_status; `timeout`: math-verify ran out of time judging a symbolic answer (correct is null).
ANSWER_STATUSES = ("correct", "wrong", "unparseable", "no_gold", "timeout")

PROBLEMS = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("gold_answer", pa.string()),  # null: unlabeled
        pa.field("gold_rationale", pa.string()),  # null: answers only, or nothing
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("n_steps", pa.int32()),  # steps of the gold rationale, when known
    ]
)

SAMPLES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("generator", pa.string(), nullable=False),
        pa.field("parent_sample_id", pa.string()),  # continuations and rollouts
        pa.field("prefix_steps", pa.int32()),  # steps kept from the parent
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("temperature", pa.float64(), nullable=False),
        pa.field("top_p", pa.float64(), nullable=False),
        pa.field("max_new_tokens", pa.int32(), nullable=False),
        pa.field("calculator", pa.bool_(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # stop | length
        # step-controlled continuations: the temperature of each generated step (null: one temperature)
        pa.field("step_temperatures", pa.list_(pa.float64())),
    ]
)

LABELS = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("answer", pa.string()),  # normalised number, or a symbolic answer's LaTeX; null: unparseable
        # equal within a problem iff the answers are equivalent (numbers and rationals: everywhere); votes use it
        pa.field("answer_canonical", pa.string()),
        pa.field("answer_source", pa.string()),  # which pattern found it (hashes, boxed, ...)
        pa.field("answer_status", pa.string(), nullable=False),  # one of ANSWER_STATUSES
        pa.field("correct", pa.bool_()),  # null: no gold to judge against
        pa.field("n_steps", pa.int32(), nullable=False),
        pa.field("calc_total", pa.int32(), nullable=False),
        pa.field("calc_wrong", pa.int32(), nullable=False),  # annotations whose result is wrong
        pa.field("calc_invalid", pa.int32(), nullable=False),  # annotations the calculator cannot evaluate
        pa.field("first_error_step", pa.int32()),  # 0-based step index; null: no wrong annotation
        pa.field("vote_count", pa.int32()),
        pa.field("vote_share", pa.float64()),
        pa.field("vote_rank", pa.int32()),
        pa.field("step_scores", pa.list_(pa.float64())),
    ]
)

PAIRS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("recipe", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_sample_id", pa.string()),  # null: the gold rationale
        pa.field("rejected_sample_id", pa.string()),
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("prefix_steps", pa.int32()),  # step-level pairs: steps of the shared prefix ending the prompt
        pa.field("chosen_node_id", pa.string()),  # tree-search pairs (mcts_dpo): the sides' `nodes` rows
        pa.field("rejected_node_id", pa.string()),
    ]
)

# One row per problem: the majority vote over its samples' final answers (factory.labelers.vote).
VOTES = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("n_samples", pa.int32(), nullable=False),  # k: every sample of the problem votes
        pa.field("n_answered", pa.int32(), nullable=False),  # samples with a parseable final answer
        pa.field("n_answers", pa.int32(), nullable=False),  # distinct answers
        pa.field("top_answer", pa.string()),  # null: a tie for the top, or no answer at all
        pa.field("top_votes", pa.int32(), nullable=False),
        pa.field("top_share", pa.float64(), nullable=False),  # top_votes / n_samples
        pa.field("tied", pa.bool_(), nullable=False),  # two or more answers share the top count
        pa.field("entropy", pa.float64(), nullable=False),  # bits, over the answered samples' answers
        pa.field("majority_correct", pa.bool_()),  # audit only; null: no gold, or no majority
    ]
)

# Step-level process scores of a sample (factory.labelers.process): one row per sample and source.
PROCESS_SOURCES = ("rollouts", "prm")
PROCESS = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # rollouts (Monte Carlo) | prm (the process reward model)
        pa.field("step_scores", pa.list_(pa.float64()), nullable=False),  # one per step (factory.reasoning_steps indexing)
        pa.field("step_labels", pa.list_(pa.bool_())),  # rollouts: score above the threshold; null for prm
        pa.field("path_reward", pa.float64(), nullable=False),  # mean or min of step_scores (params prm.aggregate)
        pa.field("n_rollouts", pa.int32()),  # rollouts per step prefix; null for prm
        pa.field("model_id", pa.string(), nullable=False),  # the policy that rolled out, or the PRM
    ]
)

# Tree search (factory.generators.tree, recipe mcts_dpo): one row per node, a node being a step prefix.
# visits = (1 if value is not null) + the children's visits, and q = the mean value over the node's subtree,
# so `factory.generators.tree.rebuild` (or a recursive SQL query) recomputes both from `value`.
NODES = pa.schema(
    [
        pa.field("node_id", pa.string(), nullable=False),
        pa.field("parent_node_id", pa.string()),  # null: the question (the first root)
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),  # the policy that searched
        pa.field("depth", pa.int32(), nullable=False),  # nodes between the question and this one
        pa.field("child_index", pa.int32(), nullable=False),  # order among its siblings
        pa.field("created", pa.int32(), nullable=False),  # the search round that made it (0: the question)
        pa.field("step", pa.string(), nullable=False),  # this node's step; a non-terminal one ends with a newline
        pa.field("draws", pa.int32(), nullable=False),  # the parent's candidates that wrote this same step
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("logprob", pa.float64()),  # the policy's log-probability of the step (its own tokens, T=1)
        pa.field("prior", pa.float64()),  # PUCT prior: softmax over siblings of the length-normalised logprob
        pa.field("terminal", pa.bool_(), nullable=False),  # final answer, end of text, or the depth limit
        pa.field("answer", pa.string()),  # terminal nodes: the path's final answer
        pa.field("outcome", pa.float64()),  # terminal nodes: +1 correct, -1 not
        pa.field("self_eval", pa.float64()),  # the policy's P(yes) that the last step is correct
        pa.field("value", pa.float64()),  # outcome_weight * outcome + self_eval_weight * (2 * self_eval - 1)
        pa.field("visits", pa.int32(), nullable=False),
        pa.field("q", pa.float64()),  # mean value of the subtree; null when never visited
        pa.field("committed", pa.bool_(), nullable=False),  # on the path the search committed to
    ]
)

DROPPED = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),  # id of the dropped row in its own table
        pa.field("table", pa.string(), nullable=False),  # which table it would have been in
        pa.field("stage", pa.string(), nullable=False),
        pa.field("filter", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("row", pa.string(), nullable=False),  # the whole row as JSON: nothing is lost
    ]
)

TABLES: dict[str, pa.Schema] = {
    "problems": PROBLEMS,
    "samples": SAMPLES,
    "labels": LABELS,
    "pairs": PAIRS,
    "votes": VOTES,
    "process": PROCESS,
    "nodes": NODES,
    "dropped": DROPPED,
}


class SchemaError(ValueError):
    """A table does not match its declared schema; the message names file, column and row (1-based)."""


def schema_for(kind: str) -> pa.Schema:
    try:
        return TABLES[kind]
    except KeyError:
        raise SchemaError(f"unknown table kind {kind!r}; expected one of {sorted(TABLES)}") from None


def _first_bad_row(column: pa.ChunkedArray, target: pa.DataType) -> tuple[int, object]:
    for index, value in enumerate(column.to_pylist()):
        try:
            pa.array([value]).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return index, value
    return -1, None


def validate(table: pa.Table, kind: str, *, source: str = "<table>") -> pa.Table:
    """Check `table` against the schema of `kind`; return it cast, declared columns first.

    Missing columns that are nullable are added as nulls (a JSONL file need not
    spell out every optional field); missing required ones are an error.
    """
    schema = schema_for(kind)
    columns, fields = [], []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(
                    f"{source}: {kind} table has no column {field.name!r} "
                    f"(has: {', '.join(table.column_names) or 'none'})"
                )
            column = pa.chunked_array([pa.nulls(table.num_rows, field.type)])
        else:
            column = table.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    row, value = _first_bad_row(column, field.type)
                    raise SchemaError(
                        f"{source}: column {field.name!r} row {row + 1}: expected {field.type}, "
                        f"got {value!r} (column type {column.type})"
                    ) from None
            if not field.nullable and column.null_count:
                row = pc.index(pc.is_null(column), True).as_py()
                raise SchemaError(f"{source}: column {field.name!r} row {row + 1}: null in a required field")
        columns.append(column)
        fields.append(field)
    for name in table.column_names:
        if name not in schema.names:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def from_rows(rows: list[dict], kind: str, *, source: str = "<rows>") -> pa.Table:
    """Build and validate a table of `kind` from Python dicts (declared columns only).

    Arrow converts whole columns at once; only when a column fails is it
    scanned for the row to name in the error.
    """
    schema = schema_for(kind)
    data = {f.name: [row.get(f.name) for row in rows] for f in schema}
    columns = []
    for field in schema:
        try:
            columns.append(pa.array(data[field.name], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            for index, value in enumerate(data[field.name]):
                try:
                    pa.array([value], type=field.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    raise SchemaError(
                        f"{source}: row {index + 1} field {field.name!r}: expected {field.type}, got {value!r}"
                    ) from None
            raise
    loose = pa.schema([f.with_nullable(True) for f in schema])
    table = pa.Table.from_arrays(columns, schema=loose)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            row = pc.index(pc.is_null(table.column(field.name)), True).as_py()
            raise SchemaError(f"{source}: row {row + 1}: required field {field.name!r} is missing or null")
    return table.cast(schema)


# The id column that must be unique in an input table of each kind (duplicates would be counted twice: votes).
KEYS = {"problems": "problem_id", "samples": "sample_id"}


def _is_float(data_type: pa.DataType) -> bool:
    return pa.types.is_floating(data_type) or (
        pa.types.is_list(data_type) and pa.types.is_floating(data_type.value_type))


def check_input(table: pa.Table, kind: str, *, source: str = "<table>", unit: str = "row",
                numbers: list[int] | None = None) -> None:
    """Errors for an input table that `validate` lets through: a repeated id, NaN or Infinity in a number.

    Each names the file, the 1-based row(s) (`unit`: "row" for Parquet, "line" for a JSONL file whose rows
    are its lines; `numbers`: each row's line, where blank lines were skipped) and the field. Only the
    declared columns present in `table` are checked.
    """
    number = (lambda index: numbers[index]) if numbers is not None else (lambda index: index + 1)
    key = KEYS.get(kind)
    if key and key in table.column_names and table.num_rows:
        ids = table.column(key)
        if pc.count_distinct(ids, mode="all").as_py() != table.num_rows:
            first: dict = {}
            for index, value in enumerate(ids.to_pylist()):
                if value in first:
                    raise SchemaError(
                        f"{source}: {unit}s {number(first[value])} and {number(index)} field {key!r}: duplicate id "
                        f"{value!r} (each {kind[:-1]} must appear once)")
                first[value] = index
    declared = {field.name: field for field in schema_for(kind)}
    for name in table.column_names:
        field = declared.get(name)
        column = table.column(name)
        if field is None or not _is_float(column.type):
            continue
        values = pc.list_flatten(column) if pa.types.is_list(column.type) else column
        if pc.all(pc.is_finite(values)).as_py() is not False:  # nulls are allowed where the schema allows them
            continue
        for index, value in enumerate(column.to_pylist()):
            items = value if isinstance(value, list) else [value]
            bad = next((v for v in items if v is not None and (v != v or v in (float("inf"), float("-inf")))), None)
            if bad is not None:
                raise SchemaError(f"{source}: {unit} {number(index)} field {name!r}: {bad!r} is not a finite number")

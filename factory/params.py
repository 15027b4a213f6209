"""params.yaml → one frozen dataclass per stage, with unknown keys refused by name."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"


class ParamsError(ValueError):
    """params.yaml does not fit a stage's config; the message names the file, section and key."""


class _Yaml12FloatLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `3e-05` as the number YAML 1.2 says it is.

    PyYAML follows YAML 1.1, where a float needs a decimal point, so `3e-05` is text. DVC writes params
    with ruamel.yaml (YAML 1.2), and `dvc exp run -S dpo.learning_rate=3.0e-5` leaves `3e-05` in the file.
    """


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """YAML as DVC writes it (params.yaml, dvc.lock): safe, with YAML 1.2's floats."""
    return yaml.load(text, Loader=_Yaml12FloatLoader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    if not path.is_file():
        raise ParamsError(f"{path}: not a params file (a folder?)")
    try:
        params = read_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}: invalid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


# Every params section and the config class it builds (module:Class), imported only when needed. `problems`
# holds one sub-section per generated source (`problems.arith`); `pairs` is read by `factory.recipes`.
SECTIONS = {
    "model": "factory.modeling:TinyModelConfig",
    "pretrain": "train.pretrain:PretrainConfig",
    "warmup": "train.sft:WarmupConfig",
    "eval": "factory.evaluate:EvalConfig",
    "sample": "factory.generators.sampling:SamplingConfig",
    "filter": "factory.filters:FilterConfig",
    "steps": "factory.generators.continuations:StepsConfig",
    "mcts": "factory.generators.tree:MCTSConfig",
    "audit": "factory.audit:AuditConfig",
    "preconditions": "factory.preconditions:PreconditionsConfig",
    "dpo": "train.dpo:DPOTrainConfig",
    "prm": "train.prm:PRMConfig",
    "orpo": "train.orpo:ORPORunConfig",
    "self_train": "train.iteration:SelfTrainConfig",
    "pairs": "factory.pairs:PairsConfig",
    "executor": "factory.executor:ExecutorConfig",
}
PROBLEM_SOURCES = {"arith": "factory.problems.arith:ArithConfig"}
TOP_LEVEL = ("recipe", "iterations", "problems", *SECTIONS)


def config_class(spec: str) -> type:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def section_default(section: str, key: str) -> Any:
    """The default of `section.key`: what applies when params.yaml leaves it out."""
    if section not in SECTIONS:
        raise ParamsError(f"unknown params section {section!r}; known: {sorted(SECTIONS)}")
    field = {f.name: f for f in dataclasses.fields(config_class(SECTIONS[section]))}.get(key)
    if field is None:
        raise ParamsError(f"section {section!r} has no key {key!r}")
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return list(value) if isinstance(value, tuple) else value


def _type_error(value: Any, hint: Any) -> str | None:
    """Why `value` (from YAML) cannot be a `hint`, or None when it can."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        reasons = [_type_error(value, arg) for arg in args]
        return None if any(r is None for r in reasons) else " or ".join(r for r in reasons if r)
    if hint is type(None):
        return None if value is None else "null"
    if hint is Any:
        return None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            return "a list"
        item = args[0] if args else Any
        return next((f"a list of {reason}" for v in value if (reason := _type_error(v, item))), None)
    if origin is dict:
        if not isinstance(value, dict):
            return "a mapping"
        item = args[1] if len(args) == 2 else Any
        return next((f"a mapping to {reason}" for v in value.values() if (reason := _type_error(v, item))), None)
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, dict) else "a mapping"
    return None


# Every number in params is a count, size, rate, weight or threshold, so none is negative, except these; and
# these sizes are at least 1. A config class's own checks add the finer ranges (top_p in (0, 1], ...).
SIGNED = frozenset({"temperature_step"})
AT_LEAST_ONE = frozenset({"batch_size", "max_length", "max_new_tokens", "dev_max_new_tokens", "epochs", "max_epochs",
                          "max_steps", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                          "ngram", "n", "shard_size", "score_every", "rollouts", "width", "simulations", "max_depth",
                          "max_step_tokens", "attempts", "parents_per_problem", "negatives_per_problem",
                          "pairs_per_problem", "workers", "max_operand", "max_base", "max_factor", "max_value"})


def _range_error(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or name in SIGNED:
        return None
    if name in AT_LEAST_ONE and value < 1:
        return ">= 1"
    return ">= 0" if value < 0 else None


def build(cls: type[T], values: dict[str, Any] | None, *, where: str) -> T:
    """`cls(**values)` with tuples for list fields and a clear error for unknown keys and wrong types."""
    if values is not None and not isinstance(values, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {values!r}")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hint = _did_you_mean(unknown[0], fields)
        raise ParamsError(f"{where}: unknown key(s) {unknown}{hint}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if (reason := _type_error(value, hints[name])) is not None:
            raise ParamsError(f"{where}, key {name!r}: expected {reason}, got {value!r}")
        if (reason := _range_error(name, value)) is not None:
            raise ParamsError(f"{where}, key {name!r}: must be {reason}, got {value!r}")
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            values[name] = tuple(value)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints[name]):  # a nested section, e.g. dpo.lora
            values[name] = build(hints[name], value, where=f"{where}, key {name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ParamsError(f"{where}: {error}") from None


def section(params: dict[str, Any], name: str, cls: type[T], *, path: str | Path = DEFAULT_PARAMS) -> T:
    return build(cls, params.get(name), where=f"{path}: section {name!r}")


def as_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples become lists), for provenance records."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def with_iteration(params: dict[str, Any], iteration: int, *, path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """`params` with iteration K's overrides (params `iterations.K`, except `prev`) merged into its sections.

    >>> with_iteration({"sample": {"n": 4, "seed": 0}, "iterations": {"2": {"prev": 1, "sample": {"n": 8}}}}, 2)
    {'sample': {'n': 8, 'seed': 0}, 'iterations': {'2': {'prev': 1, 'sample': {'n': 8}}}}
    """
    item = (params.get("iterations") or {}).get(str(iteration))
    if not item:
        return params
    merged = dict(params)
    for name, overrides in item.items():
        if name == "prev":
            continue
        if not isinstance(overrides, dict):
            raise ParamsError(f"{path}: iterations.{iteration}.{name}: expected a mapping of {name!r} keys to "
                              f"override, got {overrides!r}")
        merged[name] = _deep_merge(params.get(name) or {}, overrides)
    return merged


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` over `base`, nested mappings (e.g. `dpo.lora`, `pairs.scpo`) merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _deep_merge(base[key], value) if both else value
    return merged


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_params(params: dict[str, Any], *, path: str | Path = DEFAULT_PARAMS) -> None:
    """Check the whole params file before any work: sections, keys, types and ranges, for every iteration too.

    Each section is built into its config class (whose checks catch out-of-range values), at the top level and
    with each iteration's overrides merged in; the recipe's needs are checked by `factory.recipes`.
    """
    from factory.recipes import check_params, pairs_settings, pair_rules

    unknown = sorted(set(params) - set(TOP_LEVEL))
    if unknown:
        raise ParamsError(f"{path}: unknown section {unknown[0]!r}{_did_you_mean(unknown[0], TOP_LEVEL)}; "
                          f"known: {', '.join(TOP_LEVEL)}")
    problems = params.get("problems") or {}
    if not isinstance(problems, dict):
        raise ParamsError(f"{path}: section 'problems': expected a mapping of sources, got {problems!r}")
    for source, values in problems.items():
        if source not in PROBLEM_SOURCES:
            raise ParamsError(f"{path}: section 'problems': unknown source {source!r}; known: {sorted(PROBLEM_SOURCES)}")
        build(config_class(PROBLEM_SOURCES[source]), values, where=f"{path}: section 'problems.{source}'")
    iterations = params.get("iterations") or {}
    if not isinstance(iterations, dict):
        raise ParamsError(f"{path}: section 'iterations': expected a mapping of iteration numbers, got {iterations!r}")
    for key, item in iterations.items():
        where = f"{path}: iterations.{key}"
        if not str(key).isdigit() or int(key) < 1:
            raise ParamsError(f"{where}: an iteration is a number from 1")
        if not isinstance(item, dict) or not isinstance(item.get("prev"), int) or isinstance(item.get("prev"), bool) \
                or not 0 <= item["prev"] < int(key):
            raise ParamsError(f"{where}: needs `prev`, an earlier iteration's number (0: the warm-up)")
        extra = sorted(set(item) - {"prev", *SECTIONS})
        if extra:
            raise ParamsError(f"{where}: unknown section {extra[0]!r}{_did_you_mean(extra[0], SECTIONS)}; "
                              f"an iteration overrides only: {', '.join(SECTIONS)}")
    views = [(path, params)] + [(f"{path} (iteration {k})", with_iteration(params, int(k), path=path))
                                for k in iterations]
    for where, view in views:
        for name, spec in SECTIONS.items():
            if name != "pairs":
                build(config_class(spec), view.get(name), where=f"{where}: section {name!r}")
        for rule in pair_rules().values():
            pairs_settings(rule, view, path=where)
    check_params(params, path=path)


def update_params(path: str | Path, changes: dict[str, Any]) -> None:
    """Set dotted keys (`recipe`, `sample.split`, ...) in a params file, keeping its comments and layout.

    ruamel.yaml's round trip (the library `dvc exp run -S` edits params with) keeps what PyYAML would drop.
    """
    import io

    from ruamel.yaml import YAML

    from factory.io import write_text

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never re-wrap a flow mapping
    path = Path(path)
    document = yaml_rt.load(path.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        node = document
        for name in sections:
            node = node.setdefault(name, {})
        node[key] = value
    buffer = io.StringIO()
    yaml_rt.dump(document, buffer)
    write_text(path, buffer.getvalue())

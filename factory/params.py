"""params.yaml → one frozen dataclass per stage, with unknown keys refused by name."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"


class ParamsError(ValueError):
    """params.yaml does not fit a stage's config; the message names the file, section and key."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def build(cls: type[T], values: dict[str, Any] | None, *, where: str) -> T:
    """`cls(**values)` with tuples for list fields and a clear error for unknown keys."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
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
        merged[name] = {**(params.get(name) or {}), **overrides}
    return merged

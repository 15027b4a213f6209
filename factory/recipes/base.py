"""The recipe contract and its one registry.

A recipe is what a user chooses (params `recipe`), compares and reads a paper
about. Each is one module of `factory.recipes` that builds a `Recipe` and
`register`s it; every list of recipe names (CLI help and choices, `compare`,
the audit's gold-judged rules, the `steps` stage, training) is read from
`RECIPES`. The contract is deliberately plain: a frozen dataclass and a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.pairs import PairsConfig


@dataclass(frozen=True, kw_only=True)
class PairRule:
    """How a recipe makes preference pairs from one iteration's labelled samples.

    `make` is the per-row reference rule; `bulk`, when given, computes the
    same rows over Arrow tables (tested equal) and may return None to fall
    back on `make`. `settings` extends `PairsConfig`; its `rule` ClassVar is
    the name recorded in every row's `recipe` column and hashed into pair ids.
    `gold_judged` says the chosen side is judged against gold answers, which
    decides the audits that apply (`gold_recipe(recipe)` in audits/*.sql).
    """

    make: Callable[..., tuple[list[dict], dict]]
    settings: type[PairsConfig] = PairsConfig
    gold_judged: bool
    bulk: Callable[..., Any] | None = None

    @property
    def name(self) -> str:
        return self.settings.rule


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One recipe, as a reader meets it: paper, settings, steps maker, pair rule, training step.

    - `needs`: params (dotted keys) the recipe cannot run without; a run whose
      params say otherwise fails before any work, naming the `-S` flags.
    - `setup`: the rest of the paper's set-up, and the sampling budget that
      matches the other recipes in `factory compare`; `factory recipe NAME
      --write` writes them with `needs`, but a run may change them.
    - `make_steps(inputs) -> StepTables`: its step-level data, made by the
      `steps` stage (`factory.step_stage`); None writes empty tables.
    - `train(iteration) -> summary`: its training step, composed of the blocks
      in `train.iteration`.
    - `samples_again`: the training step samples a second round (its sampling
      backend is checked before any training).
    - `precondition(signals, config) -> Check`: what its method relies on, as
      a check of one signal the factory measured this iteration
      (`factory.preconditions`) against a threshold in params `preconditions`;
      `factory train` checks it before training. None: it relies on nothing
      measured (gold-only SFT).
    """

    name: str
    paper: str
    summary: str
    train: Callable[[Any], dict]
    pairs: PairRule | None = None
    make_steps: Callable[[Any], Any] | None = None
    needs: Mapping[str, Any] = field(default_factory=dict)
    setup: Mapping[str, Any] = field(default_factory=dict)
    samples_again: bool = False
    precondition: Callable[[Mapping[str, Any], Any], Any] | None = None
    module: str  # the module that defines it (`__name__`), where its method is written down

    def settings(self) -> dict[str, Any]:
        """Everything `factory recipe NAME` sets besides `recipe` itself."""
        return {**self.needs, **self.setup}

    def exp_run_flags(self) -> list[str]:
        """Its settings as `dvc exp run -S` values (`sample.split=unlabeled`, ...)."""
        return [f"{key}={_setting(value)}" for key, value in self.settings().items()]


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice ({RECIPES[recipe.name].module}, {recipe.module})")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def pair_rules() -> dict[str, PairRule]:
    """Every pair rule by the name its rows carry."""
    return {r.pairs.name: r.pairs for r in RECIPES.values() if r.pairs is not None}


def rule_sections() -> tuple[str, ...]:
    """The params sub-sections of `pairs` that belong to one rule (`pairs.scpo`, ...)."""
    return tuple(sorted({rule.settings.section for rule in pair_rules().values() if rule.settings.section}))


def gold_judged_rules() -> tuple[str, ...]:
    return tuple(sorted(name for name, rule in pair_rules().items() if rule.gold_judged))


def pairs_settings(rule: PairRule, params: Mapping[str, Any], *, path: str | Path) -> PairsConfig:
    """`rule`'s settings from params `pairs`; every rule's sub-section is validated, so a typo fails for all."""
    from factory.pairs import rule_settings

    where = f"{path}: section 'pairs'"
    sections = rule_sections()
    for other in pair_rules().values():
        rule_settings(other.settings, params.get("pairs"), sections, where=where)
    return rule_settings(rule.settings, params.get("pairs"), sections, where=where)


def params_value(params: Mapping[str, Any], dotted: str) -> Any:
    """The value of `section.key` in params, or the default of the section's config class when it is unset."""
    from factory.params import section_default

    section, _, key = dotted.partition(".")
    values = params.get(section) or {}
    return values[key] if key in values else section_default(section, key)


def _setting(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def exp_run_line(recipe: Recipe) -> str:
    """The `dvc exp run` command that runs `recipe` as its paper sets it up."""
    flags = [f"recipe={recipe.name}", *recipe.exp_run_flags()]
    return "dvc exp run " + " ".join(f"-S {flag}" for flag in flags)


def check_params(params: Mapping[str, Any], *, path: str | Path) -> Recipe:
    """The recipe params name, after checking that params (and every iteration's overrides) meet its needs."""
    from factory.params import with_iteration

    try:
        recipe = get_recipe(params.get("recipe", "dpo_st"))
    except ValueError as error:
        raise ValueError(f"{path}: key 'recipe': {error}") from None
    views = [("", params)] + [(f" (iteration {k})", with_iteration(params, int(k), path=path))
                              for k in (params.get("iterations") or {})]
    for where, view in views:
        wrong = {key: params_value(view, key) for key, value in recipe.needs.items()
                 if _setting(params_value(view, key)) != _setting(value)}
        if wrong:
            found = ", ".join(f"{key}={_setting(value)}" for key, value in wrong.items())
            flags = " ".join(f"-S {key}={_setting(recipe.needs[key])}" for key in wrong)
            raise ValueError(f"{path}: recipe {recipe.name!r} needs {flags.replace('-S ', '')}, but params have "
                             f"{found}{where}: run `dvc exp run {flags}` or `factory recipe {recipe.name} --write`")
    return recipe


def replace_settings(params: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """`params` switched to `recipe`: its settings set, and every other recipe's settings back to their defaults."""
    from factory.params import section_default

    touched = {key for other in RECIPES.values() for key in other.settings()}
    changes: dict[str, Any] = {"recipe": recipe.name}
    for key in sorted(touched):
        changes[key] = recipe.settings()[key] if key in recipe.settings() else section_default(*key.split(".", 1))
    return changes


def describe(recipe: Recipe) -> str:
    """What `factory recipe NAME` prints: paper, summary, settings, stages and the command that runs it."""
    stages = ["sample", "label", "filter"] + (["steps"] if recipe.make_steps else []) \
        + (["pairs", "audit"] if recipe.pairs else []) + ["train", "eval"]
    lines = [f"{recipe.name}: {recipe.summary}", f"  paper:    {recipe.paper}", f"  module:   {recipe.module}",
             f"  stages:   {' -> '.join(stages)} (per iteration)"]
    if recipe.pairs:
        lines.append(f"  pairs:    rule {recipe.pairs.name!r}, "
                     + ("gold-judged" if recipe.pairs.gold_judged else "judged without gold"))
    if recipe.precondition:
        lines.append(f"  relies:   {recipe.precondition.__doc__.splitlines()[0].rstrip('.')} (checked before training)")
    for title, values in (("needs", recipe.needs), ("setup", recipe.setup)):
        if values:
            lines.append(f"  {title + ':':<9} " + ", ".join(f"{k}={_setting(v)}" for k, v in values.items()))
    lines.append(f"  run:      {exp_run_line(recipe)}")
    return "\n".join(lines)


def recipe_table() -> list[dict[str, str]]:
    """One row per recipe (name, paper, summary, module), for the README's table and `factory recipe --list`."""
    return [{"name": r.name, "paper": r.paper, "summary": r.summary, "module": r.module} for r in RECIPES.values()]

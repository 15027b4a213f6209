"""The recipes, one module each, and their one registry (`RECIPES`, contract in `factory.recipes.base`).

Adding a recipe is one new module that `register`s a `Recipe`, imported
below, plus its params; nothing else names it.
"""

from factory.recipes.base import (RECIPES, PairRule, Recipe, check_params, describe, exp_run_line, get_recipe,
                                  gold_judged_rules, pair_rules, pairs_settings, recipe_table, register,
                                  replace_settings, rule_sections)
from factory.recipes import dpo_st, baselines, scpo, scdpo, sipf_orpo, mcts_dpo  # noqa: E402,F401  (registers them)

__all__ = ["RECIPES", "PairRule", "Recipe", "check_params", "describe", "exp_run_line", "get_recipe",
           "gold_judged_rules", "pair_rules", "pairs_settings", "recipe_table", "register", "replace_settings",
           "rule_sections"]

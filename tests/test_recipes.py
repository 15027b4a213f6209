"""The recipe registry from a user's side: `factory recipe`, one `recipe` key, needs checked before any work."""

import shutil
from pathlib import Path

import pytest
import yaml

from factory.cli import main
from factory.params import ParamsError, load_params, validate_params
from factory.recipes import RECIPES, check_params, exp_run_line, get_recipe

PROJECT_PARAMS = Path(__file__).parent.parent / "params.yaml"


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(PROJECT_PARAMS, path)
    return path


def test_every_recipe_names_its_paper_module_and_a_runnable_line():
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.paper and recipe.summary
        assert recipe.module.startswith("factory.recipes.")
        assert exp_run_line(recipe).startswith(f"dvc exp run -S recipe={name}")
        assert (recipe.make_steps is not None) == (name in ("scdpo", "sipf_orpo", "mcts_dpo"))
        assert (recipe.pairs is None) == (name in ("sft", "self_train"))
        doc = __import__(recipe.module, fromlist=["_"]).__doc__  # its method is written in its module
        assert f"`{name}`" in doc or recipe.paper in doc, name


def test_factory_recipe_prints_the_paper_settings_and_command(capsys):
    assert main(["recipe", "scpo"]) == 0
    out = capsys.readouterr().out
    assert "paper:    Prasad et al., 2024" in out and "module:   factory.recipes.scpo" in out
    assert "needs:    sample.split=unlabeled" in out
    assert "relies:   ScPO trains toward the majority answer: on problems with a gold answer, the majority must be " \
        "mostly right (checked before training)" in out
    assert "run:      dvc exp run -S recipe=scpo -S sample.split=unlabeled -S sample.n=8" in out


def test_write_switches_params_to_the_recipe_and_back_keeping_comments(params_file, capsys):
    original = params_file.read_text()
    assert main(["recipe", "scpo", "--write", "--params", str(params_file)]) == 0
    params = load_params(params_file)
    assert params["recipe"] == "scpo" and params["sample"]["split"] == "unlabeled" and params["sample"]["n"] == 8
    assert check_params(params, path=params_file).name == "scpo"
    text = params_file.read_text()
    assert "# The recipe of every iteration" in text and "# DPO-ST samples at T=0.7" in text  # comments kept
    assert len(text.splitlines()) == len(original.splitlines())  # one value per line changed, nothing re-wrapped
    # Back to the default: settings another recipe needed return to their defaults (= params.yaml's values).
    assert main(["recipe", "dpo_st", "--write", "--params", str(params_file)]) == 0
    assert yaml.safe_load(params_file.read_text()) == yaml.safe_load(original)


def test_a_run_that_contradicts_the_recipes_needs_fails_naming_the_flags(params_file, tmp_path, capsys):
    params = yaml.safe_load(params_file.read_text())
    params["recipe"] = "scpo"
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"recipe 'scpo' needs sample.split=unlabeled, but params have "
                                         r"sample.split=answers: run `dvc exp run -S sample.split=unlabeled`"):
        validate_params(load_params(params_file), path=params_file)
    # ... in every command, before any work (here: sampling, which would load a model first).
    assert main(["sample", "--model", str(tmp_path / "none"), "--problems", str(tmp_path / "none.parquet"),
                 "--iteration", "1", "--out", str(tmp_path / "s.parquet"), "--params", str(params_file)]) == 2
    assert "needs sample.split=unlabeled" in capsys.readouterr().err
    # An iteration's override counts too.
    params["sample"]["split"] = "unlabeled"
    params["iterations"]["2"]["sample"] = {"split": "answers"}
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"\(iteration 2\)"):
        check_params(load_params(params_file), path=params_file)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: p.update(sampel=p.pop("sample")), "unknown section 'sampel' (did you mean 'sample'?)"),
    (lambda p: p["iterations"]["2"].update(sampel={"n": 8}), "iterations.2: unknown section 'sampel'"),
    (lambda p: p["sample"].update(n=-2), "section 'sample', key 'n': must be >= 1, got -2"),
    (lambda p: p["sample"].update(limit=-3), "key 'limit': must be >= 0, got -3"),
    (lambda p: p["sample"].update(temperature=-1.0), "key 'temperature': must be >= 0"),
    (lambda p: p["sample"].update(n="four"), "key 'n': expected an integer, got 'four'"),
    (lambda p: p["dpo"].update(learning_rate=True), "key 'learning_rate': expected a number, got True"),
    (lambda p: p["pairs"].update(recipe="scpo"), "unknown key(s) ['recipe']"),
    (lambda p: p["pairs"]["scpo"].update(min_vote_share=2), "min_vote_share must be in [0, 1]"),
    (lambda p: p.update(recipe="magic"), "unknown recipe 'magic'"),
    (lambda p: p["iterations"].update({"3": {"prev": 5}}), "iterations.3: needs `prev`, an earlier iteration"),
    (lambda p: p["dpo"]["lora"].update(rank=8), "key 'lora': unknown key(s) ['rank']"),
])
def test_the_whole_params_file_is_checked_with_the_file_and_key_named(params_file, edit, message):
    params = yaml.safe_load(params_file.read_text())
    edit(params)
    params_file.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError) as error:  # ParamsError, or the registry's own ValueError for the recipe
        validate_params(load_params(params_file), path=params_file)
    assert str(params_file) in str(error.value) and message in str(error.value), str(error.value)


def test_small_floats_as_dvc_writes_them_are_numbers(params_file):
    """`dvc exp run -S dpo.learning_rate=3.0e-5` writes `3e-05` (YAML 1.2), which YAML 1.1 reads as text."""
    text = params_file.read_text()
    params_file.write_text(text.replace("learning_rate: 1.0e-4", "learning_rate: 3e-05"))
    assert params_file.read_text() != text
    params = load_params(params_file)
    validate_params(params, path=params_file)
    assert params["dpo"]["learning_rate"] == 3e-05 and params["sample"]["n"] == 4


def test_invalid_yaml_and_a_folder_are_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("sample:\n  n: [4\n")
    with pytest.raises(ParamsError, match=r"params.yaml: invalid YAML at line 3"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not a params file"):
        load_params(tmp_path)


def test_iteration_overrides_merge_nested_sections(params_file):
    from factory.params import with_iteration

    params = yaml.safe_load(params_file.read_text())
    params["iterations"]["2"]["dpo"] = {"lora": {"enabled": True}}
    merged = with_iteration(params, 2)
    assert merged["dpo"]["lora"] == {**params["dpo"]["lora"], "enabled": True}
    assert get_recipe(merged["recipe"]).name == "dpo_st"

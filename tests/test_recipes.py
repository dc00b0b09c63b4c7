"""Bad recipes and options fail with a message that names the problem."""

import json

import pytest
import torch

import sparsec
from sparsec.errors import RecipeError
from sparsec.recipes import CompileOptions, resolve_recipe


def at(**kw):
    return {"passes": {"activation_threshold": kw}}


BAD_RECIPES = [
    ("teal-45", r"unknown recipe 'teal-45' \(did you mean 'teal-\d0'\?\)"),
    (at(sparsty=0.5), r"passes.activation_threshold: unknown key 'sparsty' \(did you mean 'sparsity'\?\)"),
    (at(sparsity=1.0), r"passes.activation_threshold.sparsity must be in \[0, 1\), got 1.0"),
    (at(sparsity=-0.1), r"sparsity must be in \[0, 1\), got -0.1"),
    (at(sparsity="half"), r"passes.activation_threshold.sparsity must be a number, got 'half'"),
    (at(mode="tael"), r"mode must be 'teal' or 'cats', got 'tael'"),
    (at(allocation="gready"), r"allocation must be 'greedy' or 'uniform', got 'gready'"),
    (at(greedy_step=-0.01), r"greedy_step must be positive, got -0.01"),
    (at(greedy_batches=-1), r"greedy_batches must not be negative"),
    (at(greedy_scope="global"), r"greedy_scope must be 'block' or 'model', got 'global'"),
    (at(greedy_spread=1.5), r"greedy_spread must be in \[0, 1\), got 1.5"),
    (at(ignore="lm_head"), r"passes.activation_threshold.ignore must be a list, got 'lm_head'"),
    (at(bins=4), r"bins must be at least 16, got 4"),
    ({"passes": {"activation_treshold": {}}}, r"unknown pass 'activation_treshold' \(did you mean 'activation_threshold'\?\)"),
    ({"pases": {}}, r"unknown top-level key 'pases' \(did you mean 'passes'\?\)"),
    ({"passes": {}}, r"'passes' must be a non-empty mapping"),
    ("missing/recipe.yaml", r"recipe file 'missing/recipe.yaml' does not exist"),
    (42, r"a recipe is a name, a YAML/JSON path or a dict, not int"),
]


@pytest.mark.parametrize("recipe,message", BAD_RECIPES)
def test_bad_recipe(recipe, message):
    with pytest.raises(RecipeError, match=message):
        resolve_recipe(recipe)


BAD_OPTIONS = [
    ({"recipe": "teal-40", "recipie": 1}, r"unknown option 'recipie'"),
    ({}, r"give a 'recipe' \(e.g. 'teal-40'\) or a calibrated 'plan'"),
    ({"recipe": "teal-40", "on_plugin_error": "ignore"}, r"on_plugin_error must be 'raise' or 'skip'"),
    ({"recipe": "teal-40", "dense_backend": "tvm"}, r"dense_backend must be 'inductor' or 'eager'"),
    ({"plan": {"sites": {}}}, r"plan must be a sparsec.Plan or the path of a saved one, got dict"),
    ({"recipe": "teal-40", "plan": "p.sparsec"}, r"give a 'recipe' or a 'plan', not both"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_bad_options(options, message):
    with pytest.raises(RecipeError, match=message):
        CompileOptions.from_dict(options)


def test_bad_option_through_torch_compile_is_clear():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match=r"unknown option 'sparsity' \(did you mean 'recipe'|unknown option 'sparsity'"):
        with torch.no_grad():
            torch.compile(lin, backend="sparsec", options={"sparsity": 0.5})(torch.randn(2, 4))


def test_recipe_files(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("passes:\n  activation_threshold:\n    mode: cats\n    sparsity: 0.3\n")
    r = resolve_recipe(str(y))
    assert r.name == "r" and r.passes["activation_threshold"].sparsity == 0.3
    j = tmp_path / "r.json"
    j.write_text(json.dumps(at(mode="teal", sparsity=0.2, allocation="uniform")))
    assert resolve_recipe(str(j)).passes["activation_threshold"].allocation == "uniform"
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [unclosed")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        resolve_recipe(str(bad))
    for text, kind in (("5", "int"), ("null", "NoneType"), ("[1]", "list")):
        j.write_text(text)
        with pytest.raises(RecipeError, match=f"must hold a JSON object, got {kind}"):
            resolve_recipe(str(j))


def test_export_checks_on_plugin_error_first(tiny):
    with pytest.raises(RecipeError, match="on_plugin_error must be 'raise' or 'skip', got 'Skip'"):
        sparsec.export(tiny, (torch.randint(0, 256, (1, 5)),), recipe="teal-40", on_plugin_error="Skip")


def test_zero_sparsity_compiles_densely(tiny):
    """sparsity 0 is valid and means no thresholds: the model compiles as it is, with a notice."""
    ids = torch.randint(0, 256, (2, 9))
    with pytest.warns(sparsec.SparsecNotice, match="no pass matched"), torch.no_grad():
        out = torch.compile(tiny, backend="sparsec", options={"recipe": at(sparsity=0.0), "dense_backend": "eager"})(ids)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, tiny(ids).logits)
    assert sparsec.calibrate(tiny, [ids], at(sparsity=0.0), progress=False).sites == {}


def test_calibrate_rejects_bad_batches(tiny):
    with pytest.raises(RecipeError, match="no calibration batches"):
        sparsec.calibrate(tiny, [], "teal-40")
    with pytest.raises(RecipeError, match="a calibration batch must be a tensor, a tuple of inputs or a dict, not str"):
        sparsec.calibrate(tiny, ["hello"], "teal-40", progress=False)

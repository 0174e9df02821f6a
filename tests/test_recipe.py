"""Recipe schema: parsing, all-at-once errors, YAML round trip, gradients, filters, precedence."""

from __future__ import annotations

import pytest
import yaml

from merge_engine.errors import RecipeError
from merge_engine.io.refs import ModelRef
from merge_engine.recipe import load_recipe, parse_recipe
from merge_engine.settings import MISSING, evaluate_setting, gradient_value, resolve

RECIPE = """
merge_method: ties
base_model: org/base@v1
models:
  - model: org/a
    parameters:
      weight: [0, 0.5, 1]
      density: 0.5
  - model: ./local/b
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - value: [1, 0]
parameters:
  normalize: true
  lambda: 0.7
dtype: bf16
out_dtype: float16
seed: 7
"""


def test_parse_and_round_trip():
    r = parse_recipe(yaml.safe_load(RECIPE))
    assert r.base_model == ModelRef("org/base", "v1")
    assert r.dtype == "bfloat16"  # alias normalised
    assert r.seed == 7
    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r
    text = r.to_yaml()
    assert text.index("merge_method") < text.index("models")
    assert "org/base@v1" in text


def test_recipe_is_frozen():
    r = parse_recipe(yaml.safe_load(RECIPE))
    with pytest.raises(Exception):
        r.merge_method = "linear"


def test_model_ref_forms():
    assert ModelRef.parse("a/b@rev+lora/x") == ModelRef("a/b", "rev", "lora/x")
    assert str(ModelRef.parse("a/b@rev+lora/x")) == "a/b@rev+lora/x"
    assert ModelRef.parse("/abs/path") == ModelRef("/abs/path")
    with pytest.raises(ValueError):
        ModelRef.parse("  ")


def test_every_schema_problem_reported_at_once():
    data = {"merge_method": "linear", "models": [{"model": "a", "paramters": {}}],
            "dtype": "float8", "colour": "red"}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    text = " | ".join(err.value.problems)
    assert len(err.value.problems) == 3
    assert "paramters" in text and "float8" in text and "colour" in text


@pytest.mark.parametrize("data, needle", [
    ({"merge_method": "linear"}, "exactly one of"),
    ({"merge_method": "linear", "models": [], }, "empty"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]},
     "layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                        {"model": "b", "layer_range": [0, 3]}]}]},
     "same number of layers"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": float("nan")}}]},
     "finite"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "base",
      "tokenizer": {"source": "base"}}, "mutually exclusive"),
    (["not", "a", "mapping"], "mapping"),
])
def test_bad_recipes(data, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(data)


def test_malformed_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def _reference_gradient(v, t):
    # written out independently: piecewise-linear interpolation between anchors
    n = len(v)
    if n == 1:
        return v[0]
    pos = t * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return v[lo] + (v[hi] - v[lo]) * frac


@pytest.mark.parametrize("values", [[0.0, 1.0], [0.2, 0.9, 0.1], [1, 2, 3, 4, 5], [0.5]])
@pytest.mark.parametrize("t", [0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0])
def test_gradient_matches_reference(values, t):
    assert gradient_value(values, t) == pytest.approx(_reference_gradient(values, t))


def test_gradient_of_non_numbers_takes_floor_index():
    assert gradient_value([True, False, True], 0.4) is True
    assert gradient_value([True, False, True], 0.5) is False
    assert gradient_value([True, False, True], 1.0) is True


def test_filters_first_match_wins_and_fall_through():
    r = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [
        {"filter": "mlp", "value": 0.1}, {"filter": "proj", "value": [0.0, 1.0]}]}}],
        "parameters": {"weight": 0.9}})
    model_params, top = r.models[0].parameters, r.parameters
    assert resolve([model_params, None, top], "weight", "layers.1.mlp.up_proj.weight", 0.5) == 0.1
    assert resolve([model_params, None, top], "weight", "layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    # no filter matches: falls through to the top level
    assert resolve([model_params, None, top], "weight", "model.norm.weight", 0.0) == 0.9
    assert resolve([model_params], "density", "x", 0.0) is MISSING
    assert evaluate_setting(model_params["weight"], "model.norm.weight", 0.0) is MISSING


def test_star_filter_matches_everything():
    r = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [
        {"filter": "*", "value": 0.4}]}}]})
    assert resolve([r.models[0].parameters], "weight", "anything", 0.3) == 0.4


def test_precedence_source_then_slice_then_top():
    r = parse_recipe({"merge_method": "linear", "parameters": {"weight": 3.0, "normalize": False},
                      "slices": [{"parameters": {"weight": 2.0},
                                  "sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                                              {"model": "b", "layer_range": [0, 2]}]}]})
    sl = r.slices[0]
    assert resolve([sl.sources[0].parameters, sl.parameters, r.parameters], "weight", "x", 0) == 1.0
    assert resolve([sl.sources[1].parameters, sl.parameters, r.parameters], "weight", "x", 0) == 2.0
    assert resolve([sl.parameters, r.parameters], "normalize", "x", 0) is False


def test_referenced_models_and_tokenizer_source():
    r = parse_recipe(yaml.safe_load(RECIPE))
    assert [str(m) for m in r.referenced_models()] == ["org/base@v1", "org/a", "./local/b"]
    assert r.tokenizer_model() == ModelRef("org/base", "v1")

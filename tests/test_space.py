"""Search spaces: validation lists every problem; FixedTrial → recipe for each space shape."""

from __future__ import annotations

import optuna
import pytest
import yaml
from fixtures import make_tiny_gpt2, make_tiny_llama

from evomerge.search.samplers import default_sampler
from evomerge.space import (SpaceError, distributions, equal_params, load_space, parse_space,
                            start_points, trial_recipe)
from merge_engine.recipe import MergeRecipe, parse_recipe
from merge_engine.settings import evaluate_setting
from merge_engine.validate import check_recipe

LAYERS = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("space_models")
    make_tiny_llama(d / "base", 0, num_layers=LAYERS)
    make_tiny_llama(d / "math", 1, perturb_from=d / "base")
    make_tiny_llama(d / "code", 2, perturb_from=d / "base")
    return d


def space_dict(zoo, **overrides):
    data = {
        "name": "t",
        "models": [{"name": "math", "model": str(zoo / "math")}, {"name": "code", "model": str(zoo / "code")}],
        "base_model": str(zoo / "base"),
        "method": "task_arithmetic",
        "eval": {"tasks": ["smoke_mc"], "limit": 8},
    }
    data.update(overrides)
    return data


def recipe_of(space, params=None) -> MergeRecipe:
    recipe = trial_recipe(space, optuna.trial.FixedTrial(params or equal_params(space)))
    assert not check_recipe(recipe).problems, check_recipe(recipe).problems
    # What we hand to mergekit must survive a YAML round trip unchanged.
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())) == recipe
    return recipe


def per_layer(setting, tensor: str) -> list:
    return [evaluate_setting(setting, tensor, i / (LAYERS - 1)) for i in range(LAYERS)]


# ---------------------------------------------------------------- validation
def test_every_problem_is_listed(zoo):
    with pytest.raises(SpaceError) as err:
        parse_space(space_dict(
            zoo, method=["tiess", "slerp"], layer_granularity=9,
            search={"weight": [-1, 1], "t": [0.5, 2.0]}, objectives=["score", "nope"],
            sampler="cmaes", pruning={"limit": 4}))
    text = "\n".join(err.value.problems)
    for expected in ("unknown merge_method 'tiess'; did you mean 'ties'",
                     "slerp merges exactly 1 model(s) besides a base, got 2",
                     "search: 'weight' is not a parameter of ['slerp']",
                     "t range [0.5, 2.0] leaves the valid range",
                     "layer_granularity 9 exceeds the model's 4 layers",
                     "objective 'nope' is neither 'score' nor a task",
                     "sampler cmaes optimizes one objective",
                     "pruning (cheap-first evaluation) works with one objective only"):
        assert expected in text, text
    assert len(err.value.problems) >= 8


def test_field_problems_are_listed_together(zoo):
    with pytest.raises(SpaceError) as err:
        parse_space(space_dict(zoo, models=[{"name": "1bad", "model": str(zoo / "math")},
                                            {"name": "x", "model": str(zoo / "missing")}],
                               layer_granularity=0, filters=["mlp", "mlp"], eval={"tasks": []}))
    text = "\n".join(err.value.problems)
    for expected in ("does not exist", "model name '1bad' must start with a letter",
                     "layer_granularity: Input should be greater than or equal to 1",
                     "repeat a name", "eval.tasks"):
        assert expected in text, text


def test_negative_weights_need_opt_in(zoo):
    with pytest.raises(SpaceError, match="allow_negative_weights"):
        parse_space(space_dict(zoo, search={"weight": [-0.5, 1.0]}))
    space = parse_space(space_dict(zoo, search={"weight": [-0.5, 1.0]}, allow_negative_weights=True))
    assert distributions(space)["math.weight"].low == -0.5


def test_load_space_expands_vars_and_reads_layers(zoo, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("# evomerge search s.yaml\n" + yaml.safe_dump(space_dict(zoo) | {
        "models": [{"name": "math", "model": "${ZOO}/math"}, "${ZOO}/code"], "base_model": "${ZOO}/base"}))
    space = load_space(path, variables={"ZOO": str(zoo)})
    assert space.num_layers == LAYERS
    assert [m.name for m in space.models] == ["math", "code"]
    assert space.models[1].model == str(zoo / "code")
    with pytest.raises(SpaceError, match=r"\$\{ZOO\} is not set"):
        load_space(path)


def test_eval_preset_with_overrides_and_report_eval(zoo, tmp_path):
    """``preset: NAME`` in eval/report_eval loads the preset's tasks; keys beside it override."""
    from evomerge.evaluate import load_preset

    medical = load_preset("medical")
    space = parse_space(space_dict(zoo, eval={"preset": "medical", "limit": 20},
                                   report_eval={"limit": None}, objectives="medqa_4options"))
    assert space.eval.tasks == medical.tasks and space.eval.limit == 20
    assert space.report_eval.tasks == medical.tasks and space.report_eval.limit is None
    # A preset file beside the space, named relative to it; report_eval's own preset wins.
    (tmp_path / "held_out.yaml").write_text("tasks: [smoke_gen:2]\nlimit: 5\n")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space_dict(zoo) | {"report_eval": {"preset": "held_out.yaml"}}))
    space = load_space(path)
    assert [(t.name, t.weight) for t in space.report_eval.tasks] == [("smoke_gen", 2.0)]
    assert space.report_eval.limit == 5 and space.eval.tasks[0].name == "smoke_mc"


def test_unknown_eval_preset_is_one_line(zoo):
    with pytest.raises(SpaceError) as err:
        parse_space(space_dict(zoo, eval={"preset": "medicall"}))
    assert len(err.value.problems) == 1
    assert "eval.preset: eval preset 'medicall' not found; available presets: [" in err.value.problems[0]


# ---------------------------------------------------------------- shapes
def test_single_method_scalars(zoo):
    space = parse_space(space_dict(zoo))
    assert set(distributions(space)) == {"math.weight", "code.weight", "lambda"}
    lam = distributions(space)["lambda"]
    assert (lam.low, lam.high) == (0.2, 1.2)  # the registry's search range, not a second table
    recipe = recipe_of(space, {"math.weight": 0.3, "code.weight": 0.7, "lambda": 0.5})
    assert recipe.merge_method == "task_arithmetic"
    assert str(recipe.base_model) == str(zoo / "base")
    assert [str(m.model) for m in recipe.models] == [str(zoo / "math"), str(zoo / "code")]
    assert recipe.models[0].parameters == {"weight": 0.3}
    assert recipe.parameters == {"lambda": 0.5}


def test_method_choice(zoo):
    space = parse_space(space_dict(zoo, method=["task_arithmetic", "ties", "linear"]))
    dists = distributions(space)
    assert dists["method"].choices == ("task_arithmetic", "ties", "linear")
    assert "math.density" in dists and "base.weight" in dists  # linear merges the base too
    ties = recipe_of(space, {**equal_params(space, "ties"), "math.density": 0.4})
    assert ties.merge_method == "ties" and ties.models[0].parameters["density"] == 0.4
    linear = recipe_of(space, equal_params(space, "linear"))
    assert linear.base_model is None and len(linear.models) == 3


def test_layer_groups_and_filters_give_exact_per_layer_values(zoo):
    space = parse_space(space_dict(zoo, layer_granularity=2, filters=["self_attn", "mlp"]))
    names = set(distributions(space))
    assert "layers_00_01.mlp.math.weight" in names and "layers_02_03.rest.code.weight" in names
    assert "lambda" in names  # global parameters stay one number unless asked
    params = equal_params(space)
    params.update({"layers_00_01.mlp.math.weight": 0.1, "layers_02_03.mlp.math.weight": 0.9,
                   "layers_02_03.self_attn.math.weight": 0.6, "layers_00_01.rest.math.weight": 0.2})
    weight = recipe_of(space, params).models[0].parameters["weight"]
    assert per_layer(weight, "model.layers.0.mlp.up_proj.weight") == [0.1, 0.1, 0.9, 0.9]
    assert per_layer(weight, "model.layers.0.self_attn.q_proj.weight")[2:] == [0.6, 0.6]
    assert per_layer(weight, "model.layers.0.input_layernorm.weight")[:2] == [0.2, 0.2]
    # outside the layer stack a gradient takes its first value (mergekit's rule)
    assert evaluate_setting(weight, "model.embed_tokens.weight", 0.0) == 0.2


def test_smooth_control_points(zoo):
    space = parse_space(space_dict(zoo, layer_granularity=2, smooth=True))
    assert {"layer_00.math.weight", "layer_03.math.weight"} <= set(distributions(space))
    params = {**equal_params(space), "layer_00.math.weight": 0.0, "layer_03.math.weight": 0.9}
    weight = recipe_of(space, params).models[0].parameters["weight"]
    assert weight == [0.0, 0.9]
    assert per_layer(weight, "x") == pytest.approx([0.0, 0.3, 0.6, 0.9])


def test_negative_weights_on_reach_the_recipe(zoo):
    space = parse_space(space_dict(zoo, allow_negative_weights=True))
    assert distributions(space)["math.weight"].low == -1.0
    recipe = recipe_of(space, {"math.weight": -0.4, "code.weight": 0.8, "lambda": 1.0})
    assert recipe.models[0].parameters["weight"] == -0.4
    off = parse_space(space_dict(zoo))
    assert distributions(off)["math.weight"].low == 0.0


def test_fixed_parameters_normalize_and_dtype(zoo):
    space = parse_space(space_dict(zoo, method="ties", search={"weight": [0.1, 0.9]},
                                   parameters={"density": 0.5}, normalize="search", dtype="bfloat16"))
    assert set(distributions(space)) == {"math.weight", "code.weight", "normalize"}
    recipe = recipe_of(space, {"math.weight": 0.5, "code.weight": 0.5, "normalize": False})
    assert recipe.parameters == {"density": 0.5, "normalize": False}
    assert recipe.dtype == "bfloat16"


def test_start_recipe_maps_back_to_params(zoo, tmp_path):
    space = parse_space(space_dict(zoo, layer_granularity=2, filters=["mlp"]))
    params = {name: round(0.1 + 0.03 * i, 4) for i, name in enumerate(distributions(space))}
    recipe = recipe_of(space, params)
    (tmp_path / "known.yaml").write_text(recipe.to_yaml())
    again = parse_space(space_dict(zoo, layer_granularity=2, filters=["mlp"],
                                   start=["equal", str(tmp_path / "known.yaml")]))
    (_, equal), (label, back) = start_points(again)
    assert back == pytest.approx(params) and label.startswith("recipe:")
    assert equal["layers_00_01.mlp.math.weight"] == 0.5


def test_every_example_space_loads(tmp_path):
    """search_spaces/*.yaml are valid against a zoo-shaped directory of tiny models."""
    import re
    from pathlib import Path

    spaces = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
    assert spaces
    names = {n for p in spaces for n in re.findall(r"\$\{ZOO\}/([A-Za-z0-9_]+)", p.read_text())}
    base = make_tiny_llama(tmp_path / "base", 0, num_layers=2)
    for n in names - {"base"}:
        make_tiny_llama(tmp_path / n, 1, perturb_from=base)
    for path in spaces:
        assert path.read_text().startswith("# evomerge "), f"{path.name} must start with its command"
        if "\nmoe:" in path.read_text():
            continue  # an MoE search space: tests/test_moe_search.py loads it
        space = load_space(path, variables={"ZOO": str(tmp_path)})
        recipe = trial_recipe(space, optuna.trial.FixedTrial(equal_params(space)))
        assert recipe.models or recipe.slices  # a layer-path space builds slices


def test_default_sampler_follows_the_space_size(zoo):
    from evomerge.search.samplers import GP_MAX_PARAMS

    small = parse_space(space_dict(zoo))
    assert len(distributions(small)) <= GP_MAX_PARAMS and default_sampler(small) == "gp"
    big = parse_space(space_dict(zoo, layer_granularity=1, filters=["self_attn", "mlp"]))
    assert len(distributions(big)) > GP_MAX_PARAMS and default_sampler(big) == "coarse-to-fine"
    assert default_sampler(parse_space(space_dict(zoo, sampler="tpe"))) == "tpe"


def test_gpt2_style_space_reads_n_layer_and_maps_recipes_back(tmp_path):
    """A GPT-2 config declares ``n_layer`` and its stack is ``transformer.h.N.``: the space reads
    the layer count and places start-recipe values on the model's own tensor names."""
    for name, seed in (("a", 1), ("b", 2)):
        make_tiny_gpt2(tmp_path / name, seed, num_layers=3)
    data = {"name": "g", "models": [str(tmp_path / "a"), str(tmp_path / "b")], "method": "linear",
            "layer_granularity": 1, "filters": ["attn"], "eval": {"tasks": ["smoke_mc"], "limit": 8}}
    space = parse_space(data)
    assert space.num_layers == 3
    params = {name: round(0.1 + 0.02 * i, 4) for i, name in enumerate(distributions(space))}
    recipe = trial_recipe(space, optuna.trial.FixedTrial(params))
    weight = recipe.models[0].parameters["weight"]
    assert evaluate_setting(weight, "transformer.h.2.attn.c_attn.weight", 1.0) == params["layers_02_02.attn.a.weight"]
    assert evaluate_setting(weight, "transformer.h.1.ln_1.weight", 0.5) == params["layers_01_01.rest.a.weight"]
    (tmp_path / "known.yaml").write_text(recipe.to_yaml())
    (_, back), = start_points(parse_space({**data, "start": str(tmp_path / "known.yaml")}))
    assert back == pytest.approx(params)

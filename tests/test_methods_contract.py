"""One contract every registered merge method satisfies (parametrised over the registry)."""

from __future__ import annotations

import inspect

import pytest
import torch

from merge_engine.errors import RecipeError, UnknownMethodError
from merge_engine.methods.registry import METHODS, get_method, method_names
from merge_engine.methods.spec import MethodSpec
from merge_engine.recipe import parse_recipe
from merge_engine.settings import MISSING, resolve
from methods_helpers import call, make_inputs, model_count, param_values, same_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANDOM = [s for s in METHODS if s.random]


def by_name(specs):
    return pytest.mark.parametrize("spec", specs, ids=[s.name for s in specs])


def base_choices(spec) -> list[bool]:
    return {"required": [True], "unused": [False], "optional": [True, False]}[spec.base]


def with_base_cases():
    return [pytest.param(s, b, id=f"{s.name}-{'base' if b else 'nobase'}")
            for s in METHODS for b in base_choices(s)]


# ---------------------------------------------------------------- registry
def test_registry_lists_every_method_once():
    names = method_names()
    assert names == [s.name for s in METHODS]
    assert len(set(names)) == len(names)
    assert set(names) >= set(CONTRACT)  # the documented methods (a new method needs no entry)
    for spec in METHODS:
        assert get_method(spec.name) is spec


def test_every_method_file_is_registered():
    """A MethodSpec written in a method file but not listed in the registry fails here."""
    import importlib
    import pkgutil

    import merge_engine.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name in ("registry", "spec"):
            continue
        module = importlib.import_module(f"merge_engine.methods.{info.name}")
        for value in vars(module).values():
            if isinstance(value, MethodSpec):
                assert value in METHODS, f"{info.name}.py declares {value.name}; list it in registry.py"


def test_unknown_method_suggests_close_names():
    with pytest.raises(UnknownMethodError) as err:
        get_method("dare_tie")
    msg = str(err.value)
    assert "\n" not in msg and "'dare_tie'" in msg and "'dare_ties'" in msg
    assert isinstance(err.value, RecipeError)
    with pytest.raises(UnknownMethodError, match="known methods: linear"):
        get_method("frobnicate")


def test_model_count_limits():
    limits = {s.name: (s.min_models, s.max_models) for s in METHODS}
    assert limits["slerp"] == (1, 1)
    assert limits["nuslerp"] == (2, 2)
    assert limits["passthrough"] == (1, 1)
    assert limits["model_stock"] == (2, None)
    assert all(lo >= 1 for lo, _ in limits.values())


# ---------------------------------------------------------------- declarations
CONTRACT = {  # docs/merge-semantics.md: base use, required parameters, defaults
    "linear": ("unused", {"weight"}, {"normalize": True}),
    "slerp": ("required", {"t"}, {}),
    "nuslerp": ("optional", {"weight"}, {"nuslerp_flatten": True, "nuslerp_row_wise": False}),
    "multislerp": ("optional", {"weight"}, {"normalize_weights": True, "eps": 1e-8}),
    "task_arithmetic": ("required", {"weight"}, {"lambda": 1.0, "normalize": False}),
    "ties": ("required", {"weight"}, {"normalize": True, "density": 1.0, "lambda": 1.0}),
    "dare_linear": ("required", {"weight"}, {"normalize": False, "rescale": True, "density": 1.0,
                                             "paper_rescale": False}),
    "dare_ties": ("required", {"weight"}, {"normalize": False, "rescale": True,
                                           "paper_rescale": False}),
    "breadcrumbs": ("required", {"weight"}, {"gamma": 0.01, "normalize": False, "density": 1.0}),
    "breadcrumbs_ties": ("required", {"weight"}, {"gamma": 0.01, "normalize": False}),
    "della": ("required", {"weight"}, {"epsilon": 0.15, "normalize": True, "rescale": True,
                                       "paper_rescale": False}),
    "della_linear": ("required", {"weight"}, {"epsilon": 0.15, "normalize": False,
                                              "rescale": True}),
    "model_stock": ("required", set(), {"filter_wise": False}),
    "sce": ("required", set(), {"select_topk": 1.0}),
    "karcher": ("unused", set(), {"max_iter": 10, "tol": 1e-5}),
    "passthrough": ("unused", set(), {"scale": 1.0}),
    "arcee_fusion": ("required", set(), {}),
    "nearswap": ("required", {"t"}, {}),
    "ram": ("required", set(), {"epsilon": 1e-5}),
    "ramplus_tl": ("required", set(), {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
}
PER_MODEL = {"weight", "density", "gamma", "epsilon", "scale"}
NOT_SEARCHED = {"eps", "tol", "max_iter"}  # numerical knobs, not merge hyper-parameters
# mergekit gives one name a second meaning here: RAM's epsilon is a global zero threshold (a
# numerical knob, not searched), DELLA's a per-model spread of keep probabilities
RAM_EPSILON = {("ram", "epsilon"), ("ramplus_tl", "epsilon")}


@pytest.mark.parametrize("name", list(CONTRACT))
def test_declaration_matches_the_contract(name):
    spec = get_method(name)
    base, required, defaults = CONTRACT[spec.name]
    assert spec.base == base
    assert {p.name for p in spec.params if p.required} == required
    for name, value in defaults.items():
        assert spec.param(name) is not None, f"{spec.name} lacks {name}"
        assert spec.param(name).default == value, f"{spec.name}.{name}"


@by_name(METHODS)
def test_per_model_parameters_are_the_known_ones(spec):
    for p in spec.params:
        assert p.per_model == (p.name in PER_MODEL and (spec.name, p.name) not in RAM_EPSILON), p.name


@by_name(METHODS)
def test_declared_ranges_are_consistent(spec):
    for p in spec.params:
        if p.required:
            assert p.default is None
        else:
            assert p.check(p.default) is None, f"{p.name} default {p.default!r}: {p.check(p.default)}"
        if p.kind == "bool":
            assert p.low is None and p.high is None and p.search is None
            continue
        assert p.low is not None and p.high is not None and p.low < p.high, p.name
        if p.name in NOT_SEARCHED or (spec.name, p.name) in RAM_EPSILON:
            assert p.search is None, f"{spec.name}.{p.name} is a numerical knob"
            continue
        assert p.search is not None, f"{spec.name}.{p.name} has no search range"
        lo, hi = p.search
        assert lo < hi and p.check(lo) is None and p.check(hi) is None, p.name


def test_same_parameter_name_means_the_same_thing_everywhere():
    seen = {}
    for spec in METHODS:
        for p in spec.params:
            if (spec.name, p.name) in RAM_EPSILON:
                continue
            key = (p.per_model, p.kind, p.low, p.high)
            assert seen.setdefault(p.name, key) == key, f"{p.name} declared differently in {spec.name}"


@by_name(METHODS)
def test_function_takes_exactly_the_declared_keywords_without_defaults(spec):
    sig = inspect.signature(spec.fn)
    params = list(sig.parameters.values())
    assert [p.name for p in params[:2]] == ["tensors", "base"]
    keywords = {p.name: p for p in params[2:]}
    expected = {p.kwarg for p in spec.params} | ({"rng"} if spec.random else set())
    assert set(keywords) == expected
    for p in keywords.values():
        # the spec is the only place a default lives
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty


# ---------------------------------------------------------------- shape, dtype
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(8, 12), (20,)], ids=["matrix", "vector"])
@pytest.mark.parametrize("spec,with_base", with_base_cases())
def test_output_keeps_shape_and_dtype(spec, with_base, shape, dtype):
    n = model_count(spec)
    tensors, base = make_inputs(spec, n, shape, dtype=dtype, with_base=with_base)
    out = call(spec, tensors, base, param_values(spec, n))
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- reproduction
@pytest.mark.parametrize("spec,with_base", with_base_cases())
def test_one_hot_weights_reproduce_a_model(spec, with_base):
    """One-hot weights give that model; t=1 / t=0 give the ends; weightless methods, given
    identical models, give that model back."""
    n = model_count(spec)
    tensors, base = make_inputs(spec, n, with_base=with_base)
    if spec.param("weight") is not None:
        pick = 1 if n > 1 else 0
        one_hot = [1.0 if i == pick else 0.0 for i in range(n)]
        out = call(spec, tensors, base, param_values(spec, n, active=False, weight=one_hot))
        torch.testing.assert_close(out, tensors[pick], atol=1e-5, rtol=1e-5)
    elif spec.param("t") is not None:
        for t, want in ((1.0, tensors[0]), (0.0, base)):
            out = call(spec, tensors, base, param_values(spec, n, active=False, t=t))
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    else:
        copies = [tensors[0].clone() for _ in range(n)]
        if spec.name == "arcee_fusion":  # takes only outlying changes: reproduces a model equal to the base
            base = tensors[0].clone()
        out = call(spec, copies, base, param_values(spec, n, active=False))
        torch.testing.assert_close(out, tensors[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- determinism
@by_name(METHODS)
def test_same_seed_gives_same_bytes(spec):
    n = model_count(spec)
    tensors, base = make_inputs(spec, n)
    params = param_values(spec, n)
    torch.manual_seed(1)
    first = call(spec, tensors, base, params, seed=7)
    torch.manual_seed(2)  # the global RNG must play no part
    torch.rand(5)
    second = call(spec, tensors, base, params, seed=7)
    assert same_bytes(first, second)


@by_name(RANDOM)
def test_different_seed_or_tensor_gives_different_masks(spec):
    n = model_count(spec)
    tensors, base = make_inputs(spec, n, (16, 32))
    params = param_values(spec, n)
    ref = call(spec, tensors, base, params, seed=7)
    for other in (call(spec, tensors, base, params, seed=8),
                  call(spec, tensors, base, params, seed=7, name="model.layers.1.mlp.down_proj.weight")):
        assert (ref != other).float().mean() > 0.1


@by_name([s for s in METHODS if s.param("weight") is not None and s.max_models is None])
def test_adding_a_zero_weight_model_changes_nothing(spec):
    """Each model's masks come from its own stream: processing an extra model (index 2)
    leaves models 0 and 1 untouched."""
    tensors, base = make_inputs(spec, 3, with_base=spec.base == "required")
    two = call(spec, tensors[:2], base, param_values(spec, 2, weight=[0.4, 0.6]), seed=3)
    three = call(spec, tensors, base, param_values(spec, 3, weight=[0.4, 0.6, 0.0]), seed=3)
    assert same_bytes(two, three)


@pytest.mark.parametrize("spec,with_base", with_base_cases())
def test_thread_count_does_not_change_bytes(spec, with_base):
    n = model_count(spec, 2)
    # 34k entries: above torch's 32k grain size, so reductions really run in parallel
    tensors, base = make_inputs(spec, n, (34, 1024), with_base=with_base)
    params = param_values(spec, n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(spec, tensors, base, params, seed=5)
        torch.set_num_threads(2)
        two = call(spec, tensors, base, params, seed=5)
    finally:
        torch.set_num_threads(threads)
    assert same_bytes(one, two)


# ---------------------------------------------------------------- defaults
def _recipe(spec, n: int, per_model: list[dict], top: dict):
    data = {"merge_method": spec.name,
            "models": [{"model": f"org/m{i}", "parameters": per_model[i]} for i in range(n)],
            "parameters": top}
    if spec.base != "unused":
        data["base_model"] = "org/base"
    return parse_recipe(data)


def _resolved(spec, recipe, tensor_name: str) -> dict:
    """Parameter values for one tensor, looked up the way the planner does."""
    values = {}
    for p in spec.params:
        if p.per_model:
            found = [resolve((m.parameters, None, recipe.parameters), p.name, tensor_name, 0.0)
                     for m in recipe.models]
            values[p.name] = [p.default if v is MISSING else v for v in found]
        else:
            v = resolve((None, recipe.parameters), p.name, tensor_name, 0.0)
            values[p.name] = p.default if v is MISSING else v
    return values


@by_name(METHODS)
def test_defaults_omitted_equal_defaults_written_out(spec):
    n = model_count(spec)
    tensors, base = make_inputs(spec, n)
    required = param_values(spec, n)
    sparse_models = [{p.name: required[p.name][i] for p in spec.params if p.per_model and p.required}
                     for i in range(n)]
    sparse_top = {p.name: required[p.name] for p in spec.params if not p.per_model and p.required}
    full_models = [{p.name: (p.default if not p.required else required[p.name][i])
                    for p in spec.params if p.per_model} for i in range(n)]
    full_top = {p.name: (p.default if not p.required else required[p.name])
                for p in spec.params if not p.per_model}
    name = "model.layers.0.self_attn.q_proj.weight"
    omitted = _resolved(spec, _recipe(spec, n, sparse_models, sparse_top), name)
    written = _resolved(spec, _recipe(spec, n, full_models, full_top), name)
    assert omitted == written
    assert same_bytes(call(spec, tensors, base, omitted), call(spec, tensors, base, written))


@by_name([s for s in METHODS if s.param("int8_mask") is not None])
def test_int8_mask_changes_no_numbers(spec):
    n = model_count(spec)
    tensors, base = make_inputs(spec, n)
    off = call(spec, tensors, base, param_values(spec, n, int8_mask=False))
    on = call(spec, tensors, base, param_values(spec, n, int8_mask=True))
    assert same_bytes(off, on)


@by_name([s for s in METHODS if s.param("epsilon") is not None and s.param("density") is not None])
def test_della_search_box_corners_are_valid_merges(spec):
    """density +/- epsilon must stay in (0, 1): the default search ranges never leave it."""
    n = model_count(spec)
    tensors, base = make_inputs(spec, n)
    for d in spec.param("density").search:
        for e in spec.param("epsilon").search:
            out = call(spec, tensors, base, param_values(spec, n, density=d, epsilon=e))
            assert torch.isfinite(out).all()


@by_name(METHODS)
def test_input_problems_follow_the_declared_limits(spec):
    for n in range(5):
        for has_base in (True, False):
            problems = spec.input_problems(n, has_base)
            too_few_or_many = n < spec.min_models or (spec.max_models is not None and n > spec.max_models)
            missing_base = spec.base == "required" and not has_base
            assert len(problems) == too_few_or_many + missing_base, (n, has_base, problems)
            assert all("\n" not in p and p.startswith(spec.name) for p in problems)


def test_input_problems_wording():
    assert get_method("slerp").input_problems(2, True, fix_count="X") == [
        "slerp merges exactly 1 model(s) besides a base, got 2; X"]
    assert get_method("ties").input_problems(1, False, add_base="Y") == ["ties needs a base_model; Y"]
    assert get_method("model_stock").input_problems(1, True) == [
        "model_stock merges at least 2 model(s) besides a base, got 1; adjust the models listed"]
    assert get_method("linear").input_problems(0, True) == [
        "linear merges at least 1 model(s), got 0; adjust the models listed"]

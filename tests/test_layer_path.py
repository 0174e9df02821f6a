"""Layer-path (data-flow) spaces: genes with FixedTrial, bad paths rejected early, the folded
residual scales proven against an independent hook-based model, and depth-changing in-memory
applies equal to merge-to-disk-then-load."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch
import yaml
from fixtures import make_tiny_llama

from evomerge.candidate import Candidate, load_causal_lm
from evomerge.space import SpaceError, distributions, equal_params, parse_space, trial_recipe
from evomerge.space.layer_path import LayerPathError, path_of
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe
from merge_engine.validate import check_recipe

LAYERS = 3
IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 44, 7, 100]])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("path_models")
    make_tiny_llama(d / "base", 0, num_layers=LAYERS)
    make_tiny_llama(d / "math", 1, perturb_from=d / "base", scale=0.05)
    make_tiny_llama(d / "code", 2, perturb_from=d / "base", scale=0.05)
    return d


def space_of(zoo, **layer_path):
    return parse_space({
        "name": "path", "method": "passthrough",
        "models": [{"name": "math", "model": str(zoo / "math")}, {"name": "code", "model": str(zoo / "code")}],
        "layer_path": layer_path, "eval": {"tasks": ["smoke_mc"], "limit": 8},
    })


def genes(space, used: list[int], **scales) -> dict:
    """Params turning on the slots ``used`` (window 1), scales by ``a_b=value``."""
    params = {name: False for name in distributions(space) if name.endswith(".use")}
    params.update({f"slot_{i:03d}.use": True for i in used})
    params.update({f"scale.{k.replace('_', '->')}": v for k, v in scales.items()})
    return params


# slots with repeats=2 over math (0..2) then code (3..5): 0-5 repeat 0, 6-11 repeat 1
PATH = [0, 1, 4, 7, 8]          # math0 math1 | code1 | math1 math2
SCALES = {"math_code": 1.7, "code_math": 0.6}


def test_genes_are_named_and_counted(zoo):
    space = space_of(zoo, repeats=2, max_layers=8)
    dists = distributions(space)
    assert sorted(n for n in dists if n.startswith("scale.")) == ["scale.code->math", "scale.math->code"]
    assert [n for n in dists if n.endswith(".use")] == [f"slot_{i:03d}.use" for i in range(12)]
    windowed = distributions(space_of(zoo, repeats=2, window=4, scale=False))
    assert list(windowed) == ["slots_000_003.use", "slots_004_007.use", "slots_008_011.use"]


def test_fixed_trial_builds_a_passthrough_slices_recipe_with_folded_scales(zoo):
    space = space_of(zoo, repeats=2)
    trial = optuna.trial.FixedTrial(genes(space, PATH, **SCALES))
    recipe = trial_recipe(space, trial)
    assert not check_recipe(recipe).problems
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())) == recipe  # what mergekit reads
    ranges = [(str(s.sources[0].model).rsplit("/", 1)[-1], s.sources[0].layer_range) for s in recipe.slices]
    assert ranges == [("math", (0, 2)), ("code", (1, 2)), ("math", (1, 3))]
    scales = [s.parameters and s.parameters["scale"] for s in recipe.slices]
    assert scales[0] is None
    assert [(e.filter, e.value) for e in scales[1]] == [
        ("mlp.down_proj", 1 / 1.7), ("self_attn.o_proj", 1 / 1.7), (None, 1.0)]
    assert scales[2][0].value == 1 / (1.7 * 0.6)
    assert trial.user_attrs["layers"] == 5
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # attention, MLP, two norms
    assert trial.user_attrs["params"] == 2 * 128 * 64 + 64 + 5 * per_layer  # + embeddings, norm, head


@pytest.mark.parametrize("used, words", [([], "empty"), (list(range(9)), "over max_layers 8")])
def test_bad_paths_are_one_line_before_any_tensor(zoo, monkeypatch, used, words):
    from merge_engine.io.reader import CheckpointReader

    space = space_of(zoo, repeats=2, max_layers=8)
    distributions(space)  # headers are read (cached) when the space's genes are listed
    monkeypatch.setattr(CheckpointReader, "get", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(LayerPathError, match=words) as err:
        trial_recipe(space, optuna.trial.FixedTrial(genes(space, used, math_code=1.0, code_math=1.0)))
    assert "\n" not in str(err.value)


def test_a_bad_path_fails_its_trial_and_the_search_goes_on(zoo):
    from optuna.trial import TrialState

    from evomerge.search.loop import tell_outcome

    space = space_of(zoo, max_layers=2)
    study = optuna.create_study()
    study.enqueue_trial(genes(space, []))
    trial = study.ask()
    assert tell_outcome(study, trial, space, None, None) == TrialState.FAIL
    assert "empty" in study.trials[0].user_attrs["error"]


def test_space_rules(zoo):
    with pytest.raises(SpaceError) as err:
        parse_space({"method": "linear", "models": [str(zoo / "math")], "search": {"weight": [0, 1]},
                     "layer_path": {"scale": [0.0, 2.0]}, "eval": {"tasks": ["smoke_mc"]}})
    text = str(err.value)
    assert "0 < low" in text
    with pytest.raises(SpaceError) as err:
        parse_space({"method": "linear", "models": [str(zoo / "math")], "search": {"weight": [0, 1]},
                     "layer_path": {}, "eval": {"tasks": ["smoke_mc"]}})
    assert "method: passthrough" in str(err.value) and "search does not apply" in str(err.value)


# ---------------------------------------------------------------- the fold, proven
def _hooked_reference(zoo, path, scales, eps_of=None):
    """An independent model of the scaled path: the source layers stacked by hand (float64) with
    forward pre-hooks that multiply the hidden state at each transition; ``eps_of(k)`` sets the
    norms' epsilon of path position k (the final norm is position len(path))."""
    models = {n: load_causal_lm(zoo / n, dtype="float32")[0].double() for n in ("math", "code")}
    order = [("math", i) if i < 3 else ("code", i - 3) for i in range(6)] * 2
    steps = [order[i] for i in path]
    ref = copy.deepcopy(models[steps[0][0]])
    ref.model.layers = torch.nn.ModuleList(copy.deepcopy(models[m].model.layers[l]) for m, l in steps)
    ref.model.norm = copy.deepcopy(models[steps[-1][0]].model.norm)
    ref.lm_head = copy.deepcopy(models[steps[-1][0]].lm_head)
    ref.config.num_hidden_layers = len(steps)
    for k, (layer, (m, _)) in enumerate(zip(ref.model.layers, steps)):
        prev = steps[k - 1][0] if k else m
        if prev != m:
            factor = scales[f"{prev}_{m}"]
            layer.register_forward_pre_hook(
                lambda mod, args, kwargs, f=factor: ((args[0] * f, *args[1:]), kwargs), with_kwargs=True)
        if eps_of is not None:
            layer.input_layernorm.variance_epsilon = layer.post_attention_layernorm.variance_epsilon = eps_of(k)
    if eps_of is not None:
        ref.model.norm.variance_epsilon = eps_of(len(steps))
    return ref.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _folded_and_exact(zoo, scales):
    space = space_of(zoo, repeats=2, scale=[0.25, 4.0])
    values = genes(space, PATH, **scales)
    recipe = trial_recipe(space, optuna.trial.FixedTrial(values))
    with Candidate.load(zoo / "math", dtype="float32") as cand:
        cand.apply(recipe)
        folded = _logits(cand.model.double())
        eps = cand.model.config.rms_norm_eps
    products = [1 / f for _, f in path_of(space, values)]  # P_k per path position
    exact = _hooked_reference(zoo, PATH, scales, lambda k: eps * products[min(k, len(PATH) - 1)] ** 2)
    return folded, _logits(exact), eps, products


def test_folded_power_of_two_scales_are_bit_exact(zoo):
    """Scales that are powers of two scale weights and norms without rounding: the fold is exact."""
    folded, ref, _, _ = _folded_and_exact(zoo, {"math_code": 2.0, "code_math": 0.25})
    assert torch.equal(folded, ref)


def test_folded_scales_equal_scaled_hidden_states(zoo):
    """The folded passthrough recipe equals the hook reference exactly (float64 forward) once each
    norm's epsilon is multiplied by P_k**2 (norm(x, eps) == norm(P*x, eps*P**2)), and with the
    true epsilon within its first-order bound."""
    folded, ref, eps, products = _folded_and_exact(zoo, SCALES)
    # the folded weights were scaled in float32 (one rounding, 6e-8 relative; the norms compute in
    # float32 too): 1e-6 of the logits' size leaves room for ~10 layers of that rounding
    assert (folded - ref).abs().max() <= 1e-6 * ref.abs().max()
    unscaled = _logits(_hooked_reference(zoo, PATH, {k: 1.0 for k in SCALES}))
    assert (unscaled - ref).abs().max() > 1e-2 * ref.abs().max()  # the scales do matter
    # True epsilon: each norm's output moves by at most d = max |sqrt((m+eps*P^2)/(m+eps)) - 1|
    # over its inputs' mean squares m (in the scaled reference); the logits move by at most (number of norms) * d of their
    # size to first order (each norm's relative change passes through the rest once).
    true = _hooked_reference(zoo, PATH, SCALES)
    squares: list[tuple[float, float]] = []
    for k, layer in enumerate([*true.model.layers, true.model.norm]):
        p = products[min(k, len(PATH) - 1)]
        norms = [layer] if k == len(PATH) else [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            norm.register_forward_pre_hook(
                lambda mod, args, p=p: squares.append((args[0].pow(2).mean(-1).min().item(), p)))
    got = _logits(true)
    d = max(abs(((m + eps * p**2) / (m + eps)) ** 0.5 - 1) for m, p in squares)
    assert 0 < (got - folded).abs().max() <= len(squares) * d * got.abs().max()


# ---------------------------------------------------------------- depth changes in memory
def test_in_memory_depth_changes_equal_disk_merges(zoo, tmp_path):
    space = space_of(zoo, repeats=2)
    paths = [PATH, [3, 4], [0, 1, 2], [0, 4, 5, 6, 9, 10, 11]]
    recipes = [trial_recipe(space, optuna.trial.FixedTrial(genes(space, p, math_code=1.3, code_math=0.8)))
               for p in paths]
    with Candidate.load(zoo / "math", dtype="float32") as cand:
        for i, recipe in enumerate(recipes):
            cand.apply(recipe)
            out = tmp_path / f"m{i}"
            run_merge(recipe, out, device="cpu")
            disk, _ = load_causal_lm(out, dtype="float32")
            assert cand.model.config.num_hidden_layers == disk.config.num_hidden_layers == len(paths[i])
            assert torch.equal(_logits(cand.model), _logits(disk)), f"path {paths[i]}"
    source, _ = load_causal_lm(zoo / "math", dtype="float32")
    # the identity path (the start point 'equal') is the first model itself, bit for bit
    identity = trial_recipe(space, optuna.trial.FixedTrial(equal_params(space)))
    with Candidate.load(zoo / "code", dtype="float32") as cand:
        cand.apply(recipes[0])
        cand.apply(identity)
        assert torch.equal(_logits(cand.model), _logits(source))


@pytest.mark.parametrize("kind", ["gpt2", "tied_llama"])
def test_depth_changes_on_other_layouts_equal_disk_merges(kind, tmp_path):
    """GPT-2's transformer.h stack (n_layer) and tied embeddings grow and shrink like Llama."""
    from fixtures import make_tiny_gpt2

    if kind == "gpt2":
        a = make_tiny_gpt2(tmp_path / "a", num_layers=2)
        b = a
    else:
        a = make_tiny_llama(tmp_path / "a", 0, num_layers=2, tie=True)
        b = make_tiny_llama(tmp_path / "b", 1, perturb_from=a, scale=0.05)
    stacks = [[(a, 0, 2), (b, 1, 2), (a, 0, 2)], [(b, 1, 2)], [(a, 0, 1), (b, 0, 2)]]
    with Candidate.load(a, dtype="float32") as cand:
        for i, stack in enumerate(stacks):
            recipe = parse_recipe({"merge_method": "passthrough", "slices": [
                {"sources": [{"model": str(m), "layer_range": [lo, hi]}]} for m, lo, hi in stack]})
            cand.apply(recipe)
            run_merge(recipe, tmp_path / f"m{i}", device="cpu")
            disk, _ = load_causal_lm(tmp_path / f"m{i}", dtype="float32")
            assert torch.equal(_logits(cand.model), _logits(disk)), f"{kind} stack {i}"

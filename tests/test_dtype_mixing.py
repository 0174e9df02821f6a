"""Inputs of different dtypes and no recipe ``dtype``: merged in their promoted dtype, as mergekit
0.1.5 promotes (each tensor's inputs, base included, cast to ``torch.promote_types`` of theirs),
written in it unless ``out_dtype`` says otherwise; the same on disk, in memory and across stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures import load_state, make_tiny_llama
from merge_engine.apply import InMemoryMerger
from merge_engine.merge import run_merge
from merge_engine.multistage import run_stages
from merge_engine.recipe import parse_recipe
from merge_engine.methods.registry import get_method
from merge_engine.stages import parse_stages

METHODS = [
    ("linear", {"weight": 0.5}, None),
    ("slerp", {}, {"t": 0.3}),
    ("ties", {"weight": 0.6, "density": 0.5}, None),
    ("task_arithmetic", {"weight": 0.7}, None),
    ("dare_linear", {"weight": 0.5, "density": 0.6}, None),
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base, a float32 and a float16 model perturbed from it."""
    root = tmp_path_factory.mktemp("dtypezoo")
    small = {"num_layers": 2, "hidden": 32, "intermediate": 64}
    base = make_tiny_llama(root / "base", seed=0, dtype=torch.bfloat16, **small)
    return {"base": base,
            "f32": make_tiny_llama(root / "f32", seed=1, perturb_from=base),
            "f16": make_tiny_llama(root / "f16", seed=2, perturb_from=base, dtype=torch.float16),
            "b16": make_tiny_llama(root / "b16", seed=3, perturb_from=base, dtype=torch.bfloat16)}


def recipe(zoo, method, params, top, models=("f32",), **extra):
    data = {"merge_method": method, "seed": 3,
            "models": [{"model": str(zoo[m]), "parameters": dict(params)} for m in models]}
    if get_method(method).base != "unused":  # an unlisted base would be merged in as one more input
        data["base_model"] = str(zoo["base"])
    if method == "slerp":  # slerp takes the base as one of its two inputs
        data["models"].insert(0, {"model": str(zoo["base"])})
    if top:
        data["parameters"] = top
    return parse_recipe({**data, **extra})


@pytest.mark.parametrize("method,params,top", METHODS, ids=[m[0] for m in METHODS])
def test_mixed_inputs_merge_in_the_promoted_dtype(zoo, tmp_path, method, params, top):
    unset, cast = tmp_path / "unset", tmp_path / "cast"
    run_merge(recipe(zoo, method, params, top), unset, device="cpu")
    # bf16 with float32 promotes to float32: the same as casting every input to float32 on load
    run_merge(recipe(zoo, method, params, top, dtype="float32"), cast, device="cpu")
    got, want = load_state(unset), load_state(cast)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
    assert json.loads((unset / "config.json").read_text())["torch_dtype"] == "float32"


def test_bf16_with_fp16_promotes_to_float32_and_out_dtype_still_rules(zoo, tmp_path):
    out, half = tmp_path / "out", tmp_path / "half"
    run_merge(recipe(zoo, "linear", {"weight": 0.5}, None, models=("f16", "b16")), out, device="cpu")
    state = load_state(out)
    assert {t.dtype for t in state.values()} == {torch.float32}  # promote_types(bf16, fp16)
    f16, b16 = load_state(zoo["f16"]), load_state(zoo["b16"])
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, 0.5 * f16[name].float() + 0.5 * b16[name].float(), rtol=0, atol=1e-6)
    run_merge(recipe(zoo, "linear", {"weight": 0.5}, None, models=("f16", "b16"), out_dtype="float16"),
              half, device="cpu")
    for name, tensor in load_state(half).items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, state[name].half()), name
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"


def test_inputs_of_one_dtype_keep_it(zoo, tmp_path):
    out = tmp_path / "out"
    run_merge(recipe(zoo, "ties", {"weight": 0.5, "density": 0.5}, None, models=("b16",)), out, device="cpu")
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("method,params,top", METHODS[:3], ids=[m[0] for m in METHODS[:3]])
def test_mixed_inputs_in_memory_equal_disk(zoo, tmp_path, method, params, top):
    from transformers import AutoModelForCausalLM

    r = recipe(zoo, method, params, top)
    run_merge(r, tmp_path / "disk", device="cpu")
    from_disk = load_state(tmp_path / "disk")
    model = AutoModelForCausalLM.from_pretrained(zoo["f32"], dtype=torch.float32)
    with InMemoryMerger(model) as merger:
        merger.apply(r)
    state = model.state_dict()
    for name, tensor in from_disk.items():
        assert torch.equal(state[name], tensor), name


def test_a_bf16_intermediate_mixed_with_float32_in_a_later_stage(zoo, tmp_path):
    stages = [
        {"name": "first", "merge_method": "linear", "out_dtype": "bfloat16",
         "models": [{"model": str(zoo["f32"]), "parameters": {"weight": 0.4}},
                    {"model": str(zoo["base"]), "parameters": {"weight": 0.6}}]},
        {"merge_method": "slerp", "base_model": "first", "parameters": {"t": 0.25},
         "models": [{"model": "first"}, {"model": str(zoo["f32"])}]},
    ]
    out = tmp_path / "out"
    run_stages(parse_stages(stages), out, device="cpu")  # the intermediate is kept in memory
    first, second = tmp_path / "first", tmp_path / "second"
    run_merge(parse_recipe({k: v for k, v in stages[0].items() if k != "name"}), first, device="cpu")
    later = {**stages[1], "base_model": str(first),
             "models": [{"model": str(first)}, {"model": str(zoo["f32"])}]}
    run_merge(parse_recipe(later), second, device="cpu")
    got, want = load_state(out), load_state(second)
    assert {t.dtype for t in got.values()} == {torch.float32}
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

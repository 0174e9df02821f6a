"""Recipes mergekit-evolve writes (best_config.yaml) load unchanged and merge: per-slice base_model,
the normalize/int8_mask it adds for every method, weight on slerp sources.

The files below are written as mergekit-evolve's genotype_merge_config(...).to_yaml() lays them
out (keys sorted, references as strings, defaults left out); expected tensors come from an
independent slerp written here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import load_state, make_tiny_llama
from merge_engine.apply import InMemoryMerger
from merge_engine.merge import run_merge
from merge_engine.recipe import load_recipe, parse_recipe
from merge_engine.session import validate

SLERP_BEST = """\
dtype: bfloat16
merge_method: slerp
parameters:
  int8_mask: true
  normalize: false
slices:
- base_model: {a}
  parameters:
    t: 0.3
  sources:
  - layer_range: [0, 2]
    model: {a}
    parameters:
      weight: 0.7
  - layer_range: [0, 2]
    model: {b}
    parameters:
      weight: 0.3
- base_model: {b}
  parameters:
    t: 0.6
  sources:
  - layer_range: [2, 4]
    model: {b}
  - layer_range: [2, 4]
    model: {a}
"""

TIES_BEST = """\
base_model: {base}
dtype: bfloat16
merge_method: ties
parameters:
  int8_mask: true
  normalize: true
slices:
- sources:
  - layer_range: [0, 2]
    model: {a}
    parameters:
      density:
      - filter: self_attn
        value: 0.4
      - value: 0.9
      weight:
      - filter: self_attn
        value: 0.2
      - value: 0.5
  - layer_range: [0, 2]
    model: {b}
    parameters:
      density: 0.7
      weight: 0.6
  - layer_range: [0, 2]
    model: {base}
- sources:
  - layer_range: [2, 4]
    model: {a}
    parameters:
      density: 0.3
      weight: 0.1
  - layer_range: [2, 4]
    model: {b}
    parameters:
      density: 1.0
      weight: 0.8
  - layer_range: [2, 4]
    model: {base}
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evozoo")
    base = make_tiny_llama(root / "base", seed=0, num_layers=4)
    return {"base": base, "a": make_tiny_llama(root / "a", seed=1, perturb_from=base, scale=0.05),
            "b": make_tiny_llama(root / "b", seed=2, perturb_from=base, scale=0.05)}


def _slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from v0 towards v1 of the flattened tensors, in float32."""
    x0, x1 = v0.float(), v1.float()
    cos = (x0.flatten() / x0.norm()) @ (x1.flatten() / x1.norm())
    if abs(cos) > 0.9995:
        return (1 - t) * x0 + t * x1
    angle = torch.arccos(cos)
    return (torch.sin((1 - t) * angle) * x0 + torch.sin(t * angle) * x1) / torch.sin(angle)


def _write(tmp_path: Path, text: str, zoo) -> Path:
    path = tmp_path / "best_config.yaml"
    path.write_text(text.format(**{k: str(v) for k, v in zoo.items()}))
    return path


def test_slerp_best_config_uses_each_slices_base(zoo, tmp_path):
    path = _write(tmp_path, SLERP_BEST, zoo)
    report = validate(path)
    assert report.ok, report.problems
    # what mergekit ignores is named, not refused
    assert any("'int8_mask' is not a parameter of slerp" in w for w in report.warnings)
    assert any("'weight' is not a parameter of slerp" in w for w in report.warnings)
    recipe = load_recipe(path)
    assert [str(s.base_model) for s in recipe.slices] == [str(zoo["a"]), str(zoo["b"])]
    assert parse_recipe(recipe.to_dict()) == recipe  # and it dumps back to the same recipe

    out = tmp_path / "out"
    run_merge(recipe, out, device="cpu")
    merged = load_state(out)
    a, b = load_state(zoo["a"]), load_state(zoo["b"])
    bf = {name: t.to(torch.bfloat16) for name, t in a.items()}, {name: t.to(torch.bfloat16) for name, t in b.items()}

    def expected(name: str) -> torch.Tensor:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        # layers 0-1 and the embeddings: slice 0 (base a, t=.3); layers 2-3, norm, head: slice 1
        first = (layer is not None and layer < 2) or "embed_tokens" in name
        v0, v1, t = (bf[0][name], bf[1][name], 0.3) if first else (bf[1][name], bf[0][name], 0.6)
        return _slerp(v0, v1, t).to(torch.bfloat16)

    assert set(merged) == set(a)
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, expected(name), msg=name)
    # the swap of base per slice matters: slice 1 differs from slerp(a -> b, .6)
    name = "model.layers.3.mlp.up_proj.weight"
    assert not torch.allclose(merged[name].float(), _slerp(bf[0][name], bf[1][name], 0.6), atol=1e-3)


def test_slerp_best_config_in_memory_equals_disk(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    text = SLERP_BEST.replace("dtype: bfloat16\n", "")  # the resident model is float32
    recipe = load_recipe(_write(tmp_path, text, zoo))
    out = tmp_path / "disk"
    run_merge(recipe, out, device="cpu")
    from_disk = AutoModelForCausalLM.from_pretrained(out).state_dict()
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    with InMemoryMerger(model) as merger:
        merger.apply(recipe)
    for name, value in model.state_dict().items():
        assert torch.equal(value, from_disk[name]), name


def test_ties_best_config_with_filters_loads_and_merges(zoo, tmp_path):
    path = _write(tmp_path, TIES_BEST, zoo)
    report = validate(path)
    assert report.ok and not report.warnings, (report.problems, report.warnings)  # ties takes both
    out = tmp_path / "out"
    result = run_merge(load_recipe(path), out, device="cpu")
    assert result.tensors == len(load_state(zoo["base"]))
    assert (out / "evomerge_recipe.yaml").is_file()


def test_slice_base_must_be_among_its_sources(zoo):
    data = {"merge_method": "slerp", "slices": [{
        "base_model": str(zoo["base"]), "parameters": {"t": 0.5},
        "sources": [{"model": str(zoo["a"]), "layer_range": [0, 4]},
                    {"model": str(zoo["b"]), "layer_range": [0, 4]}]}]}
    report = validate(parse_recipe(data), with_models=False)
    assert any(f"slices[0] does not list the base model {zoo['base']}" in p for p in report.problems)


def test_unknown_parameter_names_stay_problems(zoo):
    data = {"merge_method": "slerp", "parameters": {"tt": 0.5}, "base_model": str(zoo["a"]),
            "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]}
    report = validate(parse_recipe(data), with_models=False)
    assert any("unknown parameter 'tt' for slerp" in p for p in report.problems)

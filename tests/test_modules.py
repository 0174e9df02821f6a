"""``modules:`` recipes on tiny real multi-module (vision-language) checkpoints: each module
merged from its own models/slices, gradients along each module's own layers, module parameters
between slice and recipe, in memory as on disk, and one-line errors before any tensor is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import load_state, make_tiny_llama
from fixtures_vlm import VLM_KINDS, make_tiny_vlm

from merge_engine.apply import InMemoryMerger
from merge_engine.errors import RecipeError
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe
from merge_engine.session import validate

TEXT = "language_model.model.layers."
VISION = "vision_tower.transformer.layers."


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    base = make_tiny_vlm(root / "base", "mistral3", 0)  # 4 text layers, 3 vision layers
    return {"base": base, "ft1": make_tiny_vlm(root / "ft1", "mistral3", 1, perturb_from=base),
            "ft2": make_tiny_vlm(root / "ft2", "mistral3", 2, perturb_from=base)}


def _recipe(vlm: dict[str, Path], text: str) -> object:
    import yaml

    for key, path in vlm.items():
        text = text.replace(f"@{key}", str(path))
    return parse_recipe(yaml.safe_load(text))


MODULES = """
merge_method: linear
modules:
  text_decoder:
    slices:
      - sources: [{model: "@ft1", layer_range: [0, 2], parameters: {weight: 3.0}}, {model: "@ft2", layer_range: [2, 4]}]
      - sources: [{model: "@ft2", layer_range: [1, 3]}, {model: "@base", layer_range: [1, 3]}]
        parameters: {weight: [1.0, 3.0]}
  vision_tower:
    models: [{model: "@ft1", parameters: {weight: [0.0, 1.0]}}, {model: "@ft2"}]
    parameters: {weight: 2.0}
  multi_modal_projector:
    models: [{model: "@base"}, {model: "@ft2"}]
parameters: {weight: 1.0}
"""


def _mean(pairs: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    return sum(w * t for w, t in pairs) / sum(w for w, _ in pairs)


def test_modules_recipe_merges_each_module_from_its_own_sources(vlm, tmp_path: Path) -> None:
    run_merge(_recipe(vlm, MODULES), tmp_path / "out", device="cpu")
    out = load_state(tmp_path / "out")
    s = {k: load_state(p) for k, p in vlm.items()}
    assert set(out) == set(s["base"])  # every tensor of every module, nothing else
    expected = {}
    for name in s["base"]:
        if name.startswith(TEXT):
            i, rest = name[len(TEXT):].split(".", 1)
            i = int(i)
            if i < 2:  # slice 1: ft1 layer i (weight 3), ft2 layer i+2 (recipe weight 1)
                expected[name] = _mean([(3.0, s["ft1"][name]), (1.0, s["ft2"][f"{TEXT}{i + 2}.{rest}"])])
            else:  # slice 2: layers 1-2 of ft2 and base, slice gradient 1 -> 3
                w = 1.0 + 2.0 * (i - 2)
                src = f"{TEXT}{i - 1}.{rest}"
                expected[name] = _mean([(w, s["ft2"][src]), (w, s["base"][src])])
        elif name.startswith(VISION):  # ft1's gradient along the tower's 3 layers; ft2 the module's 2
            t = int(name[len(VISION):].split(".")[0]) / 2
            expected[name] = _mean([(t, s["ft1"][name]), (2.0, s["ft2"][name])])
        elif name.startswith("vision_tower."):  # outside the stack: position 0
            expected[name] = s["ft2"][name]
        elif name.startswith("multi_modal_projector."):
            expected[name] = _mean([(1.0, s["base"][name]), (1.0, s["ft2"][name])])
        elif name.startswith("language_model."):  # embeddings: first slice; final norm: last slice
            first = "embed_tokens" in name
            pairs = [(3.0, s["ft1"][name]), (1.0, s["ft2"][name])] if first else \
                [(3.0, s["ft2"][name]), (3.0, s["base"][name])]
            expected[name] = _mean(pairs)
    assert set(expected) == set(out)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=0, atol=2e-6, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4 and config["vision_config"]["num_hidden_layers"] == 3


def test_module_slices_change_each_module_layer_count(vlm, tmp_path: Path) -> None:
    recipe = _recipe(vlm, """
merge_method: passthrough
modules:
  text_decoder:
    slices: [{sources: [{model: "@ft1", layer_range: [0, 3]}]}, {sources: [{model: "@ft2", layer_range: [1, 4]}]}]
  vision_tower:
    slices: [{sources: [{model: "@ft2", layer_range: [2, 3]}]}]
  multi_modal_projector:
    models: [{model: "@ft1"}]
""")
    run_merge(recipe, tmp_path / "out", device="cpu")
    out, ft1, ft2 = load_state(tmp_path / "out"), load_state(vlm["ft1"]), load_state(vlm["ft2"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6 and config["vision_config"]["num_hidden_layers"] == 1
    assert torch.equal(out[f"{TEXT}5.mlp.up_proj.weight"], ft2[f"{TEXT}3.mlp.up_proj.weight"])
    assert torch.equal(out[f"{VISION}0.attention.q_proj.weight"], ft2[f"{VISION}2.attention.q_proj.weight"])
    assert not any(n.startswith(f"{VISION}1.") for n in out)
    assert torch.equal(out["vision_tower.patch_conv.weight"], ft2["vision_tower.patch_conv.weight"])
    assert torch.equal(out["multi_modal_projector.linear_1.weight"], ft1["multi_modal_projector.linear_1.weight"])


def test_models_recipe_runs_gradients_along_each_modules_own_layers(vlm, tmp_path: Path) -> None:
    recipe = _recipe(vlm, """
merge_method: linear
models: [{model: "@ft1", parameters: {weight: [0.0, 1.0]}}, {model: "@ft2", parameters: {weight: 1.0}}]
""")
    run_merge(recipe, tmp_path / "out", device="cpu")
    out, ft1, ft2 = load_state(tmp_path / "out"), load_state(vlm["ft1"]), load_state(vlm["ft2"])
    name = f"{VISION}1.attention.k_proj.weight"  # the middle of 3 vision layers: t = 0.5
    torch.testing.assert_close(out[name], (0.5 * ft1[name] + ft2[name]) / 1.5, rtol=0, atol=2e-6)
    name = f"{TEXT}3.self_attn.k_proj.weight"  # the last of 4 text layers: t = 1
    torch.testing.assert_close(out[name], (ft1[name] + ft2[name]) / 2, rtol=0, atol=2e-6)


class _Holder(torch.nn.Module):
    pass


def _module_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain module whose parameters carry the checkpoint's names (a resident model)."""
    root = _Holder()
    for name, value in state.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(value), requires_grad=False))
    return root


def test_in_memory_equals_disk(vlm, tmp_path: Path) -> None:
    recipe = _recipe(vlm, MODULES)
    run_merge(recipe, tmp_path / "out", device="cpu")
    disk = load_state(tmp_path / "out")
    model = _module_tree(load_state(vlm["base"]))
    with InMemoryMerger(model) as merger:
        merger.apply(recipe)
    memory = dict(model.state_dict())
    assert set(memory) == set(disk)
    for name in disk:
        assert torch.equal(memory[name], disk[name]), name


@pytest.mark.parametrize("modules, message", [
    ('{text_decoder: {models: [{model: "@ft1"}]}, vision_towr: {models: [{model: "@ft1"}]}, '
     'multi_modal_projector: {models: [{model: "@ft1"}]}}',
     "modules.vision_towr: Mistral3ForConditionalGeneration has no module 'vision_towr'; did you mean 'vision_tower'?"),
    ('{text_decoder: {models: [{model: "@ft1"}]}}',
     "modules does not name multi_modal_projector, vision_tower of Mistral3ForConditionalGeneration"),
    ('{text_decoder: {slices: [{sources: [{model: "@ft1", layer_range: [2, 6]}]}]}, '
     'vision_tower: {models: [{model: "@ft1"}]}, multi_modal_projector: {models: [{model: "@ft1"}]}}',
     "modules.text_decoder: layer_range [2, 6) is out of bounds"),
])
def test_module_problems_are_one_line_before_any_tensor(vlm, modules: str, message: str) -> None:
    recipe = _recipe(vlm, f"merge_method: linear\nmodules: {modules}\n")
    report = validate(recipe)
    assert len(report.problems) == 1 and report.problems[0].startswith(message), report.problems


def test_slices_on_a_multi_module_model_ask_for_modules(vlm) -> None:
    recipe = _recipe(vlm, 'merge_method: passthrough\nslices: [{sources: [{model: "@ft1", layer_range: [0, 2]}]}]\n')
    (problem,) = validate(recipe).problems
    assert "has modules text_decoder, multi_modal_projector, vision_tower: 'slices' cannot say" in problem


@pytest.mark.parametrize("data, message", [
    ({"merge_method": "linear", "modules": {}}, "'modules' is empty"),
    ({"merge_method": "linear", "modules": {"default": {}}}, "exactly one of 'models' or 'slices'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "modules": {"default": {"models": [{"model": "a"}]}}},
     "give exactly one of 'models', 'slices' or 'modules', got models, modules"),
])
def test_schema_errors(data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_one_module_model_is_default_and_problems_name_the_module(tmp_path: Path) -> None:
    a = make_tiny_llama(tmp_path / "a", 0)
    b = make_tiny_llama(tmp_path / "b", 1, perturb_from=a)
    recipe = parse_recipe({"merge_method": "linear", "modules": {"default": {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}],
                    "parameters": {"wieght": 1.0}}]}}})
    assert validate(recipe).problems == [
        "modules.default.slices[0]: unknown parameter 'wieght' for linear; did you mean 'weight'?"]
    fixed = parse_recipe({"merge_method": "linear", "parameters": {"weight": 1.0},
                          "modules": {"default": {"slices": [{"sources": [
                              {"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}]}}})
    plain = parse_recipe({"merge_method": "linear", "parameters": {"weight": 1.0},
                          "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]},
                                                  {"model": str(b), "layer_range": [0, 2]}]}]})
    run_merge(fixed, tmp_path / "modules", device="cpu")
    run_merge(plain, tmp_path / "slices", device="cpu")
    x, y = load_state(tmp_path / "modules"), load_state(tmp_path / "slices")
    assert set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)
    assert parse_recipe(fixed.to_dict()) == fixed  # dumps and reloads with its modules


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen")
    base = make_tiny_vlm(root / "base", "qwen2_5_vl", 0)
    return base, make_tiny_vlm(root / "ft", "qwen2_5_vl", 1, perturb_from=base)


def test_a_cut_vlm_loads_in_transformers_with_every_weight(qwen, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    base, ft = qwen
    recipe = parse_recipe({"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]}]},
                                    {"sources": [{"model": str(ft), "layer_range": [1, 4]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": str(ft), "layer_range": [1, 3]}]}]},
        "multi_modal_projector": {"models": [{"model": str(base)}]}}})
    run_merge(recipe, tmp_path / "out", device="cpu")
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 6 and len(text["layer_types"]) == 6  # per-layer lists follow
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 96)


def test_qwen2_vl_projector_mlp_sits_at_the_last_gradient_position(qwen, tmp_path: Path) -> None:
    base, ft = qwen
    recipe = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": [0.0, 1.0]}}, {"model": str(ft), "parameters": {"weight": 1.0}}]})
    run_merge(recipe, tmp_path / "out", device="cpu")
    out, b, f = load_state(tmp_path / "out"), load_state(base), load_state(ft)
    for name, t in (("visual.merger.mlp.0.weight", 1.0), ("visual.merger.ln_q.weight", 0.0),
                    ("visual.patch_embed.proj.weight", 0.0), ("visual.blocks.2.mlp.up_proj.weight", 1.0)):
        torch.testing.assert_close(out[name], (t * b[name] + f[name]) / (t + 1), rtol=0, atol=2e-6, msg=name)


def test_an_unlisted_base_of_a_base_free_method_is_said_per_models_list(vlm) -> None:
    recipe = _recipe(vlm, """
merge_method: linear
base_model: "@base"
modules:
  text_decoder: {models: [{model: "@ft1"}, {model: "@base"}]}
  vision_tower: {models: [{model: "@ft1"}, {model: "@ft2"}]}
  multi_modal_projector: {models: [{model: "@ft2"}]}
parameters: {weight: 1.0}
""")
    report = validate(recipe)
    assert report.problems == []
    warned = [w.split("models does not list")[0] for w in report.warnings if "merged in as one more" in w]
    assert warned == ["modules.vision_tower.", "modules.multi_modal_projector."]


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_every_table_architecture_splits_into_its_modules(kind: str, tmp_path: Path) -> None:
    from merge_engine.io.reader import CheckpointReader
    from merge_engine.layout import detect_layout
    from merge_engine.modules import model_modules

    with CheckpointReader(make_tiny_vlm(tmp_path / kind, kind, 0)) as reader:
        modules, outside = model_modules(reader.tensor_names, reader.config,
                                         detect_layout(reader.tensor_names, reader.config))
    assert outside == [] and sorted(modules) == ["multi_modal_projector", "text_decoder", "vision_tower"]
    assert sum(len(m.names) for m in modules.values()) == len(reader.tensor_names)
    assert modules["text_decoder"].layout.num_layers == 4 and modules["vision_tower"].layout.num_layers == 3
    assert modules["multi_modal_projector"].layout.num_layers == (3 if kind == "qwen3_vl" else 0)


def test_tensors_no_module_owns_are_not_written_and_named_in_a_warning(vlm, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    odd = []
    for key in ("ft1", "ft2"):
        shutil.copytree(vlm[key], tmp_path / key)
        state = load_state(tmp_path / key)
        state["image_newline"] = torch.ones(4)  # a tensor of none of Mistral3's modules
        save_file(state, tmp_path / key / "model.safetensors", metadata={"format": "pt"})
        odd.append({"model": str(tmp_path / key)})
    recipe = parse_recipe({"merge_method": "linear", "models": odd, "parameters": {"weight": 1.0}})
    result = run_merge(recipe, tmp_path / "out", device="cpu")
    assert "image_newline" not in load_state(tmp_path / "out")
    assert any(w.startswith("tensors image_newline belong to no module of Mistral3ForConditionalGeneration")
               for w in result.warnings)

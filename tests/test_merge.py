"""End-to-end merges on tiny real Llama checkpoints: disk output, slices, apply, determinism, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fixtures import load_state, make_tiny_llama
from merge_engine.apply import InMemoryMerger
from merge_engine.errors import MergeError, NonFiniteError, OutputExistsError, RecipeError
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe
from merge_engine.session import validate


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_llama(root / "base", seed=0, num_layers=4)
    return {
        "base": base,
        "a": make_tiny_llama(root / "a", seed=1, perturb_from=base),
        "b": make_tiny_llama(root / "b", seed=2, perturb_from=base),
        "c": make_tiny_llama(root / "c", seed=3, perturb_from=base),
    }


def recipe(method: str, zoo, models=("a", "b"), base=True, params=None, top=None, **extra):
    data = {"merge_method": method,
            "models": [{"model": str(zoo[m]), "parameters": dict(params or {})} for m in models]}
    if base:
        data["base_model"] = str(zoo["base"])
    if top:
        data["parameters"] = top
    data.update(extra)
    return parse_recipe(data)


def _sha(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.glob("*.safetensors")))).hexdigest()


def test_linear_merge_matches_formula_and_loads_in_transformers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": 0.25}},
        {"model": str(zoo["b"]), "parameters": {"weight": 0.75}}]})
    out = tmp_path / "out"
    run_merge(r, out, device="cpu")
    a, b, merged = load_state(zoo["a"]), load_state(zoo["b"]), load_state(out)
    assert set(merged) == set(a)
    for name in a:
        torch.testing.assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name])
    for f in ("config.json", "evomerge_recipe.yaml", "README.md", "tokenizer.json"):
        assert (out / f).is_file(), f
    assert parse_recipe(yaml.safe_load((out / "evomerge_recipe.yaml").read_text())) == r
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5


def test_out_dtype_written_to_config_and_tensors(zoo, tmp_path):
    r = recipe("task_arithmetic", zoo, params={"weight": 0.5}, out_dtype="bfloat16")
    out = tmp_path / "bf16"
    run_merge(r, out, device="cpu")
    import json
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_state(out).values())


def test_gradient_weights_vary_by_layer(zoo, tmp_path):
    # weight of model a goes 0 → 1 across 4 layers; b gets 1 - that (normalize off)
    r = parse_recipe({"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": [0.0, 1.0]}},
        {"model": str(zoo["b"]), "parameters": {"weight": [1.0, 0.0]}}]})
    out = tmp_path / "grad"
    run_merge(r, out, device="cpu")
    a, b, m = load_state(zoo["a"]), load_state(zoo["b"]), load_state(out)
    for layer in range(4):
        t = layer / 3
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        torch.testing.assert_close(m[name], t * a[name] + (1 - t) * b[name])
    # embeddings sit at t = 0
    torch.testing.assert_close(m["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_filters_apply_per_module(zoo, tmp_path):
    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": [{"filter": "self_attn", "value": 1.0},
                                                           {"value": 0.0}]}},
        {"model": str(zoo["b"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.0},
                                                           {"value": 1.0}]}}]})
    out = tmp_path / "filt"
    run_merge(r, out, device="cpu")
    a, b, m = load_state(zoo["a"]), load_state(zoo["b"]), load_state(out)
    q, up = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(m[q], a[q]) and torch.equal(m[up], b[up])


def test_passthrough_slices_stack_layers(zoo, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    r = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(zoo["a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(zoo["b"]), "layer_range": [1, 4]}]}]})
    out = tmp_path / "stack"
    run_merge(r, out, device="cpu")
    a, b, m = load_state(zoo["a"]), load_state(zoo["b"]), load_state(out)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 6
    for i in range(3):
        assert torch.equal(m[f"model.layers.{i}.mlp.down_proj.weight"], a[f"model.layers.{i}.mlp.down_proj.weight"])
        assert torch.equal(m[f"model.layers.{3 + i}.mlp.down_proj.weight"],
                           b[f"model.layers.{1 + i}.mlp.down_proj.weight"])
    assert torch.equal(m["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    assert torch.equal(m["lm_head.weight"], b["lm_head.weight"])  # last slice
    AutoModelForCausalLM.from_pretrained(out)  # loads with 6 layers


def test_passthrough_scale(zoo, tmp_path):
    r = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(zoo["a"]), "layer_range": [0, 4],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}]})
    out = tmp_path / "scaled"
    run_merge(r, out, device="cpu")
    a, m = load_state(zoo["a"]), load_state(out)
    o = "model.layers.2.self_attn.o_proj.weight"
    torch.testing.assert_close(m[o], 0.5 * a[o])


def test_slices_merge_interpolates_within_each_slice(zoo, tmp_path):
    r = parse_recipe({"merge_method": "slerp", "base_model": str(zoo["a"]), "parameters": {"t": [0.0, 1.0]},
                      "slices": [{"sources": [{"model": str(zoo["a"]), "layer_range": [0, 2]},
                                              {"model": str(zoo["b"]), "layer_range": [0, 2]}]},
                                 {"sources": [{"model": str(zoo["a"]), "layer_range": [2, 4]},
                                              {"model": str(zoo["b"]), "layer_range": [2, 4]}]}]})
    out = tmp_path / "slerp"
    run_merge(r, out, device="cpu")
    a, b, m = load_state(zoo["a"]), load_state(zoo["b"]), load_state(out)
    # position restarts in every slice: layers 0 and 2 sit at t=0 (=a), layers 1 and 3 at t=1 (=b)
    for layer, src in ((0, a), (1, b), (2, a), (3, b)):
        name = f"model.layers.{layer}.mlp.gate_proj.weight"
        torch.testing.assert_close(m[name], src[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties"])
def test_byte_identical_across_runs_and_thread_counts(zoo, tmp_path, method):
    r = recipe(method, zoo, models=("a", "b", "c"), params={"weight": 0.5, "density": 0.5}, seed=11)
    hashes = []
    old = torch.get_num_threads()
    try:
        for i, threads in enumerate((1, 2)):
            torch.set_num_threads(threads)
            out = tmp_path / f"run{i}"
            run_merge(r, out, device="cpu")
            hashes.append(_sha(out))
    finally:
        torch.set_num_threads(old)
    assert hashes[0] == hashes[1]


def test_seed_changes_random_masks(zoo, tmp_path):
    outs = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        run_merge(recipe("dare_linear", zoo, params={"weight": 0.5, "density": 0.5}, seed=seed), out, device="cpu")
        outs.append(_sha(out))
    assert outs[0] != outs[1]


@pytest.mark.parametrize("method, params, top", [
    ("linear", {"weight": 0.5}, None),
    ("task_arithmetic", {"weight": 0.7}, {"lambda": 0.8}),
    ("ties", {"weight": 0.5, "density": 0.6}, None),
    ("dare_ties", {"weight": 0.5, "density": 0.5}, None),
    ("della_linear", {"weight": 0.5, "density": 0.5}, None),
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.8}, None),
])
def test_in_memory_apply_equals_disk_merge(zoo, tmp_path, method, params, top):
    from transformers import AutoModelForCausalLM

    r = recipe(method, zoo, models=("a", "b", "c"), base=method != "linear", params=params, top=top, seed=5)
    out = tmp_path / "disk"
    run_merge(r, out, device="cpu")
    from_disk = AutoModelForCausalLM.from_pretrained(out).state_dict()
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    with InMemoryMerger(model) as merger:
        # apply something else first so the cache and change tracking are exercised
        merger.apply(recipe("linear", zoo, models=("a", "b"), base=False, params={"weight": 1.0}))
        stats = merger.apply(r)
        assert stats.recomputed > 0
        again = merger.apply(r)
        assert again.recomputed == 0 and again.unchanged == stats.recomputed + stats.unchanged
    for name, value in model.state_dict().items():
        assert torch.equal(value, from_disk[name]), name


def test_output_exists_needs_force(zoo, tmp_path):
    r = recipe("linear", zoo, base=False, params={"weight": 1.0})
    out = tmp_path / "o"
    run_merge(r, out, device="cpu")
    with pytest.raises(OutputExistsError, match="--force"):
        run_merge(r, out, device="cpu")
    run_merge(r, out, device="cpu", force=True)
    assert (out / "config.json").is_file()


def _with_tensor(src: Path, dst: Path, name: str, fill: float, dtype=None) -> Path:
    """A copy of checkpoint ``src`` with tensor ``name`` filled with ``fill``."""
    import shutil
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    state = load_state(src)
    state[name] = torch.full_like(state[name], fill)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_produced_by_a_merge_is_caught_before_publishing(zoo, tmp_path):
    # 60000 + 60000 overflows float16: the merge itself produces inf in one tensor
    name = "model.layers.1.mlp.up_proj.weight"
    big_a = _with_tensor(zoo["a"], tmp_path / "big_a", name, 60000.0, torch.float16)
    big_b = _with_tensor(zoo["b"], tmp_path / "big_b", name, 60000.0, torch.float16)
    r = parse_recipe({"merge_method": "linear", "dtype": "float16", "parameters": {"normalize": False},
                      "models": [{"model": str(big_a), "parameters": {"weight": 1.0}},
                                 {"model": str(big_b), "parameters": {"weight": 1.0}}]})
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        run_merge(r, out, device="cpu")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_nan_in_a_checkpoint_is_named(zoo, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _with_tensor(zoo["a"], tmp_path / "bad", name, float("nan"))
    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(bad), "parameters": {"weight": 1.0}}, {"model": str(zoo["b"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(NonFiniteError, match="k_proj.*bad|bad.*k_proj"):
        run_merge(r, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_validate_reports_every_problem(zoo, tmp_path):
    r = parse_recipe({"merge_method": "ties", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": 0.5, "densty": 0.5}},
        {"model": str(tmp_path / "nope"), "parameters": {"weight": 2.0, "density": 1.5}}]})
    report = validate(r)
    text = "\n".join(report.problems)
    assert "densty" in text and "density" in text  # suggestion
    assert "base_model" in text
    assert "must be <= 1" in text
    assert len(report.problems) >= 3


def test_validate_unknown_method_suggests(zoo):
    report = validate(parse_recipe({"merge_method": "tie", "models": [{"model": str(zoo["a"])}]}))
    assert not report.ok and "ties" in report.problems[0]


def test_validate_layer_range_out_of_bounds(zoo):
    r = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(zoo["a"]), "layer_range": [2, 9]}]}]})
    report = validate(r)
    assert any("out of bounds" in p for p in report.problems)


def test_validate_shape_mismatch(zoo, tmp_path):
    other = make_tiny_llama(tmp_path / "wide", seed=0, num_layers=4, hidden=128)
    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": 1.0}},
        {"model": str(other), "parameters": {"weight": 1.0}}]})
    report = validate(r)
    assert not report.ok


def test_linear_weights_summing_to_zero_rejected(zoo, tmp_path):
    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": 1.0}},
        {"model": str(zoo["b"]), "parameters": {"weight": -1.0}}]})
    with pytest.raises(MergeError, match="sum"):
        run_merge(r, tmp_path / "z", device="cpu")
    assert not (tmp_path / "z").exists()


def test_vocab_mismatch_keeps_common_rows(zoo, tmp_path):
    big = make_tiny_llama(tmp_path / "big", seed=4, num_layers=4, vocab=160)
    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
        {"model": str(big), "parameters": {"weight": 0.5}}]})
    out = tmp_path / "v"
    res = run_merge(r, out, device="cpu")
    assert any("vocabulary" in w for w in res.warnings)
    m = load_state(out)
    assert m["model.embed_tokens.weight"].shape[0] == 128
    import json
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128


def test_cli_merge_and_validate(zoo, tmp_path):
    rp = tmp_path / "r.yaml"
    rp.write_text(recipe("task_arithmetic", zoo, params={"weight": 0.5}).to_yaml())
    exe = [sys.executable, "-m", "evomerge.cli"]
    ok = subprocess.run(exe + ["validate", str(rp)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "cli_out"
    run = subprocess.run(exe + ["merge", str(rp), str(out), "--shard-size", "20K"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (out / "model.safetensors.index.json").is_file()
    again = subprocess.run(exe + ["merge", str(rp), str(out)], capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    res = subprocess.run(exe + ["validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1 and "YAML" in res.stderr and "Traceback" not in res.stderr


def test_validate_from_configs_alone(zoo, tmp_path, capsys):
    """`evomerge validate --model-config REPO=DIR` checks a recipe for models we only have configs of."""
    import shutil

    from evomerge.cli import main

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    shutil.copy(zoo["a"] / "config.json", cfg / "config.json")
    rp = tmp_path / "r.yaml"
    rp.write_text(f"merge_method: ties\nbase_model: {zoo['base']}\nmodels:\n"
                  "  - model: org/remote-model\n    parameters: {weight: 0.5, density: 0.5}\n")
    assert main(["validate", str(rp), "--model-config", f"org/remote-model={cfg}"]) == 0
    rp.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n"
                  "      - model: org/remote-model\n        layer_range: [0, 9]\n")
    assert main(["validate", str(rp), "--model-config", f"org/remote-model={cfg}"]) == 1
    assert "out of bounds" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_gives_the_same_bits_for_any_block_size(monkeypatch, dtype, normalize) -> None:
    """Linear runs block by block with reused buffers: the bits must equal one pass over the
    whole tensors, written independently as a float32 weighted sum cast back once."""
    import numpy as np

    from merge_engine import blocks
    from merge_engine.methods.linear import linear

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3 * 1000 + 7, 1000, generator=gen).to(dtype) for _ in range(3)]
    weights = [0.5, -0.25, 0.8]
    want = torch.zeros(xs[0].shape)
    for w, x in zip(weights, xs):
        want = want.add(x.float(), alpha=w)
    if normalize:
        want = want / float(np.float32(np.float32(np.float32(0.5) + np.float32(-0.25)) + np.float32(0.8)))
    want = want.to(dtype)
    results = []
    for block in (1 << 20, 1000, 4096, 999_983):  # one block; many; the last one partial
        monkeypatch.setattr(blocks, "BLOCK", block)
        got = linear(xs, None, weight=weights, normalize=normalize)
        assert got.dtype == dtype and got.shape == xs[0].shape
        results.append(got)
    for got in results:
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_keep_freed_memory_is_applied_once_on_glibc() -> None:
    import platform

    from merge_engine.allocator import keep_freed_memory

    applied = keep_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert applied and keep_freed_memory()
    big = torch.ones(20 << 20, dtype=torch.float32)  # 80 MB: above glibc's largest mmap threshold
    assert float(big.sum()) == 20 << 20


def test_random_draws_are_made_ahead_on_the_io_thread(zoo, tmp_path, monkeypatch):
    """DARE's keep masks are planned as Draw nodes (one per model with density below 1) that the
    executor makes on its I/O thread; the method then uses them instead of drawing itself."""
    import threading
    from contextlib import ExitStack

    from merge_engine.session import prepare
    from merge_engine.randomness import TensorRandom

    r = parse_recipe({"merge_method": "dare_ties", "base_model": str(zoo["base"]), "seed": 3,
                      "models": [{"model": str(zoo[m]), "parameters": {"weight": 0.5, "density": d}}
                                 for m, d in (("a", 1.0), ("b", 0.4), ("c", 0.7))]})
    with ExitStack() as stack:
        plan, _ = prepare(r, stack)
    node = next(t for t in plan.targets if t.out_name == "model.layers.1.mlp.up_proj.weight")
    assert [(d.model_index, d.below) for d in node.draws] == [(1, 0.4), (2, 0.7)]
    shape = tuple(load_state(zoo["base"])[node.out_name].shape)
    assert all(d.shape == shape for d in node.draws)
    drawn_on: list[str] = []
    original = TensorRandom.bernoulli

    def spy(self, *args, **kwargs):
        drawn_on.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TensorRandom, "bernoulli", spy)
    run_merge(r, tmp_path / "out", device="cpu")
    assert drawn_on and all(name.startswith("merge-io") for name in drawn_on), set(drawn_on)


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_merge_equals_the_method_called_with_its_seeded_generator(zoo, tmp_path, method):
    """The planned merge hands each tensor's method exactly TensorRandom(seed, tensor name):
    a user can recompute any merged tensor from the recipe alone (model indices are kept when a
    density of 1 draws nothing)."""
    from merge_engine.methods.registry import get_method
    from merge_engine.randomness import TensorRandom

    r = parse_recipe({"merge_method": method, "base_model": str(zoo["base"]), "seed": 11,
                      "parameters": {"epsilon": 0.1} if method.startswith("della") else {},
                      "models": [{"model": str(zoo[m]), "parameters": {"weight": w, "density": d}}
                                 for m, w, d in (("a", 0.6, 1.0), ("b", 0.5, 0.4), ("c", 0.3, 0.7))]})
    out = tmp_path / "out"
    run_merge(r, out, device="cpu")
    merged, base = load_state(out), load_state(zoo["base"])
    inputs = [load_state(zoo[m]) for m in ("a", "b", "c")]
    spec = get_method(method)
    kwargs = {p.kwarg: p.default for p in spec.params if not p.per_model}
    kwargs.update(weight=[0.6, 0.5, 0.3], density=[1.0, 0.4, 0.7])
    if spec.param("epsilon") is not None:
        kwargs[spec.param("epsilon").kwarg] = [0.1] * 3 if spec.param("epsilon").per_model else 0.1
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        want = spec.fn([s[name] for s in inputs], base[name], rng=TensorRandom(11, name), **kwargs)
        assert torch.equal(merged[name], want), name
        assert not torch.equal(merged[name], base[name])


def test_output_config_declares_the_output_layer_count(tmp_path):
    """The layer count is rewritten under whatever key the config uses (GPT-2: n_layer)."""
    from contextlib import ExitStack

    from fixtures import make_tiny_gpt2
    from merge_engine.session import prepare

    gpt2 = make_tiny_gpt2(tmp_path / "gpt2", num_layers=2)
    r = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(gpt2), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(gpt2), "layer_range": [1, 2]}]}]})
    with ExitStack() as stack:
        plan = prepare(r, stack).plan
    assert plan.num_layers == 3 and plan.config["n_layer"] == 3
    assert "num_hidden_layers" not in plan.config


def test_validate_counts_inputs_and_needs_a_base(zoo):
    r = parse_recipe({"merge_method": "slerp", "base_model": str(zoo["base"]), "parameters": {"t": 0.5},
                      "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}, {"model": str(zoo["base"])}]})
    assert validate(r, with_models=False).problems == [
        "slerp merges exactly 1 model(s) besides a base, got 2; adjust the models listed"]
    r = parse_recipe({"merge_method": "task_arithmetic", "models": [{"model": str(zoo["a"])}]})
    assert validate(r, with_models=False).problems == [
        "task_arithmetic needs a base_model; add 'base_model: <model>' to the recipe"]


def test_an_unlisted_base_is_merged_in_as_one_more_input_as_mergekit_does(zoo, tmp_path):
    """mergekit adds a ``base_model`` its ``models`` list lacks as one more input, with the
    top-level parameters, whatever the method: for linear that is a third weighted model."""
    unlisted = recipe("linear", zoo, params={"weight": 0.5}, top={"weight": 0.25})
    listed = parse_recipe({"merge_method": "linear", "parameters": {"weight": 0.25}, "models": [
        {"model": str(zoo["a"]), "parameters": {"weight": 0.5}},
        {"model": str(zoo["b"]), "parameters": {"weight": 0.5}},
        {"model": str(zoo["base"])}]})
    report = validate(unlisted)
    assert report.problems == [] and any("merged in as one more linear input" in w for w in report.warnings)
    run_merge(unlisted, tmp_path / "unlisted", device="cpu")
    run_merge(listed, tmp_path / "listed", device="cpu")
    assert _sha(tmp_path / "unlisted") == _sha(tmp_path / "listed")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    with InMemoryMerger(model) as merger:
        merger.apply(unlisted)
    on_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "listed").state_dict()
    assert all(torch.equal(v, on_disk[k]) for k, v in model.state_dict().items())
    # without a weight for it: one problem naming the fixes, before any tensor is read
    problems = validate(recipe("linear", zoo, params={"weight": 0.5})).problems
    assert len(problems) == 1 and "needs 'weight'" in problems[0] and "remove base_model" in problems[0]

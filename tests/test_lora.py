"""LoRA inputs (``base+adapter`` refs): applied as peft's merge_and_unload does, on disk and in
memory, mixed with full models, in search spaces; bad adapters are one-line errors up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from fixtures import load_state, make_lora_adapter, make_tiny_gpt2, make_tiny_llama
from test_io import fake_hub_cache, offline_hub  # noqa: F401  (offline_hub is a fixture)

from evomerge.space import equal_params, parse_space, trial_recipe
from merge_engine.apply import InMemoryMerger
from merge_engine.errors import CheckpointError, RecipeError
from merge_engine.io.lora import LoraReader
from merge_engine.io.reader import CheckpointReader
from merge_engine.io.refs import ModelRef
from merge_engine.io.resolve import resolve_model_dir
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe
from merge_engine.session import validate

LAYERS = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lora_zoo")
    make_tiny_llama(d / "base", 0, num_layers=LAYERS)
    make_tiny_llama(d / "math", 1, perturb_from=d / "base", scale=0.05)
    # embeddings (lora_embedding_A/B + the saved base_layer), linears, and a modules_to_save head
    make_lora_adapter(d / "chat", d / "base", 1, targets=("q_proj", "v_proj", "down_proj", "embed_tokens"),
                      modules_to_save=("lm_head",))
    make_lora_adapter(d / "code", d / "base", 2, r=8, alpha=4, use_rslora=True,
                      alpha_pattern={"v_proj": 32}, rank_pattern={"q_proj": 2})
    return d


def peft_merged(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """What a mergekit user gets today: peft's merge_and_unload, saved as a full model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


def reader(base: Path, adapter: Path) -> LoraReader:
    return LoraReader(CheckpointReader(base), adapter)


@pytest.mark.parametrize("adapter", ["chat", "code"])
def test_reads_equal_peft_merge_and_unload_bit_for_bit(zoo, tmp_path, adapter):
    expected = load_state(peft_merged(zoo / "base", zoo / adapter, tmp_path / "merged"))
    base = load_state(zoo / "base")
    with reader(zoo / "base", zoo / adapter) as r:
        assert r.tensor_names == tuple(sorted(base))
        assert len(r.adapted) >= 2 * LAYERS
        for name in r.tensor_names:
            # float32 throughout: our W.float() + scale * (B @ A) is peft's arithmetic, so equal bits
            assert torch.equal(r.get(name), expected[name]), name
        changed = [n for n in r.tensor_names if not torch.equal(expected[n], base[n])]
        assert sorted(changed) == sorted(r.adapted)


def test_bfloat16_base_rounds_once_like_peft(zoo, tmp_path):
    make_tiny_llama(tmp_path / "base16", 0, dtype=torch.bfloat16)
    make_lora_adapter(tmp_path / "ad", tmp_path / "base16", 3)
    expected = load_state(peft_merged(tmp_path / "base16", tmp_path / "ad", tmp_path / "m", torch.bfloat16))
    with reader(tmp_path / "base16", tmp_path / "ad") as r:
        for name in r.tensor_names:
            assert r.dtype(name) == torch.bfloat16 and r.get(name).dtype == torch.bfloat16
            assert torch.equal(r.get(name), expected[name]), name


def test_fan_in_fan_out_adapter_on_gpt2(tmp_path):
    make_tiny_gpt2(tmp_path / "gpt2", 0)
    make_lora_adapter(tmp_path / "ad", tmp_path / "gpt2", 4, targets=("c_attn",), fan_in_fan_out=True)
    expected = load_state(peft_merged(tmp_path / "gpt2", tmp_path / "ad", tmp_path / "m"))
    with reader(tmp_path / "gpt2", tmp_path / "ad") as r:
        assert r.adapted == tuple(f"transformer.h.{i}.attn.c_attn.weight" for i in range(2))
        for name in r.adapted:
            assert torch.equal(r.get(name), expected[name]), name


def test_lora_ref_merges_like_the_peft_merged_model(zoo, tmp_path):
    merged = peft_merged(zoo / "base", zoo / "chat", tmp_path / "merged")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo / "base" / f, merged / f)

    def recipe(chat: str):
        return parse_recipe({"merge_method": "task_arithmetic", "base_model": str(zoo / "base"), "dtype": "float32",
                             "models": [{"model": chat, "parameters": {"weight": 0.7}},
                                        {"model": str(zoo / "math"), "parameters": {"weight": 0.4}}]})

    run_merge(recipe(f"{zoo / 'base'}+{zoo / 'chat'}"), tmp_path / "from_lora", device="cpu")
    run_merge(recipe(str(merged)), tmp_path / "from_peft", device="cpu")
    ours, theirs = load_state(tmp_path / "from_lora"), load_state(tmp_path / "from_peft")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_mixed_recipe_in_memory_equals_disk(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    r = parse_recipe({"merge_method": "ties", "base_model": str(zoo / "base"), "dtype": "float32",
                      "parameters": {"density": 0.6},
                      "models": [{"model": f"{zoo / 'base'}+{zoo / 'chat'}", "parameters": {"weight": 0.6}},
                                 {"model": f"{zoo / 'base'}+{zoo / 'code'}", "parameters": {"weight": 0.5}},
                                 {"model": str(zoo / "math"), "parameters": {"weight": 0.3}}]})
    assert not validate(r).problems
    run_merge(r, tmp_path / "out", device="cpu")
    from_disk = load_state(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
    with InMemoryMerger(model) as merger:
        merger.apply(r)
    state = model.state_dict()
    base = load_state(zoo / "base")
    assert not torch.equal(from_disk["lm_head.weight"], base["lm_head.weight"])  # the adapter's head counts
    for name, value in from_disk.items():
        assert torch.equal(state[name], value), name


def test_space_of_adapters_on_one_base(zoo, tmp_path):
    space = parse_space({
        "name": "adapters", "base_model": str(zoo / "base"), "method": "task_arithmetic",
        "models": [{"name": "chat", "model": f"{zoo / 'base'}+{zoo / 'chat'}"},
                   {"name": "code", "model": f"{zoo / 'base'}+{zoo / 'code'}"}],
        "eval": {"tasks": ["smoke_mc"], "limit": 8}})
    recipe = trial_recipe(space, optuna.trial.FixedTrial(equal_params(space)))
    assert {str(m.model) for m in recipe.models} == {f"{zoo / 'base'}+{zoo / 'chat'}", f"{zoo / 'base'}+{zoo / 'code'}"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
    with InMemoryMerger(model) as merger:
        stats = merger.apply(recipe)
    assert stats.recomputed > 0
    # the adapted q_proj moved by both adapters' deltas, weighted
    base = load_state(zoo / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base[name])


def test_hub_adapter_from_the_cache(zoo, offline_hub):  # noqa: F811
    fake_hub_cache(offline_hub, "tiny-org/chat-lora", zoo / "chat", "c" * 40)
    ref = ModelRef.parse(f"{zoo / 'base'}+tiny-org/chat-lora")
    assert resolve_model_dir(ref) == zoo / "base"  # config and tokenizer are the base's
    r = parse_recipe({"merge_method": "linear", "dtype": "float32",
                      "models": [{"model": str(ref), "parameters": {"weight": 1.0}}]})
    assert not validate(r).problems
    with pytest.raises(CheckpointError, match="adapter of .*: .*not-cached.*HF_HUB_OFFLINE"):
        resolve_model_dir(ModelRef.parse(f"{zoo / 'base'}+tiny-org/not-cached"))


# ---------------------------------------------------------------- bad adapters
def broken(zoo: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "bad"
    shutil.copytree(zoo / "chat", out)
    edit(out)
    return out


def set_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def wrong_shape(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(d / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key] = torch.zeros(32, state[key].shape[1])
    save_file(state, d / "adapter_model.safetensors")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: (d / "adapter_config.json").unlink(), "has no adapter_config.json; point '\\+' at a PEFT LoRA adapter"),
    (set_config(use_dora=True), "uses DoRA \\(use_dora\\), which cannot be applied here; merge it into its base"),
    (set_config(peft_type="IA3"), "is a IA3 adapter, not LoRA"),
    (set_config(r=3), "LoRA on model.embed_tokens has shapes \\(4, 128\\) and \\(64, 4\\) but rank 3"),
    (wrong_shape, "gives model.layers.0.self_attn.q_proj.weight shape \\(32, 64\\), the base has \\(64, 64\\)"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
])
def test_bad_adapter_is_one_line_before_any_merge(zoo, tmp_path, edit, message):
    bad = broken(zoo, tmp_path, edit)
    r = parse_recipe({"merge_method": "linear", "dtype": "float32",
                      "models": [{"model": f"{zoo / 'base'}+{bad}", "parameters": {"weight": 1.0}}]})
    problems = validate(r).problems
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert f"adapter {zoo / 'base'}+{bad}" in problems[0] or "adapter of" in problems[0], problems
    with pytest.raises(RecipeError, match=message):
        run_merge(r, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_missing_adapter_directory(zoo, tmp_path):
    r = parse_recipe({"merge_method": "linear", "dtype": "float32",
                      "models": [{"model": f"{zoo / 'base'}+{tmp_path / 'nope'}", "parameters": {"weight": 1.0}}]})
    (problem,) = validate(r).problems
    assert "adapter of" in problem and "does not exist; check the path" in problem


def test_programs_that_load_a_model_refuse_an_adapter_ref_with_the_fix(zoo, capsys):
    """`evomerge eval` (transformers loads the folder) cannot apply an adapter: one line saying
    to merge it first, instead of silently scoring the base."""
    from evomerge.cli import main

    ref = f"{zoo / 'base'}+{zoo / 'chat'}"
    assert main(["eval", ref, "--tasks", "smoke_mc", "--limit", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "merge it first" in err and "adapter" in err

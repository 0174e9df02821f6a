"""``lora_merge_dtype`` (mergekit's option): a ``base+adapter`` model read as mergekit reads the
one it merges, the base loaded in that dtype and peft's merge_and_unload run on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import load_state, make_lora_adapter, make_tiny_llama
from test_lora import peft_merged

from evomerge.cli import main
from merge_engine.errors import RecipeError
from merge_engine.io.lora import LoraReader
from merge_engine.io.reader import CheckpointReader
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lmd_zoo")
    make_tiny_llama(d / "base", 0, num_layers=2, hidden=32, intermediate=64)
    make_tiny_llama(d / "other", 1, perturb_from=d / "base")
    make_lora_adapter(d / "ad", d / "base", 1, targets=("q_proj", "down_proj", "embed_tokens"),
                      modules_to_save=("lm_head",))
    return d


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reads_equal_peft_on_a_base_loaded_in_that_dtype(zoo, tmp_path, dtype):
    expected = load_state(peft_merged(zoo / "base", zoo / "ad", tmp_path / "m", dtype))
    with LoraReader(CheckpointReader(zoo / "base"), zoo / "ad", merge_dtype=dtype) as r:
        assert set(r.tensor_names) == set(expected)
        for name in r.tensor_names:  # adapted or not, every tensor takes the merge dtype
            got = r.get(name)
            assert r.dtype(name) == dtype and got.dtype == dtype and r.nbytes(name) == got.nbytes
            assert torch.equal(got, expected[name]), name


def test_run_merge_and_cli_take_it(zoo, tmp_path):
    data = {"merge_method": "linear",
            "models": [{"model": f"{zoo / 'base'}+{zoo / 'ad'}", "parameters": {"weight": 0.5}},
                       {"model": str(zoo / "other"), "parameters": {"weight": 0.5}}]}
    recipe = parse_recipe(data)
    run_merge(recipe, tmp_path / "f32", device="cpu")
    run_merge(recipe, tmp_path / "bf16", device="cpu", lora_merge_dtype="bfloat16")
    f32, bf16 = load_state(tmp_path / "f32"), load_state(tmp_path / "bf16")
    assert {t.dtype for t in f32.values()} == {torch.float32}
    # the adapted model is bf16 and the other float32: the merge promotes to float32 (mergekit's rule)
    assert {t.dtype for t in bf16.values()} == {torch.float32}
    adapted = load_state(peft_merged(zoo / "base", zoo / "ad", tmp_path / "m", torch.bfloat16))
    other = load_state(zoo / "other")
    for name, tensor in bf16.items():
        assert torch.equal(tensor, 0.5 * adapted[name].float() + 0.5 * other[name]), name
    assert not all(torch.equal(f32[n], bf16[n]) for n in f32)
    with pytest.raises(RecipeError, match="lora_merge_dtype 'int8' is not one of"):
        run_merge(recipe, tmp_path / "bad", device="cpu", lora_merge_dtype="int8")
    assert not (tmp_path / "bad").exists()
    path = tmp_path / "r.yml"
    path.write_text(json.dumps(data))
    assert main(["merge", str(path), str(tmp_path / "cli"), "--device", "cpu",
                 "--lora-merge-dtype", "bfloat16"]) == 0
    cli = load_state(tmp_path / "cli")
    assert all(torch.equal(cli[n], bf16[n]) for n in bf16)

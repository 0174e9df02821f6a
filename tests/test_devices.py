"""Device placement: resolving ``--device``, per-device merge settings, backend memory plans,
and the in-memory model matching the disk merge when a checkpoint ties its embeddings.

This machine has no GPU: everything up to the device call is tested on the CPU, and the
``FakeCuda*`` doubles stand for a CUDA runtime (they patch ``torch.cuda``'s queries only).
"""

from __future__ import annotations

import pytest
import torch

from fixtures import load_state, make_tied_llama_storing_head, make_tiny_llama
from merge_engine.apply import InMemoryMerger
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe


# ---------------------------------------------------------------- tied embeddings
@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return {
        "resident": make_tiny_llama(root / "resident", seed=0, tie=True),  # stores only the embedding
        "a": make_tied_llama_storing_head(root / "a", seed=1),
        "b": make_tied_llama_storing_head(root / "b", seed=2),
    }


def test_tied_resident_model_equals_disk_merge_when_the_merge_stores_embedding_and_head(tied_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(tied_zoo["a"]), "parameters": {"weight": 0.3}},
        {"model": str(tied_zoo["b"]), "parameters": {"weight": 0.7}}]})
    out = run_merge(recipe, tmp_path / "disk", device="cpu").out_dir
    stored = load_state(out)
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    from_disk = AutoModelForCausalLM.from_pretrained(out).state_dict()

    model = AutoModelForCausalLM.from_pretrained(tied_zoo["resident"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the resident model starts tied
    with InMemoryMerger(model) as merger:
        merger.apply(recipe)
    in_memory = model.state_dict()
    assert set(in_memory) == set(from_disk)
    for name, tensor in from_disk.items():
        assert torch.equal(in_memory[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 13]])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


# ---------------------------------------------------------------- resolving --device
class FakeCudaWithTwoDevices:
    """Stands for a CUDA runtime with two GPUs (this machine has none): patches only the
    queries ``torch.cuda.is_available`` and ``torch.cuda.device_count``."""

    def __init__(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_resolves_to_cpu_here_and_cuda_gives_one_line_naming_the_fix():
    from merge_engine.devices import DeviceError, pick_device

    assert not torch.cuda.is_available()  # this test describes a machine without CUDA
    assert pick_device("auto") == pick_device(None) == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError) as err:
            pick_device(name)
        assert "\n" not in str(err.value) and "CUDA is not available" in str(err.value)
        assert "--device cpu" in str(err.value)
    with pytest.raises(DeviceError, match="unknown device 'gpu'; use auto, cpu, cuda or cuda:N"):
        pick_device("gpu")


def test_resolution_with_two_gpus_is_concrete_and_checks_the_index(monkeypatch):
    from merge_engine.devices import DeviceError, pick_device

    FakeCudaWithTwoDevices(monkeypatch)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"this machine has 2 GPU\(s\) \(cuda:0 to cuda:1\); pick one"):
        pick_device("cuda:2")


# ---------------------------------------------------------------- host-to-device traffic
def test_block_size_per_device_type():
    from merge_engine import blocks

    assert blocks.block_size("cpu") == blocks.BLOCK == 1 << 18
    assert blocks.block_size(torch.device("cuda", 1)) == blocks.GPU_BLOCK
    assert blocks.GPU_BLOCK >= 128_256 * 2048  # a Llama-3 embedding is one kernel launch


def test_source_home_keeps_sources_on_the_gpu_only_when_they_fit():
    from merge_engine.devices import SOURCE_CACHE_SHARE, source_home

    gib = 1 << 30
    assert source_home("cpu", 100 * gib, None) == "cpu"
    assert source_home("cuda:0", 10 * gib, 80 * gib) == "device"
    assert source_home("cuda:0", int(SOURCE_CACHE_SHARE * 80 * gib) + 1, 80 * gib) == "pinned"
    assert source_home("cuda:0", 1, 80 * gib, on_device=False) == "pinned"
    assert source_home("cuda:0", 100 * gib, 1, on_device=True) == "device"
    assert source_home("cuda:0", 1, None) == "pinned"  # free memory unknown: do not risk the GPU


def test_in_memory_merger_on_cpu_keeps_sources_where_they_are_and_counts_their_bytes(tied_zoo):
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(tied_zoo["a"]), "parameters": {"weight": 0.5}},
        {"model": str(tied_zoo["b"]), "parameters": {"weight": 0.5}}]})
    model = AutoModelForCausalLM.from_pretrained(tied_zoo["resident"])
    with InMemoryMerger(model, sources_on_device=True) as merger:
        merger.apply(recipe)
        assert merger.source_home == "cpu"
        want = 2 * sum(t.numel() * t.element_size() for t in load_state(tied_zoo["a"]).values())
        assert merger._source_bytes(merger.plan(recipe)) == want

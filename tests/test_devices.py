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
def test_block_size_per_device_type(monkeypatch):
    from merge_engine import blocks

    assert blocks.block_size("cpu") == blocks.BLOCK == 1 << 18
    # CUDA blocks are sized by free device memory (FakeCuda: no GPU on this machine)
    free = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 << 30))
    size = blocks.block_size(torch.device("cuda", 1), 64)
    assert size == int((80 << 30) * blocks.CUDA_SHARE) // 64
    assert size >= 128_256 * 2048  # a Llama-3 embedding is one kernel launch per op
    free["bytes"] = 1 << 20  # nearly full: never below the CPU block
    assert blocks.block_size(torch.device("cuda", 0), 64) == blocks.BLOCK
    assert blocks.GPU_BLOCK >= 128_256 * 2048  # other accelerators


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


def test_merge_card_names_the_device_type(tied_zoo, tmp_path):
    recipe = parse_recipe({"merge_method": "linear", "models": [
        {"model": str(tied_zoo["a"]), "parameters": {"weight": 0.5}},
        {"model": str(tied_zoo["b"]), "parameters": {"weight": 0.5}}]})
    out = run_merge(recipe, tmp_path / "m", device="auto").out_dir
    card = (out / "README.md").read_text()
    assert "## Provenance" in card and f"Merged on `cpu` (torch {torch.__version__})" in card


# ---------------------------------------------------------------- the CLI's --device
def _parse(argv):
    from evomerge.cli import build_parser

    return build_parser().parse_args(argv)


COMMANDS_WITH_DEVICE = [
    ["search", "space.yaml"], ["demo"], ["worker", "--storage", "sqlite:///x.db", "--study", "s"],
    ["eval", "model", "--tasks", "smoke_mc"], ["ablate", "grid.yaml"], ["merge", "r.yaml", "out"],
]


@pytest.mark.parametrize("argv", COMMANDS_WITH_DEVICE, ids=lambda a: a[0])
def test_every_command_defaults_to_auto_resolved_once_at_parsing(argv, monkeypatch):
    assert _parse(argv).device == "cpu"  # auto on this machine, never the string "auto"
    FakeCudaWithTwoDevices(monkeypatch)
    assert _parse(argv).device == "cuda:0"
    assert _parse([*argv, "--device", "cuda:1"]).device == "cuda:1"


def test_cuda_without_cuda_is_one_line_and_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(["worker", "--storage", "sqlite:///x.db", "--study", "s", "--device", "cuda:1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evomerge worker: error: argument --device: device cuda:1 was requested but "
                          "CUDA is not available; use --device cpu")


# ---------------------------------------------------------------- backend memory plans
def _cfg(**fields):
    from evomerge.evaluate import EvalConfig

    return EvalConfig(tasks="smoke_mc", **fields)


def test_memory_plan_per_backend():
    from evomerge.devices import Placement, placement

    assert placement(None, "cuda:1") == Placement("cuda:1", "cuda:1")
    assert placement(_cfg(), "cuda:1") == Placement("cuda:1", "cuda:1")
    assert placement(_cfg(device_map="auto"), "cuda:0") == Placement("cuda:0", "cuda:0", "auto")
    assert placement(_cfg(load_in="4bit"), "cuda:0") == Placement("cpu", "cpu")
    assert placement(_cfg(backend="vllm"), "cuda:1") == Placement("cpu", "cpu")


def test_eval_config_refuses_placement_fields_of_the_other_backend():
    with pytest.raises(ValueError, match="load_in is an hf backend setting"):
        _cfg(backend="vllm", load_in="8bit")
    with pytest.raises(ValueError, match="are vllm backend settings"):
        _cfg(tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"vllm_args sets \['gpu_memory_utilization'\]"):
        _cfg(backend="vllm", vllm_args={"gpu_memory_utilization": 0.5})
    with pytest.raises(ValueError):
        _cfg(backend="vllm", gpu_memory_utilization=1.5)


def test_hf_load_kwargs_and_refusals(monkeypatch):
    import importlib.util

    from evomerge.devices import hf_load_kwargs
    from evomerge.evaluate import EvalConfigError
    from evomerge.evaluate.hf import HFEvaluator

    assert hf_load_kwargs(_cfg(), "cpu") == {}
    assert hf_load_kwargs(_cfg(device_map="auto"), "cuda:0") == {"device_map": "auto"}
    with pytest.raises(EvalConfigError, match="^device_map: auto spreads a model over GPUs but this run is on the cpu; run with --device cuda"):
        hf_load_kwargs(_cfg(device_map="auto"), "cpu")
    with pytest.raises(EvalConfigError, match="^load_in: 4bit needs a CUDA device .*; run with --device cuda or remove load_in$"):
        HFEvaluator(_cfg(load_in="4bit"), device="cpu")  # refused before any task or model is loaded
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(EvalConfigError, match="^load_in: 8bit needs bitsandbytes: pip install bitsandbytes"):
            hf_load_kwargs(_cfg(load_in="8bit"), "cuda:1")

    class FakeBitsandbytesInstalled:
        """Stands for an installed bitsandbytes (absent here): only its import spec is found."""

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: FakeBitsandbytesInstalled() if name == "bitsandbytes" else real(name, *a))
    kwargs = hf_load_kwargs(_cfg(load_in="4bit"), "cuda:1")
    assert kwargs["device_map"] == {"": "cuda:1"}
    assert kwargs["quantization_config"].load_in_4bit and not kwargs["quantization_config"].load_in_8bit
    assert hf_load_kwargs(_cfg(load_in="8bit"), "cuda:0")["quantization_config"].load_in_8bit


def test_vllm_engine_setup_per_device():
    from evomerge.evaluate import EvalConfigError
    from evomerge.evaluate.vllm import engine_setup

    config = {"max_position_embeddings": 256}
    cpu = engine_setup(_cfg(backend="vllm"), "cpu", config, environ={})
    assert cpu.kwargs == {"max_model_len": 256, "enforce_eager": True}
    assert cpu.env == {"VLLM_CPU_KVCACHE_SPACE": "1"} and cpu.in_process
    assert engine_setup(_cfg(backend="vllm"), "cpu", config, environ={"VLLM_CPU_KVCACHE_SPACE": "4"}).env == {}

    gpu0 = engine_setup(_cfg(backend="vllm", gpu_memory_utilization=0.6), "cuda:0", config, environ={})
    assert gpu0.kwargs == {"max_model_len": 256, "gpu_memory_utilization": 0.6}  # CUDA graphs on
    assert gpu0.env == {} and gpu0.in_process

    gpu1 = engine_setup(_cfg(backend="vllm"), "cuda:1", config, environ={})
    assert gpu1.env == {"CUDA_VISIBLE_DEVICES": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert not gpu1.in_process
    assert "enforce_eager" not in gpu1.kwargs

    tp2 = engine_setup(_cfg(backend="vllm", tensor_parallel_size=2), "cuda:0", config, environ={})
    assert tp2.kwargs["tensor_parallel_size"] == 2 and tp2.env == {}
    tp2_on_1 = engine_setup(_cfg(backend="vllm", tensor_parallel_size=2), "cuda:1", config,
                            environ={"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert tp2_on_1.env["CUDA_VISIBLE_DEVICES"] == "5,6"
    with pytest.raises(EvalConfigError, match="tensor_parallel_size 2 from cuda:1 needs GPUs up to cuda:2"):
        engine_setup(_cfg(backend="vllm", tensor_parallel_size=2), "cuda:1", config,
                     environ={"CUDA_VISIBLE_DEVICES": "4,5"})
    eager = engine_setup(_cfg(backend="vllm", vllm_args={"enforce_eager": True}), "cuda:0", config, environ={})
    assert eager.kwargs["enforce_eager"] is True  # a user's explicit choice wins

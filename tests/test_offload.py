"""In-place merges into a model accelerate has offloaded (evomerge/offload.py).

On a GPU run with a device_map that spills to the CPU, accelerate keeps offloaded parameters on
the meta device and copies them from a CPU store before each forward. This machine has no GPU,
but accelerate's own CPU-offload hooks (``cpu_offload``, and the hooks ``dispatch_model`` attaches
for ``cpu`` entries, built here with the same store class) run the same code on the CPU with the
CPU as execution device. Disk offload (``disk`` in the device map) is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from fixtures import make_tiny_llama
from evomerge.candidate import Candidate
from evomerge.offload import OffloadError, offloaded, writable_targets
from merge_engine.merge import run_merge
from merge_engine.recipe import parse_recipe

LAYER1 = "model.layers.1"


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return [make_tiny_llama(root / n, seed=s) for n, s in (("base", 0), ("a", 1), ("b", 2))]


def recipe_of(trio, weight):
    base, a, b = trio
    return parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": weight}},
        {"model": str(b), "parameters": {"weight": 1 - weight}}]})


def cpu_offloaded(path):
    """The whole model offloaded by accelerate.cpu_offload (every parameter on meta)."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    return cpu_offload(AutoModelForCausalLM.from_pretrained(path).eval(), execution_device="cpu")


def layer_offloaded_to_cpu(path):
    """Layer 1 offloaded the way dispatch_model offloads ``cpu`` entries on a GPU run: a hook on
    the layer whose store is an OffloadedWeightsLoader holding CPU tensors."""
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    layer = model.get_submodule(LAYER1)
    store = OffloadedWeightsLoader(state_dict={f"{LAYER1}.{k}": v.detach().clone()
                                               for k, v in layer.state_dict().items()})
    attach_align_device_hook(layer, execution_device="cpu", offload=True, weights_map=store,
                             module_name=LAYER1)
    return model


def disk_offloaded(path, folder):
    from transformers import AutoModelForCausalLM

    where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", LAYER1: "disk",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, device_map=where, offload_folder=str(folder)).eval()


def logits(model):
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("load", [cpu_offloaded, layer_offloaded_to_cpu], ids=["cpu_offload", "dispatch_cpu"])
def test_candidate_into_a_cpu_offloaded_model_equals_the_disk_merge_loaded_the_same_way(trio, tmp_path, load):
    from transformers import AutoTokenizer

    model = load(trio[0])
    assert offloaded(model)
    cand = Candidate(model, AutoTokenizer.from_pretrained(trio[0]))
    for weight in (0.3, 0.8):  # the second candidate rewrites what the first wrote
        recipe = recipe_of(trio, weight)
        cand.apply(recipe)
        disk = run_merge(recipe, tmp_path / f"m{weight}", device="cpu").out_dir
        want = logits(load(disk))
        assert torch.equal(logits(model), want)
    assert not torch.equal(want, logits(load(trio[0])))  # the merge changed the model
    cand.close()


def test_writing_the_parameter_itself_would_not_reach_the_forward_pass(trio):
    # why writable_targets exists: the offloaded parameter is a meta tensor refilled from the store
    model = layer_offloaded_to_cpu(trio[0])
    before = logits(model)
    param = dict(model.named_parameters())[f"{LAYER1}.mlp.down_proj.weight"]
    assert param.device.type == "meta"
    param.data.zero_()
    assert torch.equal(logits(model), before)
    writable_targets(model)[f"{LAYER1}.mlp.down_proj.weight"].zero_()
    assert not torch.equal(logits(model), before)


def test_disk_offload_is_refused_in_one_line_naming_the_fix_and_the_checkpoint_is_untouched(trio, tmp_path):
    from transformers import AutoTokenizer

    from fixtures import load_state

    before = load_state(trio[0])
    model = disk_offloaded(trio[0], tmp_path / "offload")
    with pytest.raises(OffloadError) as err:
        Candidate(model, AutoTokenizer.from_pretrained(trio[0]))
    message = str(err.value)
    assert "\n" not in message and f"{LAYER1}." in message and "offloaded to disk" in message
    assert "max_memory" in message
    after = load_state(trio[0])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_depth_change_on_an_offloaded_model_is_refused(trio, tmp_path):
    from transformers import AutoTokenizer

    base = str(trio[0])
    cand = Candidate(cpu_offloaded(trio[0]), AutoTokenizer.from_pretrained(trio[0]))
    stack = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}]},
        {"sources": [{"model": base, "layer_range": [1, 2]}]}]})
    with pytest.raises(OffloadError, match="layer count"):
        cand.apply(stack)


def test_max_memory_reaches_from_pretrained_and_bad_values_are_one_line():
    from evomerge.devices import hf_load_kwargs
    from evomerge.evaluate import EvalConfig

    cfg = EvalConfig(tasks=["smoke_mc"], device_map="auto", max_memory={"0": "70GiB", "cuda:1": 10**9, "CPU": "200GB"})
    assert cfg.max_memory == {0: "70GiB", 1: 10**9, "cpu": "200GB"}
    # the resident model and a loaded directory get the same kwargs (Candidate.load, HFEvaluator)
    assert hf_load_kwargs(cfg, "cuda:0") == {"device_map": "auto", "max_memory": {0: "70GiB", 1: 10**9, "cpu": "200GB"}}
    for bad, match in (({"gpu0": "1GiB"}, "max_memory key 'gpu0' is not a device"),
                       ({0: "lots"}, r"max_memory\[0\] = 'lots' is not a size"),
                       ({0: -5}, r"max_memory\[0\] = -5 is not a size")):
        with pytest.raises(ValueError, match=match):
            EvalConfig(tasks=["smoke_mc"], device_map="auto", max_memory=bad)
    with pytest.raises(ValueError, match="max_memory caps what device_map: auto puts on each device; add device_map: auto"):
        EvalConfig(tasks=["smoke_mc"], max_memory={0: "1GiB"})
    with pytest.raises(ValueError, match="max_memory is an hf backend setting"):
        EvalConfig(tasks=["smoke_mc"], backend="vllm", max_memory={0: "1GiB"})


@pytest.mark.parametrize("load", [cpu_offloaded, layer_offloaded_to_cpu], ids=["cpu_offload", "dispatch_cpu"])
def test_lm_eval_scores_the_offloaded_candidate_as_the_disk_merge(trio, tmp_path, monkeypatch, load):
    # the hf backend's real path: lm-eval's HFLM around the resident (partly offloaded) model
    from transformers import AutoTokenizer

    from evomerge.evaluate import EvalConfig
    from evomerge.evaluate.hf import HFEvaluator

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    evaluator = HFEvaluator(EvalConfig(tasks=["smoke_mc", "smoke_gen"], limit=6, dtype="float32"))
    cand = Candidate(load(trio[0]), AutoTokenizer.from_pretrained(trio[0]))
    recipe = recipe_of(trio, 0.6)
    cand.apply(recipe)
    in_memory = evaluator.evaluate(cand.model, cand.tokenizer)
    disk = run_merge(recipe, tmp_path / "disk", device="cpu").out_dir
    from_disk = evaluator.evaluate(load(disk), AutoTokenizer.from_pretrained(disk))
    assert [t.value for t in in_memory.tasks] == [t.value for t in from_disk.tasks]
    assert in_memory.n_samples == from_disk.n_samples == 12
    cand.close()

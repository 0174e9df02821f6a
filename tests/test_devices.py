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

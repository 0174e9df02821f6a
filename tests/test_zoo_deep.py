"""The ``deep`` zoo variant (six layers per model, for layer-path search): it builds and loads
(with its training cut to a few steps), and adding it left the demo zoo's cache key alone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import torch

from evomerge.zoo import build_zoo
from evomerge.zoo.build import RECIPES, ZOO_VERSION, _cached


def test_demo_recipe_and_cache_key_are_unchanged():
    # A demo zoo built before the deep variant existed must still be found in the cache:
    # changing this recipe means bumping ZOO_VERSION (and this pin) on purpose.
    digest = hashlib.sha256(repr(RECIPES["demo"]).encode()).hexdigest()[:16]
    assert (ZOO_VERSION, digest) == ("1", "20150658a4f155df")
    deep = RECIPES["deep"]
    assert deep.model.layers == 6 > RECIPES["demo"].model.layers
    assert replace(deep, model=RECIPES["demo"].model) == RECIPES["demo"]  # only the depth differs


def test_deep_variant_builds_loads_and_is_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quick = replace(RECIPES["deep"], base=replace(RECIPES["deep"].base, steps=3, warmup=1),
                    expert=replace(RECIPES["deep"].expert, steps=2, warmup=1), score_examples=4)
    monkeypatch.setitem(RECIPES, "deep", quick)
    zoo = build_zoo(tmp_path / "deep", "deep", seed=0, log=lambda _: None)
    assert json.loads((zoo.root / "zoo.json").read_text())["variant"] == "deep"
    assert _cached(zoo.root, "deep", 0) == zoo and _cached(zoo.root, "demo", 0) is None
    for path in zoo.models.values():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        assert model.config.num_hidden_layers == len(model.model.layers) == 6
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("add 12+34=", return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(model(**ids).logits).all()


def test_committed_dataflow_recipes_validate_on_a_deep_shaped_zoo(tmp_path, capsys):
    """results/dataflow/recipes/*.yaml (the experiment's best recipes, c.yaml in two stages)
    name their models as ``${ZOO}/...`` and validate against six-layer models of the zoo's names."""
    from pathlib import Path

    from fixtures import make_tiny_llama

    from evomerge.cli import main
    from merge_engine.stages import load_stages

    recipes = sorted((Path(__file__).resolve().parents[1] / "results" / "dataflow" / "recipes").glob("*.yaml"))
    assert [p.name for p in recipes] == ["a.yaml", "b.yaml", "c.yaml"]
    base = make_tiny_llama(tmp_path / "base", 0, num_layers=6)
    for i, skill in enumerate(("add", "sort", "shift"), 1):
        make_tiny_llama(tmp_path / f"{skill}_expert", i, num_layers=6, perturb_from=base)
    for path in recipes:
        text = path.read_text()
        assert "/tmp/" not in text and "${ZOO}/" in text, path
        assert main(["validate", str(path), "--var", f"ZOO={tmp_path}"]) == 0, capsys.readouterr().err
    assert [s.name for s in load_stages(recipes[2], {"ZOO": str(tmp_path)})] == ["params_merge", None]

"""The MoE search space: genes by name, a FixedTrial -> a buildable mergekit-moe config, infeasible
trials pruned with the rule they break."""

from __future__ import annotations

import re

import optuna
import pytest
import torch
from fixtures import make_tiny_llama
from pydantic import ValidationError

from evomerge.moe.space import MoESpace, moe_distributions, trial_moe_config
from merge_engine.moe import MoEBuilder


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_space")
    base = make_tiny_llama(root / "base", 0)
    experts = [{"name": n, "model": str(make_tiny_llama(root / n, i, perturb_from=base))}
               for i, n in enumerate(("math", "code", "chat"), 1)]
    experts[2]["prompts"] = ["hi there", "how are you"]
    return MoESpace.model_validate({
        "base_model": str(base), "experts": experts, "prompt_pool": ["1 + 2", "def f():", "sort a b"],
        "gate_modes": ["hidden", "cheap_embed", "random"], "experts_per_token": [1, 3], "dtype": "float32"})


def test_genes_are_named_and_a_trial_builds(space):
    dists = moe_distributions(space)
    assert list(dists)[:4] == ["use.math", "prompt.math.0", "prompt.math.1", "prompt.math.2"]
    assert {"use.chat", "prompt.chat.0", "prompt.chat.1", "gate_mode", "experts_per_token"} <= set(dists)
    params = {name: True for name in dists if name.startswith(("use.", "prompt."))}
    params.update({"use.code": False, "prompt.math.1": False, "prompt.chat.0": False,
                   "gate_mode": "hidden", "experts_per_token": 3})
    config = trial_moe_config(space, optuna.trial.FixedTrial(params))
    assert [str(e.source_model).rsplit("/", 1)[1] for e in config.experts] == ["math", "chat"]
    assert config.experts[0].positive_prompts == ["1 + 2", "sort a b"]
    assert config.experts[1].positive_prompts == ["how are you"]
    assert config.experts_per_token == 2  # clamped to the experts chosen
    with MoEBuilder(device="cpu", router_dtype="float32") as builder:
        built = builder.build(config)
    assert built.state["model.layers.0.block_sparse_moe.gate.weight"].shape == (2, 64)
    assert torch.isfinite(built.state["model.layers.1.block_sparse_moe.gate.weight"]).all()


@pytest.mark.parametrize("change, rule", [
    ({"use.math": False, "use.code": False}, "1 experts chosen; the space needs at least 2"),
    ({"prompt.math.0": False, "prompt.math.1": False, "prompt.math.2": False}, "experts[0]: no positive_prompts"),
    ({"use.chat": False}, "every expert has the same prompts"),
])
def test_infeasible_trials_are_pruned_with_the_rule(space, change, rule):
    params = {name: True for name in moe_distributions(space) if name.startswith(("use.", "prompt."))}
    params.update({"gate_mode": "cheap_embed", "experts_per_token": 1, **change})
    with pytest.raises(optuna.TrialPruned, match=re.escape(rule)):
        trial_moe_config(space, optuna.trial.FixedTrial(params))


def test_space_rules_are_one_line_each(space):
    data = space.model_dump()
    data.update(gate_modes=["hidden", "bogus"])
    with pytest.raises(ValidationError, match="gate_modes"):
        MoESpace.model_validate(data)
    data.update(gate_modes=["hidden"], prompt_pool=None, min_experts=5, experts_per_token=[2, 1])
    with pytest.raises(ValidationError) as err:
        MoESpace.model_validate(data)
    text = str(err.value)
    assert "min_experts: 5" in text and "experts_per_token: [2, 1]" in text and "experts.math: no prompts" in text

"""MoE searches on tiny real Llamas: candidates written into a resident MoE in place equal fresh
loads; a candidate with a merged shared part equals `evomerge merge` + `evomerge moe` of its saved
files, bit for bit; `evomerge search` on a space with a moe: block runs the real loop (SQLite,
lm-eval smoke task) and survives a candidate that cannot be built."""

from __future__ import annotations

import glob

import optuna
import pytest
import torch
import yaml
from fixtures import make_tiny_llama
from optuna.trial import TrialState
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.moe.candidate import MoECandidate
from evomerge.results import export_study
from evomerge.moe.search_space import default_params, moe_space_distributions, parse_moe_space, trial_moe_recipe
from evomerge.search.study import default_storage
from evomerge.space import SpaceError
from merge_engine.merge import run_merge
from merge_engine.moe import (MoEBuilder, build_moe, build_moe_in_memory, load_moe_config, load_moe_model,
                              parse_moe_config)
from merge_engine.moe.apply import write_moe_into

IDS = torch.tensor([[1, 40, 41, 42, 69, 70, 71, 5, 6]])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_search")
    base = make_tiny_llama(root / "base", 0)
    models = {n: make_tiny_llama(root / n, i, perturb_from=base, scale=0.05) for i, n in enumerate("abc", 1)}
    models["odd"] = make_tiny_llama(root / "odd", 4, intermediate=96)  # not a fine-tune of base
    return {"base": base, **models}


pytestmark = pytest.mark.usefixtures("hf_home_in_tmp")


def config(zoo, names, **extra):
    prompts = {"a": ["abc", "x y"], "b": ["hello", "1 2 3"], "c": ["zz top", "q"]}
    data = {"base_model": str(zoo["base"]), "dtype": "float32",
            "experts": [{"source_model": str(zoo[n]), "positive_prompts": prompts[n]} for n in names]}
    return parse_moe_config({**data, **extra})


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("extra", [{}, {"architecture": "qwen", "shared_experts": [
    {"source_model": "BASE", "positive_prompts": ["shared"]}]}], ids=["mixtral", "qwen2_moe"])
def test_in_place_equals_a_fresh_load_and_another_shape_is_refused(zoo, extra):
    if extra:
        extra["shared_experts"][0]["source_model"] = str(zoo["base"])
    with MoEBuilder(device="cpu", router_dtype="float32") as builder:
        first = builder.build(config(zoo, "ab", experts_per_token=1, **extra))
        second = builder.build(config(zoo, "ba", gate_mode="cheap_embed", experts_per_token=2, **extra))
        three = builder.build(config(zoo, "abc", **extra))
    resident = load_moe_model(first)
    before = logits(resident)
    assert not write_moe_into(resident, three)  # 3 experts: needs a model of its own
    assert torch.equal(logits(resident), before)  # and nothing was written
    assert write_moe_into(resident, second)
    assert resident.config.num_experts_per_tok == 2
    fresh = logits(load_moe_model(second))
    assert torch.equal(logits(resident), fresh) and not torch.equal(fresh, before)


def space_data(zoo, **overrides):
    data = {"name": "moe_t", "base_model": str(zoo["base"]),
            "models": [{"name": n, "model": str(zoo[n])} for n in "ab"],
            "moe": {"prompts": {"a": ["abc", "x y", "k"], "b": ["hello", "1 2 3"]},
                    "gate_modes": ["hidden", "cheap_embed"], "experts_per_token": [1, 2]},
            "eval": {"tasks": ["smoke_mc"], "limit": 6, "batch_size": 32}, "seed": 1}
    data.update(overrides)
    return data


def test_genes_of_both_parts_and_one_line_errors(zoo):
    plain = parse_moe_space(space_data(zoo))
    assert list(moe_space_distributions(plain)) == ["prompt.a.0", "prompt.a.1", "prompt.a.2", "prompt.b.0",
                                                    "prompt.b.1", "gate_mode", "experts_per_token"]
    merged = parse_moe_space(space_data(zoo, method="task_arithmetic", search={"weight": [0.0, 1.0]},
                                        parameters={"lambda": 1.0}))
    assert {"a.weight", "b.weight"} <= set(moe_space_distributions(merged))
    recipe = trial_moe_recipe(plain, optuna.trial.FixedTrial(default_params(plain)))
    assert recipe.shared is None and recipe.config.gate_mode == "hidden" and recipe.config.experts_per_token == 2
    bad = space_data(zoo)
    bad["moe"] = {**bad["moe"], "prompts": {"a": ["x"], "zed": ["y"]}, "base_model": "elsewhere"}
    with pytest.raises(SpaceError) as err:
        parse_moe_space(bad)
    text = str(err.value)
    assert "moe.prompts: ['zed'] are not expert names" in text and "moe.base_model: comes from" in text


def test_example_space_loads_and_its_defaults_build(tmp_path):
    from pathlib import Path

    from evomerge.moe.search_space import load_moe_space

    base = make_tiny_llama(tmp_path / "base", 0)
    for name in ("add_expert", "sort_expert", "shift_expert"):
        make_tiny_llama(tmp_path / name, 1, perturb_from=base)
    space = load_moe_space(Path(__file__).parents[1] / "search_spaces" / "zoo_moe.yaml", {"ZOO": str(tmp_path)})
    genes = moe_space_distributions(space)
    assert {"prompt.add.2", "gate_mode", "experts_per_token", "add.weight"} <= set(genes) and "use.add" in genes
    params = {**default_params(space), "add.weight": 0.2, "sort.weight": 0.3, "shift.weight": 0.4}
    recipe = trial_moe_recipe(space, optuna.trial.FixedTrial(params))
    assert len(recipe.config.experts) == 3 and recipe.shared.merge_method == "task_arithmetic"


def test_shared_merge_candidate_equals_merge_then_moe_on_disk(zoo, tmp_path):
    space = parse_moe_space(space_data(zoo, method="task_arithmetic", search={"weight": [0.0, 1.0]},
                                       parameters={"lambda": 1.0}, task_vector_cache="64MiB"))
    params = {**default_params(space), "a.weight": 0.712345678, "b.weight": 0.4}  # rounded as saved
    recipe = trial_moe_recipe(space, optuna.trial.FixedTrial(params))
    other = trial_moe_recipe(space, optuna.trial.FixedTrial({**params, "a.weight": 0.1, "prompt.a.2": False}))
    with MoECandidate.load(space, device="cpu") as cand:
        assert cand.dense.merger.task_vectors.cap_bytes == 64 << 20  # the space's cap
        assert not cand.apply(other).in_place
        assert cand.apply(recipe).in_place  # same shape: written into the resident model
        memory, resident = cand.built.state, logits(cand.model)
    run_merge(recipe.shared, tmp_path / "shared", device="cpu")
    (tmp_path / "moe.yml").write_text(recipe.moe_yaml())
    build_moe(load_moe_config(tmp_path / "moe.yml", variables={"SHARED": str(tmp_path / "shared")}),
              tmp_path / "out", device="cpu", seed=recipe.seed)
    disk = {}
    for f in glob.glob(str(tmp_path / "out" / "*.safetensors")):
        disk.update(load_file(f))
    assert sorted(disk) == sorted(memory)
    assert all(torch.equal(disk[k], memory[k]) for k in disk)
    # the shared weights are the merge's, the experts the models' own
    assert not torch.equal(disk["model.embed_tokens.weight"], load_file(str(zoo["base"] / "model.safetensors"))[
        "model.embed_tokens.weight"])
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()), resident)


def test_search_runs_the_loop_and_survives_an_unbuildable_candidate(zoo, tmp_path):
    data = space_data(zoo, models=[{"name": n, "model": str(zoo[n])} for n in ("a", "b", "odd")],
                      report_eval={"limit": 6}, top_k=1, budget={"trials": 2})
    data["moe"] = {"prompts": {"a": ["abc"], "b": ["hello"], "odd": ["odd one"]}, "gate_modes": ["cheap_embed"],
                   "experts_per_token": [1, 1], "min_experts": 2}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    out.mkdir()
    # the study's first candidates, fixed: every expert (the odd one cannot be built), then a and b
    study = optuna.create_study(storage=default_storage(out), study_name="moe_t", direction="maximize")
    every = default_params(parse_moe_space(data))
    assert every == {"use.a": True, "use.b": True, "use.odd": True}
    for params in (every, {**every, "use.odd": False}, {**every, "use.odd": False}):
        study.enqueue_trial(params)
    assert main(["search", str(tmp_path / "space.yaml"), "--out", str(out), "--device", "cpu", "--materialize"]) == 0
    trials = optuna.load_study(study_name="moe_t", storage=default_storage(out)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "odd" in trials[0].user_attrs["error"]
    best = sorted((out / "best").glob("01_*.moe.yml"))
    assert len(best) == 1 and not (out / "best" / best[0].name.replace(".moe.yml", ".shared.yml")).exists()
    rebuilt = load_moe_config(best[0])  # the saved config is mergekit-moe's format, no shared merge
    assert [str(e.source_model) for e in rebuilt.experts] == [str(zoo["a"]), str(zoo["b"])]
    assert rebuilt.gate_mode == "cheap_embed" and rebuilt.experts_per_token == 1
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out / "best_model").eval()),
                       logits(load_moe_model(build_moe_in_memory(rebuilt, device="cpu"))))
    report = (out / "report.txt").read_text()
    export_study(default_storage(out), "moe_t", tmp_path / "exported")  # the same files from the storage
    assert (tmp_path / "exported" / "best" / best[0].name).read_text() == best[0].read_text()
    assert "input odd" in report and "input base" in report
    assert "merge (trial 1)" in report or "merge (trial 2)" in report


def test_committed_moe_results_are_mergekit_moe_configs():
    """results/moe/search/best: each MoE config reads as mergekit-moe's format once ZOO (and
    SHARED, the shared merge's folder) are given; each shared merge is a valid merge recipe."""
    from pathlib import Path

    from merge_engine.recipe import load_recipe

    best = Path(__file__).parents[1] / "results" / "moe" / "search" / "best"
    configs = sorted(best.glob("*.moe.yml"))
    assert configs
    for path in configs:
        config = load_moe_config(path, variables={"ZOO": "/zoo", "SHARED": "/shared"})
        assert str(config.base_model) == "/shared" and all(str(e.source_model).startswith("/zoo/")
                                                           for e in config.experts)
        shared = load_recipe(path.with_name(path.name.replace(".moe.yml", ".shared.yml")), {"ZOO": "/zoo"})
        assert shared.merge_method == "task_arithmetic"

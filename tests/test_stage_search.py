"""Multi-stage candidates on tiny real checkpoints: a searched stage after fixed stages and before
them, and per-layer-group methods. Each candidate is built with FixedTrial, applied in memory, and
compared bit for bit with ``evomerge merge`` of the multi-stage recipe file a search saves."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from fixtures import load_state, make_tiny_llama

from evomerge.candidate import Candidate
from evomerge.space import SpaceError, distributions, equal_params, parse_space
from evomerge.proposal import MultiStageRecipe
from evomerge.space.genome import trial_candidate, trial_recipe, trial_stages
from evomerge.space.stages import METHOD_STAGE, validate_candidate
from merge_engine.stages import stages_yaml

LAYERS = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stage_search")
    make_tiny_llama(d / "base", 0, num_layers=LAYERS)
    for i, name in enumerate(("a", "b", "c"), 1):
        make_tiny_llama(d / name, i, num_layers=LAYERS, perturb_from=d / "base", scale=0.05)
    (d / "fixed.yaml").write_text(yaml.safe_dump(
        {"name": "first", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": str(d / "a"), "parameters": {"weight": 0.3}},
                    {"model": str(d / "b"), "parameters": {"weight": 0.7}}]}, sort_keys=False))
    (d / "around.yaml").write_text(yaml.safe_dump_all([
        {"name": "first", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": str(d / "a"), "parameters": {"weight": 0.5}},
                    {"model": str(d / "b"), "parameters": {"weight": 0.5}}]},
        {"merge_method": "slerp", "base_model": "first", "dtype": "float32",
         "models": [{"model": "first"}, {"model": str(d / "c")}], "parameters": {"t": 0.4}}],
        sort_keys=False))
    return d


def space(zoo: Path, **fields) -> object:
    data = {"name": "staged", "eval": {"tasks": ["smoke_mc"], "limit": 4}, **fields}
    return parse_space(data, base_dir=zoo)


def merged_equals_memory(stages, zoo: Path, out: Path, cand: Candidate) -> None:
    """``evomerge merge`` of the saved multi-stage file equals the in-memory candidate, bit for bit."""
    from evomerge.cli import main

    recipe = out.with_suffix(".yaml")
    recipe.write_text(stages_yaml(stages))
    assert main(["merge", str(recipe), str(out), "--device", "cpu"]) == 0
    disk, memory = load_state(out), cand.model.state_dict()
    assert disk.keys() <= memory.keys()
    for name, tensor in disk.items():
        assert torch.equal(memory[name], tensor), name


def test_searched_final_stage_reads_fixed_stages_from_memory(zoo, tmp_path):
    sp = space(zoo, stages="fixed.yaml", method="ties", base_model=str(zoo / "base"),
               models=[{"name": "first", "model": "first"}, {"name": "c", "model": str(zoo / "c")}],
               search={"weight": [0.1, 1.0], "density": [0.3, 1.0]})
    assert sp.num_layers == LAYERS and not validate_candidate(sp, _recipe(sp)).problems
    params = {**equal_params(sp), "first.weight": 0.8, "c.weight": 0.4, "first.density": 0.5}
    stages = trial_stages(sp, optuna.trial.FixedTrial(params))
    assert [s.name for s in stages] == ["first", None]
    with Candidate.load(zoo / "base", dtype="float32") as cand:
        cand.apply(stages)
        again = trial_stages(sp, optuna.trial.FixedTrial({**params, "c.weight": 0.9}))
        cand.apply(again)  # the fixed stage is computed once per run
        assert cand.pipeline.computed == ["first"]
        cand.apply(stages)
        merged_equals_memory(stages, zoo, tmp_path / "out", cand)


def test_searched_stage_before_fixed_ones_is_recomputed_and_read_by_them(zoo, tmp_path):
    sp = space(zoo, stages={"file": "around.yaml", "replace": "first"}, method="linear",
               models=[{"name": "a", "model": str(zoo / "a")}, {"name": "b", "model": str(zoo / "b")}])
    trials = [{"a.weight": 0.2, "b.weight": 0.8}, {"a.weight": 0.9, "b.weight": 0.1}]
    with Candidate.load(zoo / "base", dtype="float32") as cand:
        for i, params in enumerate(trials):
            stages = trial_stages(sp, optuna.trial.FixedTrial(params))
            assert [s.name for s in stages] == ["first", None]
            assert stages[0].recipe.models[0].parameters["weight"] == params["a.weight"]
            cand.apply(stages)
            merged_equals_memory(stages, zoo, tmp_path / f"out{i}", cand)
        assert cand.pipeline.computed == ["first", "first"]


def test_a_trial_proposes_its_recipe_or_its_stages_as_one_multi_stage_recipe(zoo):
    """What the search loop applies and stores: a plain space's recipe itself; a staged space's
    stages as a MultiStageRecipe, whose YAML and seed are those of its stages."""
    models = [{"name": "a", "model": str(zoo / "a")}, {"name": "b", "model": str(zoo / "b")}]
    plain = space(zoo, method="linear", models=models)
    trial = optuna.trial.FixedTrial({"a.weight": 0.2, "b.weight": 0.8})
    assert trial_candidate(plain, trial) == trial_recipe(plain, trial)
    staged = space(zoo, stages={"file": "around.yaml", "replace": "first"}, method="linear", models=models)
    proposal, stages = trial_candidate(staged, trial), trial_stages(staged, trial)
    assert isinstance(proposal, MultiStageRecipe) and list(proposal) == stages
    assert proposal.to_yaml() == stages_yaml(stages) and proposal.to_yaml().count("merge_method") == 2
    assert proposal.seed == stages[-1].recipe.seed


def test_per_layer_group_methods_build_a_passthrough_of_method_stages(zoo, tmp_path):
    sp = space(zoo, method=["linear", "ties"], base_model=str(zoo / "base"), layer_granularity=2,
               layer_methods=True, models=[{"name": "a", "model": str(zoo / "a")},
                                           {"name": "b", "model": str(zoo / "b")}])
    dists = distributions(sp)
    assert dists["layers_00_01.method"].choices == ("linear", "ties") and "method" not in dists
    params = {**equal_params(sp, "linear"), **{k: v for k, v in equal_params(sp, "ties").items()
                                               if not k.endswith(".method")}}
    mixed = trial_stages(sp, optuna.trial.FixedTrial({**params, "layers_00_01.method": "ties"}))
    assert [s.name for s in mixed] == [METHOD_STAGE.format("ties"), METHOD_STAGE.format("linear"), None]
    final = mixed[-1].recipe
    assert final.merge_method == "passthrough"
    assert [(str(sl.sources[0].model), sl.sources[0].layer_range) for sl in final.slices] == [
        ("method-ties", (0, 2)), ("method-linear", (2, 4))]
    one = trial_stages(sp, optuna.trial.FixedTrial(params))  # every group picks linear
    assert len(one) == 1 and one[0].recipe.merge_method == "linear"
    with Candidate.load(zoo / "base", dtype="float32") as cand:
        cand.apply(mixed)
        merged_equals_memory(mixed, zoo, tmp_path / "mixed", cand)
        cand.apply(one)
        merged_equals_memory(one, zoo, tmp_path / "one", cand)


def test_bad_stage_settings_are_one_line_each(zoo):
    models = [{"name": "a", "model": str(zoo / "a")}, {"name": "b", "model": str(zoo / "b")}]
    with pytest.raises(SpaceError, match="stages.replace 'nope' is no stage"):
        space(zoo, stages={"file": "around.yaml", "replace": "nope"}, method="linear", models=models)
    with pytest.raises(SpaceError, match="has an unnamed final stage"):
        space(zoo, stages="around.yaml", method="linear", models=models)
    with pytest.raises(SpaceError, match="stages file .*missing.yaml does not exist"):
        space(zoo, stages="missing.yaml", method="linear", models=models)
    with pytest.raises(SpaceError, match="layer_methods needs several methods"):
        space(zoo, method="linear", layer_granularity=2, layer_methods=True, models=models)


def _recipe(sp):
    from evomerge.space import build_recipe

    return build_recipe(sp, sp.methods[0], equal_params(sp))


def test_a_search_over_a_fixed_stage_saves_multi_stage_best_recipes(zoo, tmp_path):
    """``evomerge search`` end to end (real lm-eval scoring): best/01 is the whole multi-stage
    recipe and ``evomerge merge`` of it equals the best candidate applied in memory; the stage
    read as an input model is scored beside the others."""
    from evomerge.cli import main
    from evomerge.results.store import top_trials, trial_stages_of

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "name": "over_first", "stages": str(zoo / "fixed.yaml"), "method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [{"name": "first", "model": "first"}, {"name": "c", "model": str(zoo / "c")}],
        "eval": {"tasks": ["smoke_mc"], "limit": 4, "batch_size": 32},
        "report_eval": {"limit": 2}, "budget": {"trials": 2}, "top_k": 1}))
    out = tmp_path / "run"
    assert main(["search", str(space_file), "--out", str(out), "--device", "cpu"]) == 0
    study = optuna.load_study(study_name="over_first", storage=f"sqlite:///{out / 'study.db'}")
    assert "error" not in study.user_attrs["inputs"]["first"]  # the stage scored as an input
    best_file = next((out / "best").glob("01_*.yaml"))
    stages = trial_stages(parse_space(yaml.safe_load(space_file.read_text())),
                          optuna.trial.FixedTrial(top_trials(study, 1)[0].params))
    assert stages_yaml(stages) == stages_yaml(trial_stages_of(top_trials(study, 1)[0]))
    with Candidate.load(zoo / "base", dtype="float32") as cand:
        cand.apply(stages)
        assert main(["merge", str(best_file), str(tmp_path / "best_model"), "--device", "cpu"]) == 0
        disk, memory = load_state(tmp_path / "best_model"), cand.model.state_dict()
        for name, tensor in disk.items():
            assert torch.equal(memory[name], tensor), name


def test_a_layer_path_over_a_fixed_stage_keeps_only_the_stages_it_reads(zoo, tmp_path):
    """A path may skip a fixed stage's layers: the candidate then holds no stage nothing reads
    (``evomerge merge`` refuses such a file); a path through it plans the stage without merging."""
    from evomerge.space.layer_path import identity_params

    sp = space(zoo, stages="fixed.yaml", method="passthrough", layer_path={"repeats": 1, "scale": False},
               models=[{"name": "first", "model": "first"}, {"name": "c", "model": str(zoo / "c")}])
    through_c = trial_stages(sp, optuna.trial.FixedTrial(identity_params(sp, "c")))
    assert [s.name for s in through_c] == [None]
    through_first = trial_stages(sp, optuna.trial.FixedTrial(identity_params(sp, "first")))
    assert [s.name for s in through_first] == ["first", None]
    with Candidate.load(zoo / "c", dtype="float32") as cand:
        for i, stages in enumerate((through_c, through_first)):
            cand.apply(stages)
            merged_equals_memory(stages, zoo, tmp_path / f"out{i}", cand)

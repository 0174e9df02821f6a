"""LoRA adapters across stages, on tiny real checkpoints and real peft adapters: ``lora_merge_dtype``
in multi-stage merges and in memory (the same bits as merging stage by stage through disk), and
``stage+adapter`` references in a multi-stage recipe and in a search over fixed stages."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from fixtures import load_state, make_lora_adapter, make_tiny_llama

from evomerge.candidate import Candidate
from evomerge.cli import main
from evomerge.space import parse_space
from evomerge.space.genome import trial_stages
from evomerge.space.stages import input_stages, validate_candidate
from merge_engine.errors import RecipeError
from merge_engine.merge import run_merge
from merge_engine.multistage import run_stages
from merge_engine.recipe import parse_recipe
from merge_engine.stage_validate import validate_stages
from merge_engine.stages import parse_stages, stages_yaml

LAYERS = 2


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stage_adapters")
    make_tiny_llama(d / "base", 0, num_layers=LAYERS, hidden=32, intermediate=64)
    for i, name in enumerate("abc", 1):
        make_tiny_llama(d / name, i, perturb_from=d / "base", scale=0.05)
    make_lora_adapter(d / "la", d / "a", 5, targets=("q_proj", "down_proj", "embed_tokens"))
    make_lora_adapter(d / "ls", d / "base", 6, targets=("k_proj", "up_proj"), modules_to_save=("lm_head",))
    make_tiny_llama(d / "wide", 4, num_layers=LAYERS, hidden=64, intermediate=64)
    make_lora_adapter(d / "lwide", d / "wide", 7)  # made for another shape: fits no stage here
    return d


def docs(zoo: Path) -> list[dict]:
    """first: linear(a+la, b); final: linear(first+ls, c): adapters on a model and on a stage."""
    return [{"name": "first", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": f"{zoo / 'a'}+{zoo / 'la'}", "parameters": {"weight": 0.5}},
                        {"model": str(zoo / "b"), "parameters": {"weight": 0.5}}]},
            {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": f"first+{zoo / 'ls'}", "parameters": {"weight": 0.6}},
                        {"model": str(zoo / "c"), "parameters": {"weight": 0.4}}]}]


def stage_by_stage(zoo: Path, root: Path, lora_merge_dtype: str | None) -> Path:
    """The two stages merged one by one through disk, as a mergekit user would."""
    first, final = docs(zoo)
    run_merge(parse_recipe(first), root / "first", device="cpu", lora_merge_dtype=lora_merge_dtype)
    final["models"][0]["model"] = f"{root / 'first'}+{zoo / 'ls'}"
    run_merge(parse_recipe(final), root / "final", device="cpu", lora_merge_dtype=lora_merge_dtype)
    return root / "final"


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(want) <= set(got)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def bf16_reference(zoo, tmp_path_factory) -> dict[str, torch.Tensor]:
    return load_state(stage_by_stage(zoo, tmp_path_factory.mktemp("by_stage"), "bfloat16"))


def test_multi_stage_merge_takes_lora_merge_dtype(zoo, bf16_reference, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all(docs(zoo), sort_keys=False))
    assert main(["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "--lora-merge-dtype", "bfloat16"]) == 0
    assert_same_weights(load_state(tmp_path / "out"), bf16_reference)
    # the intermediate spilled to disk (its adapter then read from the folder): the same bits
    run_stages(parse_stages(docs(zoo)), tmp_path / "spilled", device="cpu", memory_budget=0,
               lora_merge_dtype="bfloat16")
    assert_same_weights(load_state(tmp_path / "spilled"), bf16_reference)
    plain = load_state(stage_by_stage(zoo, tmp_path / "f32", None))
    assert not all(torch.equal(plain[n], bf16_reference[n]) for n in plain)  # the option changes bits
    assert main(["merge", str(path), str(tmp_path / "dry"), "--dry-run", "--lora-merge-dtype", "float16"]) == 0


def test_in_memory_candidates_take_lora_merge_dtype(zoo, bf16_reference, tmp_path):
    first = parse_recipe(docs(zoo)[0])
    run_merge(first, tmp_path / "first", device="cpu", lora_merge_dtype="bfloat16")
    with Candidate.load(zoo / "base", dtype="float32", lora_merge_dtype="bfloat16") as cand:
        cand.apply(first)  # a base+adapter model in a one-stage recipe
        assert_same_weights(cand.model.state_dict(), load_state(tmp_path / "first"))
        cand.apply(parse_stages(docs(zoo)))  # and on a stage
        assert_same_weights(cand.model.state_dict(), bf16_reference)


def space(zoo: Path, **fields) -> object:
    data = {"name": "adapted", "eval": {"tasks": ["smoke_mc"], "limit": 4}, "method": "linear",
            "dtype": "float32", **fields}
    return parse_space(data, base_dir=zoo)


def test_a_searched_stage_reads_a_fixed_stage_with_an_adapter(zoo, tmp_path):
    (zoo / "fixed.yaml").write_text(yaml.safe_dump(docs(zoo)[0] | {"dtype": "float32"}, sort_keys=False))
    sp = space(zoo, stages="fixed.yaml", models=[{"name": "first_ls", "model": "first+./ls"},
                                                 {"name": "c", "model": str(zoo / "c")}])
    assert sp.num_layers == LAYERS and not validate_candidate(sp, trial_stages(
        sp, optuna.trial.FixedTrial({"first_ls.weight": 0.5, "c.weight": 0.5}))[-1].recipe).problems
    with Candidate.load(zoo / "base", dtype="float32") as cand:
        for i, weights in enumerate([(0.6, 0.4), (0.2, 0.9)]):
            stages = trial_stages(sp, optuna.trial.FixedTrial({"first_ls.weight": weights[0],
                                                               "c.weight": weights[1]}))
            assert [s.name for s in stages] == ["first", None]
            cand.apply(stages)
            disk = merged(stages, tmp_path / f"out{i}")
            assert_same_weights(cand.model.state_dict(), disk)
        assert cand.pipeline.computed == ["first"]  # the fixed stage once, its adapter reader reused
        # the input model "first+adapter" is scored as the stage's output with the adapter applied
        inputs = input_stages(sp, f"first+{zoo / 'ls'}")
        assert [s.name for s in inputs] == ["first", None]
        cand.apply(inputs)
        assert_same_weights(cand.model.state_dict(), merged(inputs, tmp_path / "input"))


def test_a_fixed_stage_reads_the_searched_one_with_an_adapter(zoo, tmp_path):
    """The searched stage is recomputed per candidate; the adapter reader over its old output is
    dropped with it (a stale reader would give the previous candidate's weights)."""
    around = docs(zoo)
    (zoo / "around.yaml").write_text(yaml.safe_dump_all(around, sort_keys=False))
    sp = space(zoo, stages={"file": "around.yaml", "replace": "first"},
               models=[{"name": "a", "model": str(zoo / "a")}, {"name": "b", "model": str(zoo / "b")}])
    with Candidate.load(zoo / "base", dtype="float32") as cand:
        for i, weights in enumerate([(0.2, 0.8), (0.9, 0.1)]):
            stages = trial_stages(sp, optuna.trial.FixedTrial({"a.weight": weights[0], "b.weight": weights[1]}))
            cand.apply(stages)
            assert_same_weights(cand.model.state_dict(), merged(stages, tmp_path / f"out{i}"))
        assert cand.pipeline.computed == ["first", "first"]


def test_an_adapter_that_does_not_fit_a_stage_is_one_line_before_anything_runs(zoo, tmp_path):
    bad = docs(zoo)
    bad[1]["models"][0]["model"] = f"first+{zoo / 'lwide'}"
    report = validate_stages(parse_stages(bad))
    assert len(report.problems) == 1 and report.problems[0].startswith("the final (unnamed) stage: adapter first+")
    assert "made for another model" in report.problems[0]
    def no_tensor(stage, done, total):
        raise AssertionError(f"stage {stage} merged a tensor")

    with pytest.raises(RecipeError, match="made for another model"):
        run_stages(parse_stages(bad), tmp_path / "out", device="cpu", memory_budget=0, progress=no_tensor)
    assert list(tmp_path.iterdir()) == []
    (zoo / "fixed_bad.yaml").write_text(yaml.safe_dump(docs(zoo)[0], sort_keys=False))
    sp = space(zoo, stages="fixed_bad.yaml", models=[{"name": "first_w", "model": f"first+{zoo / 'lwide'}"},
                                                     {"name": "c", "model": str(zoo / "c")}])
    stages = trial_stages(sp, optuna.trial.FixedTrial({"first_w.weight": 0.5, "c.weight": 0.5}))
    problems = validate_candidate(sp, stages[-1].recipe).problems
    assert len(problems) == 1 and "made for another model" in problems[0]


def merged(stages, out: Path) -> dict[str, torch.Tensor]:
    """``evomerge merge`` of the multi-stage file a search saves for ``stages``."""
    recipe = out.with_suffix(".yaml")
    recipe.write_text(stages_yaml(stages))
    assert main(["merge", str(recipe), str(out), "--device", "cpu"]) == 0
    return load_state(out)


def test_a_search_with_adapters_and_lora_merge_dtype_saves_what_it_scored(zoo, tmp_path):
    """``evomerge search`` end to end (real lm-eval scoring) over a fixed stage read with an adapter
    and an adapter on a model, merged in bfloat16: best/01's reproduce line carries the option,
    and that command builds the candidate scored in memory, bit for bit."""
    from evomerge.results.store import top_trials

    (zoo / "fixed_s.yaml").write_text(yaml.safe_dump(docs(zoo)[0], sort_keys=False))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "name": "adapters", "stages": str(zoo / "fixed_s.yaml"), "method": "linear", "dtype": "float32",
        "lora_merge_dtype": "bfloat16",
        "models": [{"name": "first_ls", "model": f"first+{zoo / 'ls'}"},
                   {"name": "a_la", "model": f"{zoo / 'a'}+{zoo / 'la'}"}],
        "eval": {"tasks": ["smoke_mc"], "limit": 4, "batch_size": 32},
        "report_eval": {"limit": 2}, "budget": {"trials": 2}, "top_k": 1}))
    out = tmp_path / "run"
    assert main(["search", str(space_file), "--out", str(out), "--device", "cpu"]) == 0
    study = optuna.load_study(study_name="adapters", storage=f"sqlite:///{out / 'study.db'}")
    assert all("error" not in v for v in study.user_attrs["inputs"].values())  # both inputs scored
    best_file = next((out / "best").glob("01_*.yaml"))
    reproduce = next(line for line in best_file.read_text().splitlines() if line.startswith("# reproduce:"))
    assert reproduce.endswith("--lora-merge-dtype bfloat16")
    sp = parse_space(yaml.safe_load(space_file.read_text()))
    stages = trial_stages(sp, optuna.trial.FixedTrial(top_trials(study, 1)[0].params))
    assert main(["merge", str(best_file), str(tmp_path / "best"), "--device", "cpu",
                 "--lora-merge-dtype", "bfloat16"]) == 0
    with Candidate.load(zoo / "base", dtype="float32", lora_merge_dtype="bfloat16") as cand:
        cand.apply(stages)
        assert_same_weights(cand.model.state_dict(), load_state(tmp_path / "best"))

"""`evomerge pipeline`: a parameter-space search then a layer-path search over its best merge, one
study per stage in one SQLite storage, on tiny real checkpoints with real lm-eval scoring. The
final multi-stage recipe re-merges bit for bit to the in-memory best candidate; a pipeline killed
(SIGKILL) during stage 2 resumes stage 2 without running stage 1 again."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from fixtures import load_state
from optuna.trial import TrialState
from spaces import math_code_space
from test_workers import FAST_HEARTBEAT, TrialWatch, evomerge, kill_mid_trial, process_env, wait_for

from evomerge.candidate import Candidate
from evomerge.cli import main
from evomerge.pipeline import FINAL, RESULT, PipelineError, load_pipeline
from merge_engine.stages import load_stages

EVAL = {"tasks": ["smoke_mc"], "limit": 4, "batch_size": 32}


def pipeline_file(zoo: Path, path: Path, trials: tuple[int, int] = (2, 1), slow: bool = False) -> Path:
    """Stage ``params`` (task arithmetic), then stage ``path`` over its merge and math. With one
    stage-2 trial, its best is the start point, the path through ``params``'s own layers, so the
    final recipe reads stage 1. ``slow``: stage-2 trials score every doc in batches of 4, long
    enough to be caught mid-way (as in test_workers)."""
    params = math_code_space(zoo, name="params", eval=EVAL, budget={"trials": trials[0]}, seed=1)
    layers = {"name": "path", "method": "passthrough",
              "models": [{"name": "merged", "model": "params"}, {"name": "math", "model": str(zoo / "math")}],
              "layer_path": {"repeats": 1, "max_layers": 4, "scale": [0.8, 1.25]},
              "eval": {**EVAL, "limit": None, "batch_size": 4} if slow else EVAL,
              "budget": {"trials": trials[1]}, "seed": 2}
    path.write_text(yaml.safe_dump_all([params, layers], sort_keys=False))
    return path


def studies(out: Path) -> dict[str, list]:
    storage = f"sqlite:///{out / 'pipeline.db'}"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
            for s in optuna.get_all_study_summaries(storage)}


def test_two_stage_pipeline_final_recipe_remerges_to_the_best_candidate(zoo, tmp_path):
    out = tmp_path / "run"
    assert main(["pipeline", str(pipeline_file(zoo, tmp_path / "p.yaml")), "--out", str(out), "--device", "cpu"]) == 0
    trials = studies(out)
    assert sorted(trials) == ["params", "path"]
    assert sum(t.state == TrialState.COMPLETE for t in trials["params"]) == 2
    assert sum(t.state == TrialState.COMPLETE for t in trials["path"]) == 1
    final = load_stages(out / FINAL)
    assert [s.name for s in final][-2:] == ["params", None]
    assert final[-1].recipe.merge_method == "passthrough" and "params" in final[-1].needs
    best = optuna.load_study(study_name="path", storage=f"sqlite:///{out / 'pipeline.db'}")
    reproduce, text = (out / FINAL).read_text().split("\n", 1)
    assert reproduce == f"# reproduce: evomerge merge {FINAL} OUT_DIR"
    assert text.split("---\n")[0] in best.best_trial.user_attrs["recipe"]
    with Candidate.load(zoo / "math", dtype="float32") as cand:  # the resident model of stage 2
        cand.apply(final)
        assert main(["merge", str(out / FINAL), str(tmp_path / "merged"), "--device", "cpu"]) == 0
        disk, memory = load_state(tmp_path / "merged"), cand.model.state_dict()
        assert len(cand.model.model.layers) == sum(sl.num_layers for sl in final[-1].recipe.slices)
        assert disk.keys() <= memory.keys()
        for name, tensor in disk.items():
            assert torch.equal(memory[name], tensor), name
    # a second call finds both stages done and searches nothing
    assert main(["pipeline", str(tmp_path / "p.yaml"), "--out", str(out), "--device", "cpu"]) == 0
    assert {k: len(v) for k, v in studies(out).items()} == {k: len(v) for k, v in trials.items()}


def test_pipeline_killed_in_stage_two_resumes_stage_two_only(zoo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    spec = pipeline_file(zoo, tmp_path / "p.yaml", trials=(1, 4), slow=True)
    logs = [tmp_path / "first.log"]
    env = process_env(tmp_path)
    with open(logs[0], "w") as log:
        proc = subprocess.Popen(evomerge("pipeline", str(spec), "--out", str(out), "--device", "cpu"),
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            watch = TrialWatch(f"sqlite:///{out / 'pipeline.db'}", "path")
            wait_for("stage 1 to finish", lambda: (out / "params" / RESULT).is_file(), 240, logs)
            killed = kill_mid_trial(proc, watch, lambda ts: any(t.state == TrialState.COMPLETE for t in ts), logs)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / FINAL).exists()
    stage1 = (out / "params" / RESULT).read_text()
    before = {k: [t.number for t in v] for k, v in studies(out).items()}
    for key, value in FAST_HEARTBEAT.items():  # the killed process's trial counts as dead at once
        monkeypatch.setenv(key, value)
    assert main(["pipeline", str(spec), "--out", str(out), "--device", "cpu"]) == 0
    assert "already done: params" in capsys.readouterr().out
    after = studies(out)
    assert [t.number for t in after["params"]] == before["params"]  # stage 1 was not run again
    assert (out / "params" / RESULT).read_text() == stage1
    finished = [t for t in after["path"] if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(after["path"]) > len(before["path"])
    assert after["path"][killed.number].state == TrialState.FAIL  # the killed trial, retried
    assert [t.state for t in after["path"] if t.user_attrs.get("retry_of") == killed.number] == [TrialState.COMPLETE]
    final = load_stages(out / FINAL)  # stage 1 is in it when the best path reads its layers
    assert final[-1].name is None and [s.name for s in final[:-1]] in ([], ["params"])


def test_bad_pipelines_are_refused_before_anything_runs(zoo, tmp_path):
    good = yaml.safe_load_all(pipeline_file(zoo, tmp_path / "p.yaml").read_text())
    params, layers = list(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([params, {**layers, "layer_path": {"max_layers": 0}}]))
    with pytest.raises(PipelineError, match="stage path: .*max_layers"):
        load_pipeline(bad)
    bad.write_text(yaml.safe_dump_all([params, {**layers, "name": "params"}]))
    with pytest.raises(PipelineError, match="used twice"):
        load_pipeline(bad)
    bad.write_text(yaml.safe_dump_all([{k: v for k, v in params.items() if k != "name"}, layers]))
    with pytest.raises(PipelineError, match="document 1: a pipeline stage is a search space with a 'name'"):
        load_pipeline(bad)
    assert not (tmp_path / "runs").exists()


def test_the_example_pipeline_loads(tmp_path):
    from fixtures import make_tiny_llama

    example = Path(__file__).parents[1] / "search_spaces" / "pipelines" / "zoo_params_then_path.yaml"
    assert example.read_text().startswith("# evomerge pipeline ")
    base = make_tiny_llama(tmp_path / "base", 0, num_layers=2)
    for i, name in enumerate(("add_expert", "sort_expert", "shift_expert"), 1):
        make_tiny_llama(tmp_path / name, i, perturb_from=base)
    pipeline = load_pipeline(example, {"ZOO": str(tmp_path)})
    assert [(s.name, s.needs) for s in pipeline.stages] == [("params", ()), ("path", ("params",))]


def test_stages_with_different_lora_merge_dtypes_are_one_line_before_any_search(zoo, tmp_path):
    spec = pipeline_file(zoo, tmp_path / "p.yaml")
    params, path = list(yaml.safe_load_all(spec.read_text()))
    params["lora_merge_dtype"], path["lora_merge_dtype"] = "bfloat16", "float32"
    spec.write_text(yaml.safe_dump_all([params, path], sort_keys=False))
    with pytest.raises(PipelineError, match="different lora_merge_dtype .params: bfloat16, path: float32."):
        load_pipeline(spec)
    path["lora_merge_dtype"] = "bfloat16"  # one value: final.yaml's reproduce line carries it
    spec.write_text(yaml.safe_dump_all([params, path], sort_keys=False))
    from evomerge.pipeline import reproduce_line
    assert reproduce_line(load_pipeline(spec)).endswith("--lora-merge-dtype bfloat16\n")

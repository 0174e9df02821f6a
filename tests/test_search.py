"""The search loop end to end on tiny real Llamas with real lm-eval tasks (eval_tasks/smoke)."""

from __future__ import annotations

import functools
import json
import socket
import subprocess

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from spaces import math_code_space

from evomerge.cli import main
from evomerge.results import export_study
from evomerge.search.run import RunOptions, run_search
from evomerge.search.samplers import default_sampler
from evomerge.search.study import default_storage, open_study
from evomerge.space import distributions, parse_space
from merge_engine.recipe import load_recipe


pytestmark = pytest.mark.usefixtures("hf_home_in_tmp")


space_dict = functools.partial(math_code_space, limit=6, top_k=2, seed=3)


def trials(out, name="t"):
    return optuna.load_study(study_name=name, storage=default_storage(out)).get_trials()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_resume_keeps_finished_trials_and_retries_interrupted_ones(zoo, tmp_path):
    """Run 2 trials; a killed process leaves one RUNNING; `evomerge search` again with a larger
    budget keeps the 2, fails and retries the stale one, and counts only finished trials."""
    out = tmp_path / "run"
    space_data = space_dict(zoo, report_eval={"limit": 8})
    space = parse_space(space_data)
    run_search(space, RunOptions(out_dir=out, trials=2))
    first = trials(out)
    assert [t.state for t in first] == [TrialState.COMPLETE] * 2
    assert first[0].user_attrs["start_point"] == "equal"

    study = optuna.load_study(study_name="t", storage=default_storage(out))
    stale = study.ask(fixed_distributions=distributions(space))
    stale.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead_pid()})

    (tmp_path / "space.yaml").write_text("# evomerge search space.yaml\n" + yaml.safe_dump(space_data))
    assert main(["search", str(tmp_path / "space.yaml"), "--trials", "4", "--out", str(out)]) == 0
    after = trials(out)
    assert [(t.number, t.params, t.values) for t in after[:2]] == [(t.number, t.params, t.values) for t in first]
    assert after[2].state == TrialState.FAIL and "interrupted" in after[2].user_attrs["error"]
    retry = [t for t in after if t.user_attrs.get("retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == after[2].params and retry[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in after) == 4
    assert sum(t.user_attrs.get("start_point") == "equal" for t in after) == 1  # enqueued once

    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == [t.state.name for t in after]
    assert "search_smoke_mc" in table and "param_math.weight" in table
    best = sorted((out / "best").glob("*.yaml"))
    assert len(best) == 2
    recipe = load_recipe(best[0])  # mergekit YAML with a comment header re-parses
    assert {str(r) for r in recipe.referenced_models()} == {str(zoo / n) for n in ("base", "math", "code")}
    prov = json.loads(best[0].with_suffix(".json").read_text())
    assert prov["report_scores"] and prov["search_scores"] and prov["seed"] == {"merge": 3, "eval": 0}
    assert all(len(h) == 64 for h in prov["checkpoints_sha256"].values())
    assert (out / "plots" / "optimization_history.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["inputs"]) == {"base", "math", "code"} and summary["inputs"]["math"]["report"]

    # export rebuilds the same results from the storage alone
    again = tmp_path / "exported"
    assert main(["export", "--storage", default_storage(out), "--study", "t", "--out", str(again)]) == 0
    assert (again / "trials.csv").read_text() == (out / "trials.csv").read_text()
    assert [p.name for p in sorted((again / "best").iterdir())] == [p.name for p in sorted((out / "best").iterdir())]
    for p in best:
        assert (again / "best" / p.name).read_text() == p.read_text()
    assert (again / "plots" / "optimization_history.png").is_file()

    # a worker joins with the storage URL and the study name alone
    assert main(["worker", "--storage", default_storage(out), "--study", "t", "--trials", "5"]) == 0
    assert sum(t.state == TrialState.COMPLETE for t in trials(out)) == 5


def test_failing_candidate_is_recorded_and_the_search_goes_on(zoo, tmp_path):
    # linear with normalize and weights summing to 0 would divide by zero: the engine refuses it.
    space = parse_space(space_dict(zoo, method="linear", base_model=None, allow_negative_weights=True,
                                   start=[{"params": {"math.weight": 0.5, "code.weight": -0.5}}]))
    out = tmp_path / "run"
    summary = run_search(space, RunOptions(out_dir=out, trials=2, materialize=True))
    got = trials(out)
    assert got[0].state == TrialState.FAIL and "sum to 0" in got[0].user_attrs["error"]
    assert (out / "best_model" / "config.json").is_file()  # --materialize
    assert [t.state for t in got[1:]] == [TrialState.COMPLETE] * 2
    assert summary.finished == 2 and summary.failed_this_run == 1
    table = pd.read_csv(out / "trials.csv")
    assert "sum to 0" in table.loc[0, "error"]


def test_multi_objective_writes_the_pareto_front(zoo, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    from evomerge.evaluate.tasks.config import REPO_EVAL_TASKS

    data = REPO_EVAL_TASKS / "smoke" / "smoke_mc.jsonl"
    rows = data.read_text().splitlines()
    for name, part in (("part_a", rows[:12]), ("part_b", rows[12:])):
        (tasks / f"{name}.jsonl").write_text("\n".join(part) + "\n")
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(tasks / f"{name}.jsonl")}}, "test_split": "test",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "choices",
            "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}))
    space = parse_space(space_dict(
        zoo, objectives=["part_a", "part_b"], top_k=10,
        eval={"tasks": ["part_a", "part_b"], "limit": 6, "include_paths": [str(tasks)], "batch_size": 32}))
    assert default_sampler(space) == "nsga2"
    out = tmp_path / "run"
    run_search(space, RunOptions(out_dir=out, trials=3))
    study = optuna.load_study(study_name="t", storage=default_storage(out))
    pareto = {t.number for t in study.best_trials}
    written = {int(p.stem.split("trial")[1]) for p in (out / "best").glob("*.yaml")}
    assert written == pareto
    assert (out / "plots" / "pareto_front.png").stat().st_size > 0
    table = pd.read_csv(out / "trials.csv")
    assert {"value_part_a", "value_part_b"} <= set(table.columns)


def test_cheap_first_evaluation_reports_before_the_full_score(zoo, tmp_path):
    space = parse_space(space_dict(zoo, pruning={"limit": 2, "percentile": 50, "startup_trials": 1},
                                   sampler="tpe"))
    out = tmp_path / "run"
    summary = run_search(space, RunOptions(out_dir=out, trials=3))
    got = [t for t in trials(out) if t.state.is_finished()]
    assert len(got) == 3
    for t in got:
        assert t.user_attrs["cheap_samples"] == 2 and 0 in t.intermediate_values
        assert ("search_samples" in t.user_attrs) == (t.state == TrialState.COMPLETE)
    pruned = sum(t.state == TrialState.PRUNED for t in got)
    # a survivor's full evaluation scores only the 4 docs its cheap rung did not (issue 15)
    assert summary.samples == 3 * 2 + (3 - pruned) * (6 - 2)
    assert summary.samples_without_pruning == 3 * 6


def test_study_refuses_a_different_space(zoo, tmp_path):
    storage = default_storage(tmp_path)
    open_study(parse_space(space_dict(zoo)), storage=storage, study_name="t")
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="different search space"):
        open_study(parse_space(space_dict(zoo, layer_granularity=1)), storage=storage, study_name="t")
    # a larger budget is a resume, not a different space
    open_study(parse_space(space_dict(zoo, budget={"trials": 50})), storage=storage, study_name="t")
    assert export_study(storage, "t", tmp_path / "empty")["trials"].is_file()


def test_gp_with_pruning_learns_from_pruned_trials():
    """With cheap-first pruning the GP sees each pruned trial at its cheap score (the stored
    trial stays PRUNED); sampling keeps working on such a study."""
    from optuna.trial import TrialState

    from evomerge.adapters.optuna import PrunedAsComplete as _PrunedAsComplete
    from evomerge.search.samplers import PrunedAwareGPSampler, make_sampler

    assert isinstance(make_sampler("gp", seed=0, pruning=True), PrunedAwareGPSampler)
    assert not isinstance(make_sampler("gp", seed=0, pruning=False), PrunedAwareGPSampler)
    study = optuna.create_study(direction="maximize", sampler=make_sampler("gp", seed=0, pruning=True))
    for i in range(12):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        x = trial.params["x"]
        if i % 2:
            trial.report(x / 2, step=0)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, x)
    view = _PrunedAsComplete(study)._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(view) == 12 and all(t.state == TrialState.COMPLETE for t in view)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) == 6
    assert {t.number: t.value for t in view if t.number % 2} == {
        t.number: t.intermediate_values[0] for t in pruned}
    assert 0 <= study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).params["x"] <= 1


def test_optuna_version_outside_the_tested_range_is_refused():
    from evomerge.adapters.optuna import PIN, check_version
    from evomerge.errors import EvomergeError

    check_version(optuna.__version__)  # the installed one is supported
    with pytest.raises(EvomergeError) as err:
        check_version("4.2.1")
    assert "optuna 4.2.1 is installed" in str(err.value) and PIN in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(EvomergeError, match="pip install"):
        check_version("6.0.0.dev0")


def test_placeholders_make_the_written_recipes_portable(zoo, tmp_path):
    """With placeholders (the demo's ${ZOO}), result files name models as ${ZOO}/..., and the best
    recipe merges again from them with --var ZOO=... (what results/demo commits)."""
    out = tmp_path / "run"
    run_search(parse_space(space_dict(zoo)), RunOptions(out_dir=out, trials=2, placeholders={"ZOO": str(zoo)}))
    best = sorted((out / "best").glob("*.yaml"))
    written = [*best, *(out / "best").glob("*.json"), out / "space.yaml"]
    for path in written:
        text = path.read_text()
        assert str(zoo) not in text.replace(f"--var ZOO={zoo}", ""), path
    assert "${ZOO}/base" in best[0].read_text() and f"--var ZOO={zoo}" in best[0].read_text()  # not under $HOME
    assert main(["validate", str(best[0]), "--var", f"ZOO={zoo}"]) == 0
    recipe = load_recipe(best[0], variables={"ZOO": str(zoo)})
    assert str(recipe.base_model) == str(zoo / "base")
    # `export` writes the same portable files (the run keeps its placeholders in the study)
    again = tmp_path / "again"
    assert main(["export", "--storage", default_storage(out), "--study", "t", "--out", str(again)]) == 0
    assert (again / "best" / best[0].name).read_text() == best[0].read_text()

"""Result plots: real SQLite studies carrying the user attrs a search writes; the plotted data
is checked through the data functions (evomerge.results.plot_data), the files by their PNG header."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState, create_trial

from evomerge.evaluate.result import EvalResult, TaskScore
from evomerge.results.files import write_results
from evomerge.results.plot_data import (layer_table, model_names, objective_history, pareto_front,
                                        result_objective)
from evomerge.results.plots import write_plots
from evomerge.results.store import top_trials, trial_recipe_of
from evomerge.space import distributions, equal_params, parse_space, trial_recipe

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("add", "sort")


def make_space(**overrides):
    data = {"name": "p", "base_model": "/models/base", "method": "task_arithmetic", "num_layers": 5,
            "models": [{"name": "add", "model": "/models/add"}, {"name": "sort", "model": "/models/sort"}],
            "eval": {"tasks": list(TASKS)}, "layer_granularity": 2}
    data.update(overrides)
    return parse_space(data)


def eval_dict(add: float, sort: float, weights=(1.0, 1.0)) -> dict:
    tasks = tuple(TaskScore(task, "acc,none", value, w) for task, value, w in zip(TASKS, (add, sort), weights))
    return EvalResult(tasks, n_samples=10, wall_time_s=0.1).to_dict()


def make_study(tmp_path, space, values, *, pruned=(), inputs=None, name="p"):
    """A SQLite study as a search leaves it: trial 0 the equal start point, then trials with params
    spread over the ranges; ``values`` per complete trial (a float or a tuple per objective),
    ``pruned`` the cheap-first scores of pruned trials that follow."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=name,
                                directions=space.directions)
    study.set_user_attr("space", space.model_dump(mode="json"))
    study.set_user_attr("objectives", list(space.objectives))
    if inputs is not None:
        study.set_user_attr("inputs", inputs)
    dists = distributions(space)
    for i, value in enumerate([*values, *pruned]):
        if i == 0:
            params, attrs = equal_params(space), {"start_point": "equal"}
        else:
            params = {k: d.low + (d.high - d.low) * ((i * 7 + j * 3) % 10) / 10
                      for j, (k, d) in enumerate(dists.items())}
            attrs = {}
        attrs["recipe"] = trial_recipe(space, FixedTrial(params)).to_yaml()
        done = i < len(values)
        multi = isinstance(value, tuple)
        study.add_trial(create_trial(
            params=params, distributions={k: dists[k] for k in params}, user_attrs=attrs,
            state=TrialState.COMPLETE if done else TrialState.PRUNED,
            values=(list(value) if multi else [value]) if done else None,
            intermediate_values={0: value - 0.05} if not multi else {}))
    return study


INPUTS = {"base": {"model": "/models/base", "search": eval_dict(0.2, 0.3)},
          "add": {"model": "/models/add", "search": eval_dict(0.8, 0.3)},
          "sort": {"model": "/models/sort", "search": eval_dict(0.25, 0.9)}}


def test_single_objective_plots_are_written_and_the_pareto_plot_says_why_not(tmp_path):
    space = make_space(pruning={"limit": 3, "percentile": 50, "startup_trials": 1})
    study = make_study(tmp_path, space, [0.5, 0.55, 0.52, 0.6, 0.58, 0.62, 0.61, 0.57, 0.63],
                       pruned=[0.3, 0.35], inputs=INPUTS)
    plots = write_plots(study, tmp_path / "plots")
    assert set(plots.files) == {"plot_optimization_history", "plot_layer_parameters",
                                "plot_param_importances", "plot_notes"}
    for key, path in plots.files.items():
        if key != "plot_notes":
            assert path.read_bytes()[:8] == PNG and path.parent == tmp_path / "plots"
    assert plots.skipped == ["plot pareto_front skipped: one objective"]
    notes = (tmp_path / "plots" / "README.txt").read_text()
    assert "plot pareto_front skipped: one objective" in notes and "layer_parameters.png:" in notes
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary files left

    # write_results (the search's and export's writer) writes the same plots
    files = write_results(study, tmp_path / "out")
    assert (tmp_path / "out" / "plots" / "layer_parameters.png").read_bytes()[:8] == PNG
    assert files["plot_notes"].read_text() == notes


def test_history_has_running_best_pruned_trials_and_the_reference_lines(tmp_path):
    space = make_space(pruning={"limit": 3, "percentile": 50, "startup_trials": 1})
    study = make_study(tmp_path, space, [0.5, 0.45, 0.6, 0.55], pruned=[0.4], inputs=INPUTS)
    h = objective_history(study, 0)
    assert h.complete == [(0, 0.5), (1, 0.45), (2, 0.6), (3, 0.55)]
    assert h.best == [(0, 0.5), (1, 0.5), (2, 0.6), (3, 0.6)]
    assert h.pruned == [(4, pytest.approx(0.35))]  # at its cheap-first score
    assert h.lines == {"input base": pytest.approx(0.25), "input add": pytest.approx(0.55),
                       "input sort": pytest.approx(0.575), "uniform merge (trial 0)": 0.5}
    assert h.label == "search split: mean accuracy of 2 tasks"
    # the weighted score of a stored result, and one task's value for a per-task objective
    assert result_objective(eval_dict(1.0, 0.0, weights=(3.0, 1.0)), "score") == pytest.approx(0.75)
    assert result_objective(eval_dict(1.0, 0.0), "sort") == 0.0


def test_minimized_objective_keeps_the_lowest_as_best(tmp_path):
    space = make_space(eval={"tasks": [{"name": "add", "weight": 1.0}, {"name": "sort", "weight": -1.0}]},
                       objectives=["add", "sort"])
    study = make_study(tmp_path, space, [(0.5, 0.4), (0.6, 0.5), (0.4, 0.2)], inputs=INPUTS)
    h = objective_history(study, 1)
    assert h.best == [(0, 0.4), (1, 0.4), (2, 0.2)]
    assert h.lines["input sort"] == 0.9 and h.label == "search split: sort (accuracy)"


def test_too_few_trials_are_said_not_silenced(tmp_path):
    study = make_study(tmp_path, make_space(), [0.5])  # the equal start point alone: one weight each
    plots = write_plots(study, tmp_path / "plots")
    assert plots.skipped == [
        "plot optimization_history skipped: only 1 finished trial (needs 2)",
        "plot layer_parameters skipped: the best recipe (trial 0) sets no per-layer or per-filter parameter",
        "plot pareto_front skipped: one objective",
        "plot param_importances skipped: only 1 completed trial (needs 8)"]
    assert set(plots.files) == {"plot_notes"}

    empty = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}", study_name="e")
    plots = write_plots(empty, tmp_path / "empty")
    assert plots.files == {"plot_notes": tmp_path / "empty" / "README.txt"}
    assert plots.skipped[1] == "plot layer_parameters skipped: no completed trial"


def test_a_recipe_without_per_layer_parameters_skips_the_heat_map(tmp_path):
    space = make_space(search={"weight": {"low": 0.0, "high": 1.0, "layered": False}}, layer_granularity=None)
    study = make_study(tmp_path, space, [0.5, 0.6])
    plots = write_plots(study, tmp_path / "plots")
    best = top_trials(study, 1)[0].number
    assert (f"plot layer_parameters skipped: the best recipe (trial {best}) sets no per-layer or "
            "per-filter parameter") in plots.skipped
    assert "plot_optimization_history" in plots.files


def test_heat_map_data_is_the_recipes_value_at_each_layer(tmp_path):
    # steps: layer groups of 2 over 5 layers
    space = make_space()
    study = make_study(tmp_path, space, [0.5, 0.7, 0.6])
    recipe = trial_recipe_of(top_trials(study, 1)[0])
    table = layer_table(recipe, 5, model_names(study))
    assert table.layered and table.rows == ["add weight", "sort weight", "all models lambda"]
    per_model = {str(m.model): m.parameters["weight"] for m in recipe.models}
    assert table.values[0] == per_model["/models/add"] and len(table.values[0]) == 5
    assert table.values[1] == per_model["/models/sort"]
    assert table.values[2] == [recipe.parameters["lambda"]] * 5

    # smooth: control points at the first and last layer, interpolated linearly in between;
    # filters: one row per filter and one for the rest
    smooth = make_space(smooth=True, layer_granularity=4, filters=["mlp"], method="ties")
    dists = distributions(smooth)
    params = {k: d.low + (d.high - d.low) * (0.1 + 0.2 * (i % 2) + 0.6 * ((i // 2) % 2)) for i, (k, d) in enumerate(dists.items())}
    recipe = trial_recipe(smooth, FixedTrial(params))
    table = layer_table(recipe, 5, {"/models/add": "add", "/models/sort": "sort"})
    assert table.rows[:4] == ["add weight [mlp]", "add weight [rest]", "add density [mlp]", "add density [rest]"]
    first, last = params["layer_00.mlp.add.weight"], params["layer_04.mlp.add.weight"]
    assert table.values[0] == pytest.approx([first + (last - first) * i / 4 for i in range(5)])
    first, last = params["layer_00.rest.sort.density"], params["layer_04.rest.sort.density"]
    assert table.values[table.rows.index("sort density [rest]")] == pytest.approx(
        [first + (last - first) * i / 4 for i in range(5)])


def test_pareto_front_of_a_pair():
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5), (0.2, 0.2)]
    assert pareto_front(points, (True, True)) == {0, 1, 3, 4}  # ties both kept, dominated dropped
    assert pareto_front(points, (False, False)) == {0, 3, 5}
    assert pareto_front(points, (True, False)) == {3}  # high first, low second: (0.9, 0.1) beats all


def test_several_objectives_get_a_panel_per_pair_and_the_front_of_the_study(tmp_path):
    space = make_space(objectives=["add", "sort"])
    values = [(0.5, 0.5), (0.8, 0.2), (0.3, 0.9), (0.4, 0.4), (0.7, 0.6)]
    study = make_study(tmp_path, space, values, inputs=INPUTS)
    front = pareto_front(values, (True, True))
    assert front == {t.number for t in study.best_trials} == {1, 2, 4}
    plots = write_plots(study, tmp_path / "plots")
    assert plots.files["plot_pareto_front"].read_bytes()[:8] == PNG
    assert plots.files["plot_optimization_history"].read_bytes()[:8] == PNG
    assert not any("pareto" in s for s in plots.skipped)

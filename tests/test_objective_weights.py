"""A user's weighting of several objectives: ``objectives: [{name: N, weight: W}, ...]`` picks the one
best trial of the Pareto front (best/, report, progress), is said in the report, is checked before
anything is written, and may change on a resume (same front, other pick). Real tiny Llamas,
real lm-eval tasks, real SQLite."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from spaces import math_code_space

from evomerge.cli import main
from evomerge.results.store import objective_weights, ranking_note, top_trials
from evomerge.search.study import default_storage
from evomerge.space import SearchSpace, SpaceError, parse_space


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # a second objective that differs per candidate (the zoo's smoke tasks barely do)
    (tmp_path / "scorers_w12.py").write_text(
        "def spread(model, tokenizer):\n    return model.get_input_embeddings().weight.abs().mean().item()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from evomerge.evaluate.callable import resolve_callable

    resolve_callable.cache_clear()


def space_dict(zoo, objectives, **overrides):
    return math_code_space(zoo, tasks=["smoke_mc", "smoke_gen"], **{
        "name": "w", "objectives": objectives, "sampler": "random", "top_k": 1, "seed": 3, **overrides})


def test_weighted_entries_parse_round_trip_and_bad_weights_are_one_line_each(zoo):
    space = parse_space(space_dict(zoo, ["smoke_mc", {"name": "smoke_gen", "weight": 2.5}]))
    assert space.objectives == ("smoke_mc", "smoke_gen") and space.objective_weights == {"smoke_gen": 2.5}
    assert SearchSpace.model_validate(space.model_dump(mode="json")) == space  # as stored in a study
    assert parse_space(space_dict(zoo, "score")).objective_weights == {}

    cases = [
        (["smoke_mc", {"name": "smoke_gen", "weight": -1}], "objective 'smoke_gen' weight -1.0 must be a finite number >= 0"),
        (["smoke_mc", {"name": "smoke_gen", "weight": float("nan")}], "weight nan must be a finite number >= 0"),
        ([{"name": "smoke_mc", "weight": 0}, {"name": "smoke_gen", "weight": 0}], "every objective weight is 0"),
        ([{"name": "score", "weight": 2}], "with one objective remove the weight"),
        (["smoke_mc", {"name": "smoke_gen", "wieght": 2}], "unknown keys ['wieght']"),
        (["smoke_mc", {"weight": 2}], "has no name"),
    ]
    for objectives, expected in cases:
        with pytest.raises(SpaceError) as err:
            parse_space(space_dict(zoo, objectives))
        assert expected in str(err.value) and "\n" not in str(err.value).strip(), str(err.value)
    with pytest.raises(SpaceError, match="objective weight for 'params', which is not an objective"):
        parse_space({**space_dict(zoo, ["smoke_mc", "smoke_gen"]), "objective_weights": {"params": 1}})


def test_user_weights_override_the_task_weights_when_ranking_the_front():
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("objectives", ["a", "b"])
    space = {"eval": {"tasks": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}]}}
    study.set_user_attr("space", space)
    dist = {"x": FloatDistribution(0, 1)}
    for v in ([0.9, 0.1], [0.1, 0.9], [0.6, 0.6], [0.2, 0.2]):
        study.add_trial(create_trial(values=v, params={"x": 0.5}, distributions=dist))
    assert [t.number for t in top_trials(study, 1)] == [2]  # equal weights: the balanced trial
    assert "the eval tasks' weights or 1; set your own" in ranking_note(study)
    study.set_user_attr("space", {**space, "objective_weights": {"b": 4.0}})
    assert objective_weights(study) == [1.0, 4.0]
    assert [t.number for t in top_trials(study, 3)] == [1, 2, 0]  # only the front, b counts 4x
    assert "1*a + 4*b" in ranking_note(study) and "the space's objective weights" in ranking_note(study)


SPREAD = "scorers_w12:spread"  # maximized: it trades off against smoke_mc on this zoo


def test_a_weighted_search_writes_its_pick_and_a_resume_may_reweight_the_same_front(zoo, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(space_dict(zoo, ["smoke_mc", {"name": SPREAD, "weight": -2}])))
    assert main(["search", str(bad), "--out", str(out), "--trials", "1"]) == 2
    assert "weight -2" in capsys.readouterr().err and not out.exists()  # refused before any file

    picks = []
    for weights in ((1.0, 0.0), (0.0, 1.0)):  # the second run adds no trial: it re-picks
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(space_dict(zoo, [{"name": "smoke_mc", "weight": weights[0]},
                                                        {"name": SPREAD, "weight": weights[1]}])))
        assert main(["search", str(path), "--out", str(out), "--trials", "6"]) == 0
        study = optuna.load_study(study_name="w", storage=default_storage(out))
        front, best = study.best_trials, top_trials(study, 1)[0]
        assert len(front) >= 2 and best in front
        picks.append(best.number)
        if weights[0]:
            assert best.values[0] == max(t.values[0] for t in front)
        else:
            assert best.values[1] == max(t.values[1] for t in front)
        report = (out / "report.txt").read_text()
        assert f"{weights[0]:g}*smoke_mc + {weights[1]:g}*{SPREAD}" in report
        assert "the space's objective weights" in report
        assert f"trial {best.number}" in report.split("---\n")[-1]  # the table's row is the pick
        assert sorted(p.name for p in (out / "best").iterdir())[0] == f"01_trial{best.number:04d}.json"
    assert len(study.trials) == 6 and picks[0] != picks[1]

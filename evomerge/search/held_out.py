"""The held-out report: the best trials and every input model scored on the report split.

Scores are kept in the study's user attrs (``report``, ``inputs``), so a resumed run or an
export finds them and nothing is scored twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from evomerge.candidate import Candidate
from evomerge.results.store import top_trials, trial_stages_of
from evomerge.space.stages import input_stages
from evomerge.search.loop import Evaluators
from evomerge.space import SearchSpace
from merge_engine.recipe import MergeRecipe, parse_recipe


def one_model_recipe(path: str, dtype: str) -> MergeRecipe:
    """A recipe that reproduces one input model exactly (for baseline scores)."""
    return parse_recipe({"merge_method": "linear", "dtype": dtype,
                         "models": [{"model": path, "parameters": {"weight": 1.0}}]})


def _scores(candidate: Candidate, recipe: MergeRecipe, evaluators: dict[str, Any]) -> dict[str, Any]:
    """``{name: EvalResult dict}`` for ``recipe``, or ``{"error": ...}`` when it cannot be scored."""
    try:
        candidate.apply(recipe)
        return {name: ev.evaluate(candidate.model, candidate.tokenizer).to_dict()
                for name, ev in evaluators.items()}
    except Exception as err:  # one unscorable result must not lose the others
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


def evaluate_held_out(study: optuna.Study, space: SearchSpace, candidate: Candidate,
                      evaluators: Evaluators, log: Callable[[str], None] | None = None) -> None:
    """Score the top-k trials and every input model on the report split (once each); ``log``
    gets one line before each scoring (``held-out 2/5: trial 7``)."""
    if evaluators.report is None:
        return
    say = log or (lambda text: None)
    report = dict(study.user_attrs.get("report", {}))
    inputs = dict(study.user_attrs.get("inputs", {}))
    todo = [t for t in top_trials(study, space.top_k) if str(t.number) not in report]
    models = [m for m in space.all_models() if m.name not in inputs]
    total, step = len(todo) + len(models), 0
    for t in todo:
        step += 1
        say(f"held-out {step}/{total}: trial {t.number}")
        got = _scores(candidate, trial_stages_of(t), {"report": evaluators.report})
        report[str(t.number)] = got.get("report", got)
        study.set_user_attr("report", report)
    for m in models:
        step += 1
        say(f"held-out {step}/{total}: input model {m.name}")
        got = _scores(candidate, input_stages(space, m.model) or one_model_recipe(m.model, space.dtype),
                      {"search": evaluators.search, "report": evaluators.report})
        inputs[m.name] = {"model": m.model, **got}
        study.set_user_attr("inputs", inputs)

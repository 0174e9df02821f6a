"""What the result plots show, as plain data read from a study (no drawing here).

:mod:`evomerge.results.plots` draws these; tests check them, not pixels.

    history = objective_history(study, 0)      # trials, running best, input and uniform-merge lines
    table = layer_table(recipe, num_layers, names)   # the best recipe's values per layer
    front = pareto_front(points, maximize)     # indices of the non-dominated points of a pair
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.evaluate.result import EvalResult
from evomerge.results.store import objectives
from evomerge.space.objectives import objective_label_of
from evomerge.space import SCORE
from merge_engine.recipe import FilterEntry, MergeRecipe
from merge_engine.settings import MISSING, layer_position, resolve

_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "length-normalized accuracy",
                 "exact_match": "exact match", "f1": "F1", "mcc": "Matthews correlation",
                 "perplexity": "perplexity", "word_perplexity": "word perplexity"}


# ---------------------------------------------------------------- objectives
def maximized(study: optuna.Study) -> list[bool]:
    return [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]


def objective_label(study: optuna.Study, index: int) -> str:
    """Axis name of objective ``index``: the split and the metric, e.g.
    ``search split: mean accuracy of 3 tasks``."""
    name = objectives(study)[index]
    tasks = _search_tasks(study)
    if objective_label_of(name) != name:  # a cost or a Python callable, measured on the candidate
        return objective_label_of(name)
    if name != SCORE:
        metric = tasks.get(name, {}).get("metric")
        return f"search split: {name}" + (f" ({_metric_name(metric)})" if metric else "")
    metrics = sorted({_metric_name(t.get("metric")) for t in tasks.values() if t.get("metric")})
    weights = {t.get("weight", 1.0) for t in tasks.values()}
    mean = "mean" if len(weights) <= 1 else "weighted mean"
    what = " / ".join(metrics) if metrics else "task score"
    count = len(tasks) or len((study.user_attrs.get("space") or {}).get("eval", {}).get("tasks", []))
    return f"search split: {mean} {what}" + (f" of {count} tasks" if count > 1 else "")


def _metric_name(metric: str | None) -> str:
    base = (metric or "").split(",")[0]
    return _METRIC_NAMES.get(base, base)


def _search_tasks(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Task -> stored TaskScore dict (metric, weight) from any input model's search-split result;
    the space's eval tasks (metric as configured) when no input was scored."""
    for data in (study.user_attrs.get("inputs") or {}).values():
        result = data.get("search") if isinstance(data, Mapping) else None
        if isinstance(result, Mapping) and result.get("tasks"):
            return {t["task"]: t for t in result["tasks"]}
    tasks = (study.user_attrs.get("space") or {}).get("eval", {}).get("tasks", [])
    return {t["name"]: {"metric": t.get("metric"), "weight": t.get("weight", 1.0)}
            for t in tasks if isinstance(t, Mapping) and "name" in t}


def result_objective(result: Mapping[str, Any] | None, name: str) -> float | None:
    """Objective ``name`` of a stored EvalResult dict: its weighted score or one task's value
    (None when the result is missing or failed)."""
    if not isinstance(result, Mapping) or "tasks" not in result:
        return None
    if name == SCORE:
        return EvalResult.from_dict(dict(result)).score
    return next((t["value"] for t in result["tasks"] if t["task"] == name), None)


def input_scores(study: optuna.Study, index: int) -> dict[str, float]:
    """Each input model's search-split value of objective ``index`` (study user attr ``inputs``,
    written with the held-out report)."""
    name = objectives(study)[index]
    out = {}
    for model, data in (study.user_attrs.get("inputs") or {}).items():
        value = result_objective(data.get("search") if isinstance(data, Mapping) else None, name)
        if value is not None:
            out[model] = value
    return out


# ---------------------------------------------------------------- history
@dataclass(frozen=True)
class History:
    """One objective over the trials: ``complete`` and ``pruned`` are (trial number, value) with
    pruned trials at their cheap-first score; ``best`` is the running best after each complete
    trial; ``lines`` are horizontal references (each input model, the uniform merge)."""

    label: str
    complete: list[tuple[int, float]]
    pruned: list[tuple[int, float]]
    best: list[tuple[int, float]]
    lines: dict[str, float] = field(default_factory=dict)


def objective_history(study: optuna.Study, index: int = 0) -> History:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    up = maximized(study)[index]
    complete = [(t.number, t.values[index]) for t in trials if t.state == TrialState.COMPLETE]
    pruned = [(t.number, t.intermediate_values[min(t.intermediate_values)]) for t in trials
              if t.state == TrialState.PRUNED and t.intermediate_values]
    best: list[tuple[int, float]] = []
    for number, value in complete:
        if not best or (value > best[-1][1] if up else value < best[-1][1]):
            best.append((number, value))
        else:
            best.append((number, best[-1][1]))
    lines = {f"input {m}": v for m, v in input_scores(study, index).items()}
    uniform = uniform_trial(study)
    if uniform is not None:
        lines[f"uniform merge (trial {uniform.number})"] = uniform.values[index]
    return History(objective_label(study, index), complete, pruned, best, lines)


def uniform_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed ``equal`` start point (every model weighted the same), if any."""
    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get("start_point") == "equal"), None)


# ---------------------------------------------------------------- per-layer parameters
@dataclass(frozen=True)
class LayerTable:
    """Rows ``"<model> <param>"`` (``[filter]`` appended when the recipe filters tensors;
    ``all models`` for top-level parameters), one column per layer; None where a value is not a
    number. ``layered`` says whether any parameter is given per layer or per filter."""

    rows: list[str]
    values: list[list[float | None]]
    layered: bool


def layer_table(recipe: MergeRecipe, num_layers: int, names: Mapping[str, str] | None = None) -> LayerTable:
    """The value each parameter of ``recipe`` takes at each layer, resolved as the engine does
    (:func:`merge_engine.settings.resolve` at layer position ``i / (num_layers - 1)``, the planner's
    rule). ``names`` maps model paths to readable names (default: the folder name)."""
    names = names or {}
    levels: list[tuple[str, Mapping[str, Any]]] = [
        (names.get(str(m.model), Path(str(m.model)).name), m.parameters or {}) for m in recipe.models or ()]
    levels.append(("all models", recipe.parameters or {}))
    rows, values, layered = [], [], False
    for owner, params in levels:
        for param, setting in params.items():
            layered = layered or isinstance(setting, list)
            for filt in _filters(setting):
                label = f"{owner} {param}" + (f" [{filt or 'rest'}]" if filt is not ... else "")
                probe = "" if filt in (None, ...) else filt  # "" matches only the catch-all entry
                rows.append(label)
                values.append([_number(resolve([params], param, probe, layer_position(i, num_layers)))
                               for i in range(num_layers)])
    return LayerTable(rows, values, layered)


def _filters(setting: Any) -> list[Any]:
    """The filters of a filtered setting (None: the catch-all entry); ``[...]`` when unfiltered."""
    if isinstance(setting, list) and setting and isinstance(setting[0], FilterEntry):
        return [None if e.filter in (None, "*") else e.filter for e in setting]
    return [...]


def _number(value: Any) -> float | None:
    if value is MISSING or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def model_names(study: optuna.Study) -> dict[str, str]:
    """Model path -> the name the space gives it."""
    space = study.user_attrs.get("space") or {}
    entries = [space.get("base_model"), *space.get("models", [])]
    return {e["model"]: e["name"] for e in entries if isinstance(e, Mapping) and "model" in e and "name" in e}


# ---------------------------------------------------------------- Pareto front
def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool]) -> set[int]:
    """Indices of the points no other point dominates (at least as good on both objectives and
    better on one); equal points are all kept."""
    signs = [1.0 if up else -1.0 for up in maximize]
    keyed = [(signs[0] * a, signs[1] * b) for a, b in points]
    front = set()
    for i, (a, b) in enumerate(keyed):
        if not any(c >= a and d >= b and (c > a or d > b) for c, d in keyed):
            front.add(i)
    return front

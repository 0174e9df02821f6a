"""The one home of objective kinds: what each entry of a space's ``objectives`` means, its
direction, its weight in the ranking of a Pareto front, and its problems (checked when the space
is loaded). The values of one candidate are :mod:`evomerge.search.objectives`.

    score                       the weighted eval score (maximize)
    <task>                      one eval task's metric (maximize; minimize for a negative weight)
    params                      the candidate's parameter count (minimize)
    layers                      the candidate's decoder layers (minimize)
    tokens_generated            tokens the candidate generated in the search evaluation, on
                                either backend (minimize; 0 for loglikelihood-only tasks)
    module:function             a Python callable (model, tokenizer) -> float | dict
    module:function[key]        one entry of the dict it returns
    ...:minimize / ...:maximize a callable's direction (default maximize)

An entry may be a mapping ``{name: NAME, weight: W}`` (stored as ``objective_weights``): with
several objectives, the one "best" trial (``best/``, reports, progress) is the Pareto-optimal
trial with the highest weighted sum of its objectives, each scaled to [0, 1] over the front; W
(>= 0) is how much NAME counts there, its direction says which way is better. Unweighted
objectives count with their task's weight (a task) or 1.

The callable contract is :mod:`evomerge.evaluate.callable`. ``params`` and ``layers`` are
measured on the merged model, so they vary when candidates differ in shape (a layer path);
for a parameter-space merge they are the same for every candidate. Cheap-first pruning ranks
by the eval score, so it needs a single eval objective (``score`` or a task).

Lifecycle: :func:`objective_problems` when the space is validated (it imports callables).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.evaluate.callable import CALLABLE, TOKENS_GENERATED, resolve_callable

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

SCORE = "score"  # the objective name of the weighted eval score

COSTS = {
    "params": "parameter count",
    "layers": "decoder layers",
    TOKENS_GENERATED: "tokens generated in the search evaluation",
}
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class Objective:
    """One parsed ``objectives`` entry: ``kind`` is score, task, cost or callable; ``target``
    the callable's ``module:function[key]`` (None for the other kinds)."""

    name: str
    kind: str
    direction: str
    target: str | None = None

    @property
    def label(self) -> str:
        """Axis and column label: what is measured, and which way is better."""
        better = "lower" if self.direction == "minimize" else "higher"
        what = {"cost": COSTS.get(self.name), "callable": f"{self.target} (Python callable)"}.get(
            self.kind, self.name)
        return f"{what} ({better} is better)"


def parse_objective(name: str, task_weights: dict[str, float]) -> Objective:
    """What ``name`` means given the eval tasks (name -> weight). Raises one
    :class:`EvomergeError` line for a name of no kind; does not import callables."""
    if name == SCORE:
        return Objective(name, "score", "maximize")
    if name in task_weights:
        if name in COSTS:
            raise EvomergeError(f"objective {name!r} is both a cost objective and an eval task; "
                                "rename the task")
        return Objective(name, "task", "maximize" if task_weights[name] > 0 else "minimize")
    if name in COSTS:
        return Objective(name, "cost", "minimize")
    if ":" in name:
        target, _, direction = name.rpartition(":")
        if direction not in DIRECTIONS:
            target, direction = name, "maximize"
        if CALLABLE.match(target) is None:
            raise EvomergeError(f"objective {name!r} is not module:function[key][:minimize] "
                                "(e.g. my_scorers:brevity or my_scorers:quality[fluency]:minimize)")
        return Objective(name, "callable", direction, target)
    raise EvomergeError(f"objective {name!r} is neither 'score' nor a task in eval.tasks "
                        f"{sorted(task_weights)}, nor a cost ({', '.join(COSTS)}), nor a Python "
                        "callable module:function")


def objective_label_of(name: str) -> str:
    """The label of a cost or callable objective (``name`` itself for any other name)."""
    try:
        obj = parse_objective(name, {})
    except EvomergeError:
        return name
    return obj.label if obj.kind in ("cost", "callable") else name


def parse_objectives(space: SearchSpace) -> list[Objective]:
    """Every objective of a validated space, in order."""
    weights = {t.name: t.weight for t in space.eval.tasks}
    return [parse_objective(o, weights) for o in space.objectives]


def directions(space: SearchSpace) -> list[str]:
    """Optuna directions, one per objective."""
    return [o.direction for o in parse_objectives(space)]


def split_weighted_entries(entries: Any) -> tuple[Any, dict[str, Any]]:
    """The ``objectives`` of a space file as names, and the weights its mapping entries
    (``{name: NAME, weight: W}``) give (the short form read before validation; other values are
    left for the schema to refuse)."""
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        return entries, {}
    names: list[Any] = []
    weights: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - {"name", "weight"})
            if unknown or "name" not in entry:
                raise ValueError(f"objective entry {entry!r}: give a name, or {{name: NAME, weight: W}} "
                                 f"(unknown keys {unknown})" if unknown else
                                 f"objective entry {entry!r} has no name; write {{name: NAME, weight: W}}")
            names.append(entry["name"])
            if "weight" in entry:
                weights[str(entry["name"])] = entry["weight"]
        else:
            names.append(entry)
    return tuple(names), weights


def weight_problems(space: SearchSpace) -> list[str]:
    """Problems of the user's objective weights: each a finite number >= 0 naming one of the
    objectives, not all 0, and only with several objectives (one objective needs no ranking)."""
    weights = space.objective_weights
    if not weights:
        return []
    if len(space.objectives) < 2:
        return [f"objective weights {dict(weights)} rank several objectives; with one objective "
                "remove the weight"]
    problems = []
    for name, w in weights.items():
        if name not in space.objectives:
            problems.append(f"objective weight for {name!r}, which is not an objective "
                            f"{list(space.objectives)}; weight a listed objective")
        elif not (math.isfinite(w) and w >= 0):
            problems.append(f"objective {name!r} weight {w!r} must be a finite number >= 0 (its "
                            "direction already says which way is better)")
    if not problems and not any(w > 0 for w in weights.values()) and len(weights) == len(space.objectives):
        problems.append("every objective weight is 0; give at least one a weight above 0")
    return problems


def objective_problems(space: SearchSpace) -> list[str]:
    """Every problem of the space's objectives, one line each (callables are imported here, so
    a missing module or function is reported before anything runs)."""
    weights = {t.name: t.weight for t in space.eval.tasks}
    problems: list[str] = []
    parsed: list[Objective] = []
    for name in space.objectives:
        try:
            parsed.append(obj := parse_objective(name, weights))
            if obj.target is not None:
                resolve_callable(obj.target)
        except EvomergeError as err:
            problems.append(str(err))
    if len(set(space.objectives)) != len(space.objectives):
        problems.append(f"objectives {list(space.objectives)} repeat a name")
    problems += weight_problems(space)
    if space.pruning is not None:
        if len(space.objectives) > 1:
            problems.append("pruning (cheap-first evaluation) works with one objective only; remove it")
        elif parsed and parsed[0].kind not in ("score", "task"):
            problems.append(f"pruning ranks candidates by their eval score, not by {parsed[0].name}; "
                            "remove pruning or make the objective score or a task")
    return problems

"""The one home of objective kinds: what each entry of a space's ``objectives`` means, its
direction, its problems (checked when the space is loaded) and its value for one candidate.

    score                       the weighted eval score (maximize)
    <task>                      one eval task's metric (maximize; minimize for a negative weight)
    params                      the candidate's parameter count (minimize)
    layers                      the candidate's decoder layers (minimize)
    tokens_generated            tokens the candidate generated in the search evaluation, hf
                                backend (minimize; 0 for loglikelihood-only tasks)
    module:function             a Python callable (model, tokenizer) -> float | dict
    module:function[key]        one entry of the dict it returns
    ...:minimize / ...:maximize a callable's direction (default maximize)

The callable contract is :mod:`evomerge.evaluate.callable`. ``params`` and ``layers`` are
measured on the merged model, so they vary when candidates differ in shape (a layer path);
for a parameter-space merge they are the same for every candidate. Cheap-first pruning ranks
by the eval score, so it needs a single eval objective (``score`` or a task).

Lifecycle: :func:`objective_problems` when the space is validated (it imports callables);
:func:`objective_values` once per candidate, after its evaluation (it calls them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.evaluate.callable import (CALLABLE, TOKENS_GENERATED, TokenCountingEvaluator,
                                        call_objective, callable_value, resolve_callable)
from evomerge.errors import EvomergeError
from evomerge.space.schema import SCORE
from merge_engine.errors import NonFiniteError

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

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
    if any(o.name == TOKENS_GENERATED for o in parsed) and space.eval.backend != "hf":
        problems.append(f"objective {TOKENS_GENERATED} is counted on the hf backend only (eval.backend "
                        f"is {space.eval.backend}); use backend hf or drop the objective")
    if space.pruning is not None:
        if len(space.objectives) > 1:
            problems.append("pruning (cheap-first evaluation) works with one objective only; remove it")
        elif parsed and parsed[0].kind not in ("score", "task"):
            problems.append(f"pruning ranks candidates by their eval score, not by {parsed[0].name}; "
                            "remove pruning or make the objective score or a task")
    return problems


# ---------------------------------------------------------------- values of one candidate
def objective_values(space: SearchSpace, result: Any, model: Any = None, tokenizer: Any = None) -> list[float]:
    """The values told to Optuna for one candidate: from its eval ``result`` (score, tasks, the
    generated-token count) and from the candidate ``model`` itself (costs, callables; each
    callable is called once even when several objectives read its dict). Raises
    :class:`NonFiniteError` for a non-finite value, :class:`EvomergeError` for a callable's
    wrong return: the candidate fails, the search goes on."""
    returned: dict[str, Any] = {}
    values = []
    for o in parse_objectives(space):
        if o.kind == "score":
            values.append(result.score)
        elif o.kind == "task":
            values.append(result.metric(o.name))
        elif o.kind == "cost":
            values.append(_cost(o.name, result, model))
        else:
            function = o.target.partition("[")[0]
            if function not in returned:
                returned[function] = call_objective(o.target, model, tokenizer)
            values.append(callable_value(o.target, returned[function]))
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteError(f"the evaluation returned a non-finite objective {values}")
    return values


def _cost(name: str, result: Any, model: Any) -> float:
    if name == TOKENS_GENERATED:
        if TOKENS_GENERATED not in result.extra:
            raise EvomergeError(f"the evaluator did not count generated tokens; wrap it with "
                                f"counting_evaluators (objective {TOKENS_GENERATED})")
        return float(result.extra[TOKENS_GENERATED])
    if model is None:
        raise EvomergeError(f"objective {name} needs the candidate model")
    if name == "params":
        return float(sum(p.numel() for p in model.parameters()))
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers is None:
        raise EvomergeError(f"objective layers: the model's config has no num_hidden_layers "
                            f"({type(model).__name__})")
    return float(layers)


def counting_evaluators(space: SearchSpace, evaluators: Any) -> Any:
    """``evaluators`` (a :class:`~evomerge.search.loop.Evaluators`) with the search evaluator
    counting generated tokens when an objective needs them; unchanged otherwise."""
    if TOKENS_GENERATED not in space.objectives or isinstance(evaluators.search, TokenCountingEvaluator):
        return evaluators
    evaluators.search = TokenCountingEvaluator(evaluators.search)
    return evaluators

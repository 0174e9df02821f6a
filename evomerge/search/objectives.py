"""The objective values of one candidate, told to Optuna after its evaluation. What each
objective name means, its direction and its problems: :mod:`evomerge.space.objectives`.

Lifecycle: :func:`objective_values` once per candidate, after its evaluation (it calls the
space's Python callables); :func:`counting_evaluators` once per run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from evomerge.evaluate.callable import (TOKENS_GENERATED, TokenCountingEvaluator, call_objective,
                                        callable_value)
from evomerge.errors import EvomergeError
from evomerge.space.objectives import parse_objectives
from merge_engine.errors import NonFiniteError

if TYPE_CHECKING:
    from evomerge.space import SearchSpace


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

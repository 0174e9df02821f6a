"""The ``fidelity:`` block of a space: successive-halving rungs over nested doc subsets.

    fidelity: {rungs: [20, 60], reduction_factor: 3, startup_trials: 5}

Each candidate is scored on ``rungs[0]`` docs per task, then (if it stays among the best
``1/reduction_factor`` of the candidates scored at that rung) on the next rung's docs, and so on
up to the full evaluation (``eval.limit``). A rung's docs contain the previous rung's, and only the
new docs are scored (:mod:`evomerge.search.fidelity`). ``pruning:`` is the one-rung case decided
by a percentile instead. The names follow Optuna's ``SuccessiveHalvingPruner``/``HyperbandPruner``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from merge_engine.recipe import Frozen

if TYPE_CHECKING:
    from evomerge.space.schema import SearchSpace


class Fidelity(Frozen):
    """Successive halving over nested doc subsets (see the module docstring).

    - ``rungs``: docs per task at each cheap rung, increasing; the full evaluation is the last rung.
    - ``reduction_factor`` (Hyperband's eta): a candidate goes on from a rung when its score there
      is in the top ``1/reduction_factor`` of the finished candidates' scores at that rung.
    - ``startup_trials``: until this many finished candidates have a score at a rung, every
      candidate goes on from it (they calibrate the bar).
    - ``anchors``: docs per task of an extra lowest rung, the anchor estimate
      (:mod:`evomerge.evaluate.estimator`) of the full score, fitted on ``anchor_trials``
      models' full per-doc results: the input models (:mod:`evomerge.search.anchor_inputs`), then
      the first complete candidates by trial number; it starts once it is fitted.
    - ``anchor_method``: how the anchor estimate fills in the other docs (``completion`` or
      ``stratified``).
    """

    rungs: tuple[int, ...] = Field(min_length=1)
    reduction_factor: float = Field(default=3.0, gt=1)
    startup_trials: int = Field(default=5, ge=0)
    anchors: int | None = Field(default=None, ge=1)
    anchor_trials: int = Field(default=8, ge=1)
    anchor_method: Literal["completion", "stratified"] = "completion"

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, rungs: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 1 for n in rungs) or any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ValueError(f"rungs {list(rungs)} must be increasing doc counts >= 1, e.g. [20, 60]")
        return rungs


def fidelity_problems(space: SearchSpace) -> list[str]:
    """The cross-field rules of ``fidelity`` (one line each)."""
    if space.fidelity is None:
        return []
    problems = []
    if space.pruning is not None:
        problems.append("fidelity and pruning are both set; pruning is the one-rung case of fidelity, keep one")
    if len(space.objectives) > 1:
        problems.append("fidelity (rungs of cheap evaluations) works with one objective only; remove it")
    fid = space.fidelity
    if fid.anchors is not None and fid.anchors >= fid.rungs[0]:
        problems.append(f"fidelity.anchors {fid.anchors} must be below the first rung {fid.rungs[0]} "
                        "(the anchor estimate is the cheapest rung)")
    top = fid.rungs[-1]
    if isinstance(space.eval.limit, int) and top >= space.eval.limit:
        problems.append(f"fidelity rung {top} must be below eval.limit {space.eval.limit} (the last, full rung)")
    return problems

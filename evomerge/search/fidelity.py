"""Multi-fidelity evaluation: successive-halving rungs over nested doc subsets.

A :class:`RungLadder` fixes, once per run, each leaf task's docs at every rung: a seeded shuffle
of the full evaluation's docs (``eval.limit``'s seeded subset), of which rung ``k`` takes the
first ``sizes[k]``; the last rung is all of them. So rung ``k``'s docs are a prefix of rung
``k+1``'s, every worker of a study derives the same docs (they depend only on the seed and the
task), and the full rung scores exactly the docs a run without rungs scores.

:func:`climb` scores one candidate rung by rung. At each rung only the docs not scored yet are
run; the rung's score is folded from the per-doc items of all docs so far (each task's own
aggregation over the union, so a task's docs weigh equally whichever rung scored them). After a
cheap rung it reports the score as intermediate value ``step=k`` and asks the study's pruner
(:class:`RungPruner` for ``fidelity:``, a percentile for ``pruning:``): the decision reads the
finished trials' values at that step from the storage, so workers sharing one study share it.

User attrs of a trial: ``samples`` (docs scored, all rungs: the cost), ``rung`` (the last rung
reached), ``cheap_scores``/``cheap_samples`` (the last cheap rung's task scores and docs),
``search_scores``/``search_samples`` (the full score's), and ``doc_items`` (per-doc items of a
trial that reached the full rung, for :mod:`evomerge.evaluate.estimator`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

DocSet = dict[str, list[int]]  # leaf task -> doc ids


@dataclass(frozen=True)
class RungLadder:
    """The nested doc sets of a run's rungs (cheap rungs first, the full evaluation last) and the
    evaluator that scores them (``evaluate(model, tokenizer, docs=...)``, ``runner.fold``)."""

    evaluator: Any
    doc_sets: tuple[DocSet, ...]

    @classmethod
    def build(cls, evaluator: Any, sizes: tuple[int, ...], seed: int) -> RungLadder:
        """Rungs of ``sizes`` docs per leaf task (capped at the leaf's docs), then the full set."""
        full = evaluator.runner.doc_ids()
        order = {leaf: _shuffled(ids, f"{seed}/rungs/{leaf}") for leaf, ids in full.items()}
        sets = [{leaf: sorted(ids[:n]) for leaf, ids in order.items()} for n in sizes]
        return cls(evaluator, (*sets, {leaf: sorted(ids) for leaf, ids in full.items()}))

    @property
    def cheap_rungs(self) -> int:
        return len(self.doc_sets) - 1


def _shuffled(ids: list[int], key: str) -> list[int]:
    out = sorted(ids)
    random.Random(key).shuffle(out)
    return out


def climb(trial: optuna.Trial, ladder: RungLadder, model: Any, tokenizer: Any) -> Any:
    """Score the candidate rung by rung (see the module docstring); returns the full-set
    ``EvalResult``, or raises ``optuna.TrialPruned`` at the rung where the pruner stops it."""
    items: dict[str, dict[int, Any]] = {}
    spent = 0
    for k, docs in enumerate(ladder.doc_sets):
        new = {leaf: [i for i in ids if i not in items.get(leaf, {})] for leaf, ids in docs.items()}
        part = ladder.evaluator.evaluate(model, tokenizer, docs=new)
        for leaf, got in part.extra["docs"].items():
            items.setdefault(leaf, {}).update(got)
        spent += part.n_samples
        result = ladder.evaluator.runner.fold(items)
        trial.set_user_attr("samples", spent)
        trial.set_user_attr("rung", k)
        stage = "search" if k == ladder.cheap_rungs else "cheap"
        trial.set_user_attr(f"{stage}_scores", {t.task: t.value for t in result.tasks})
        trial.set_user_attr(f"{stage}_samples", result.n_samples)
        if k == ladder.cheap_rungs:
            trial.set_user_attr("doc_items", {leaf: {str(i): v for i, v in got.items()}
                                              for leaf, got in items.items()})
            return result
        trial.report(result.score, step=k)
        if trial.should_prune():
            raise optuna.TrialPruned(f"rung {k} score {result.score:.4f} ({result.n_samples} docs) "
                                     "below the bar of that rung")
    raise AssertionError("unreachable: the last rung returns")


def stored_doc_items(trial: FrozenTrial) -> dict[str, dict[int, Any]] | None:
    """A finished trial's per-doc items as :func:`climb` stored them (doc ids back to int)."""
    got = trial.user_attrs.get("doc_items")
    if not isinstance(got, Mapping):
        return None
    return {leaf: {int(i): v for i, v in docs.items()} for leaf, docs in got.items()}


class RungPruner(BasePruner):
    """Asynchronous successive halving over explicit rungs (steps ``0..K-1``).

    At step ``k`` a trial goes on when its value is at least the ``1 - 1/reduction_factor``
    quantile of the values at step ``k`` of the finished (complete or pruned) trials, or while
    fewer than ``startup_trials`` finished trials have a value there. Unlike
    Optuna's ``SuccessiveHalvingPruner`` (rungs at ``min_resource * eta**k``), the rungs are the
    space's doc counts, and the bar comes from the storage alone, so any number of workers on
    one study apply the same rule to the same data.
    """

    def __init__(self, reduction_factor: float, startup_trials: int) -> None:
        self.reduction_factor = reduction_factor
        self.startup_trials = startup_trials

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        sign = -1.0 if study.direction == StudyDirection.MINIMIZE else 1.0
        peers = [sign * t.intermediate_values[step]
                 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                 if step in t.intermediate_values]
        if not peers or len(peers) < self.startup_trials:
            return False
        value = sign * trial.intermediate_values[step]
        bar = float(np.quantile(peers, 1.0 - 1.0 / self.reduction_factor))
        return value < bar

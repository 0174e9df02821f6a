"""Multi-fidelity evaluation: successive-halving rungs over nested doc subsets.

A :class:`RungLadder` fixes, once per run, each leaf task's docs at every rung: a seeded shuffle
of the full evaluation's docs (``eval.limit``'s seeded subset), of which rung ``k`` takes the
first ``sizes[k]``; the last rung is all of them. So rung ``k``'s docs are a prefix of rung
``k+1``'s, every worker of a study derives the same docs (they depend only on the seed and the
task), and the full rung scores exactly the docs a run without rungs scores.

:func:`climb` scores one candidate rung by rung. At each rung only the docs not scored yet are
run; the rung's score is folded from the per-doc items of its docs (each task's own aggregation,
so it equals one run over those docs, and the full rung equals a run without rungs, to the bit).
After a cheap rung it reports the score as intermediate value ``step=k`` and asks the study's
pruner (:class:`RungPruner` for ``fidelity:``, a percentile for ``pruning:``): the decision reads
the finished trials' values at that step from the storage, so workers sharing one study share it.

With ``fidelity.anchors`` an extra lowest rung (step 0) scores only the anchor docs of an
:class:`~evomerge.evaluate.estimator.AnchorEstimator` and reports its estimate of the full score;
it is fitted (:class:`AnchorRung`) on the per-doc results of the input models (scored on the
full set when the study is created) and of the first complete trials.

User attrs of a trial: ``samples`` (docs scored, all rungs: the cost), ``rung`` (the last rung
reached), ``cheap_scores``/``cheap_samples`` (the last cheap rung's task scores and docs),
``search_scores``/``search_samples`` (the full score's), and ``doc_items`` (per-doc items of a
trial that reached the full rung: what the anchor estimator is fitted on).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.evaluate.estimator import AnchorEstimator

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

DocSet = dict[str, list[int]]  # leaf task -> doc ids


#: Study user attr: ``[[model name, {leaf: {doc id: item}}], ...]``, the input models' per-doc
#: results on the full search docs, stored by the run that creates the study before its first
#: trial (:mod:`evomerge.search.anchor_inputs`).
ANCHOR_INPUTS = "anchor_inputs"


@dataclass
class AnchorRung:
    """The anchor-estimate rung: fitted once, on a bank of ``fit_trials`` models' per-doc
    results: the input models' (the study's :data:`ANCHOR_INPUTS`, when its creator stored them)
    and then the first complete trials (by number, once every trial before them has finished).
    Every worker reads the same bank: the inputs are stored when the study is created, before any
    trial can complete, so a worker never fits without them where another fits with them."""

    n_anchors: int
    fit_trials: int
    seed: int
    method: str = "completion"
    _fitted: AnchorEstimator | None = None

    def estimator(self, study: optuna.Study) -> AnchorEstimator | None:
        """The fitted estimator, or None while its trials are not all finished."""
        if self._fitted is None:
            bank = [_doc_items(items) for _, items in study.user_attrs.get(ANCHOR_INPUTS) or ()]
            need = max(0, self.fit_trials - len(bank))
            trials: list[dict[str, dict[int, Any]]] = []
            for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
                if len(trials) == need:
                    break
                if not t.state.is_finished():
                    return None
                if t.state == TrialState.COMPLETE and (items := stored_doc_items(t)) is not None:
                    trials.append(items)
            if len(trials) < need or not bank + trials:
                return None
            self._fitted = AnchorEstimator.fit(bank + trials, self.n_anchors, seed=self.seed, method=self.method)
        return self._fitted


@dataclass(frozen=True)
class RungLadder:
    """The nested doc sets of a run's rungs (cheap rungs first, the full evaluation last), the
    optional anchor rung below them, and the evaluator that scores them
    (``evaluate(model, tokenizer, docs=...)``, ``runner.fold``)."""

    evaluator: Any
    doc_sets: tuple[DocSet, ...]
    anchor: AnchorRung | None = None

    @classmethod
    def for_space(cls, space: SearchSpace, evaluator: Any) -> RungLadder | None:
        """The space's rungs (``fidelity``, or ``pruning`` as one rung) on ``evaluator``; None
        without either."""
        fid = space.fidelity
        if fid is None and space.pruning is None:
            return None
        sizes = fid.rungs if fid is not None else (space.pruning.limit,)
        anchor = None
        if fid is not None and fid.anchors:
            anchor = AnchorRung(fid.anchors, fid.anchor_trials, space.eval.seed, fid.anchor_method)
        return cls.build(evaluator, sizes, space.eval.seed, anchor)

    @classmethod
    def build(cls, evaluator: Any, sizes: tuple[int, ...], seed: int,
              anchor: AnchorRung | None = None) -> RungLadder:
        """Rungs of ``sizes`` docs per leaf task (capped at the leaf's docs), then the full set."""
        full = evaluator.runner.doc_ids()
        order = {leaf: rung_order(ids, f"{seed}/rungs/{leaf}") for leaf, ids in full.items()}
        sets = [{leaf: sorted(ids[:n]) for leaf, ids in order.items()} for n in sizes]
        return cls(evaluator, (*sets, {leaf: sorted(ids) for leaf, ids in full.items()}), anchor)

    @property
    def cheap_rungs(self) -> int:
        return len(self.doc_sets) - 1


def rung_order(ids: list[int], key: str) -> list[int]:
    """The seeded order in which rungs take a leaf's docs (``key``: ``"{seed}/rungs/{leaf}"``)."""
    out = sorted(ids)
    random.Random(key).shuffle(out)
    return out


class _Scored:
    """The per-doc items of one candidate so far, and the docs scored (each once)."""

    def __init__(self, trial: optuna.Trial, ladder: RungLadder, model: Any, tokenizer: Any) -> None:
        self.trial, self.ladder, self.model, self.tokenizer = trial, ladder, model, tokenizer
        self.items: dict[str, dict[int, Any]] = {}
        self.spent = 0

    def score(self, docs: DocSet) -> None:
        new = {leaf: [i for i in ids if i not in self.items.get(leaf, {})] for leaf, ids in docs.items()}
        part = self.ladder.evaluator.evaluate(self.model, self.tokenizer, docs=new)
        for leaf, got in part.extra["docs"].items():
            self.items.setdefault(leaf, {}).update(got)
        self.spent += part.n_samples
        self.trial.set_user_attr("samples", self.spent)

    def on(self, docs: DocSet) -> dict[str, dict[int, Any]]:
        return {leaf: {i: self.items[leaf][i] for i in ids} for leaf, ids in docs.items()}

    def check(self, step: int, score: float, what: str) -> None:
        self.trial.report(score, step=step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{what} score {score:.4f} below the bar of rung {step}")


def climb(trial: optuna.Trial, ladder: RungLadder, model: Any, tokenizer: Any) -> Any:
    """Score the candidate rung by rung (see the module docstring); returns the full-set
    ``EvalResult``, or raises ``optuna.TrialPruned`` at the rung where the pruner stops it.

    Steps: the anchor rung (when configured) is step 0 and the doc rungs follow; a trial
    scored before the anchor estimator is fitted skips step 0. A doc rung's score covers exactly
    its own docs (anchors outside it are scored, kept, and count from the full rung on)."""
    fold = ladder.evaluator.runner.fold
    scored = _Scored(trial, ladder, model, tokenizer)
    first = 0
    if ladder.anchor is not None:
        first = 1
        estimator = ladder.anchor.estimator(trial.study)
        if estimator is not None:
            scored.score(estimator.docs())
            trial.set_user_attr("rung", 0)
            estimate = fold(estimator.complete(scored.items))
            trial.set_user_attr("cheap_scores", {t.task: t.value for t in estimate.tasks})
            trial.set_user_attr("cheap_samples", scored.spent)
            scored.check(0, estimate.score, f"anchor estimate ({scored.spent} docs)")
    for k, docs in enumerate(ladder.doc_sets):
        scored.score(docs)
        result = fold(scored.on(docs))
        trial.set_user_attr("rung", first + k)
        stage = "search" if k == ladder.cheap_rungs else "cheap"
        trial.set_user_attr(f"{stage}_scores", {t.task: t.value for t in result.tasks})
        trial.set_user_attr(f"{stage}_samples", result.n_samples)
        if k < ladder.cheap_rungs:
            scored.check(first + k, result.score, f"{result.n_samples}-doc")
    trial.set_user_attr("doc_items", storable(scored.items))
    return result


def stored_doc_items(trial: FrozenTrial) -> dict[str, dict[int, Any]] | None:
    """A finished trial's per-doc items as :func:`climb` stored them (doc ids back to int)."""
    got = trial.user_attrs.get("doc_items")
    return _doc_items(got) if isinstance(got, Mapping) else None


def _doc_items(stored: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, Any]]:
    """Per-doc items as stored in the study (JSON: doc ids as strings) back to int doc ids."""
    return {leaf: {int(i): v for i, v in docs.items()} for leaf, docs in stored.items()}


def storable(items: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[str, Any]]:
    """Per-doc items ready for a JSON user attr (doc ids as strings)."""
    return {leaf: {str(i): v for i, v in got.items()} for leaf, got in items.items()}


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

"""Coarse-to-fine search for spaces with many per-layer parameters (the big-space default).

A per-layer space repeats each searched number for every layer group and filter: 3 models x
(weight, density) x 2 layers x 3 module groups is 36 numbers, a 32-layer model hundreds. Most
of a merge's quality is decided by the per-model values (how much of each expert, how dense);
the per-layer values refine it. So the search runs in two phases over one study:

1. **coarse**: the first ``coarse_trials`` trials are *tied* candidates, every layer's copy of a
   number equal (:func:`tie_groups`: one number per model and parameter, 6 for the space
   above), proposed by a Gaussian process over the tied space, which is small enough for a GP
   to be far more sample-efficient than CMA-ES (results/benchmarks/search_efficiency.md);
2. **fine**: CMA-ES over every parameter, its mean at the best complete trial so far (the best
   tied point) and a small first step (:data:`FINE_SIGMA` of each range), so it refines that
   point layer by layer instead of searching the whole box again.

Lifecycle: one sampler per process (a worker builds its own); the phase of a trial is read from
the study (finished trials so far), so workers sharing a storage agree on it. The GP of the
coarse phase is refitted for every proposal on an in-memory copy of the study in tied
coordinates (running trials included, so another worker's pending point is not proposed
again), seeded with ``seed + trial number``: the same study gives the same proposal. The fine
phase's CMA-ES is built at this process's first fine proposal; every trial of the coarse
phase is outside its generations. Pruned trials count at their last rung's score where the
space has rungs (``pruning``), as the 6-parameter default's GP does.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from evomerge.space.genome import distributions, slots

if TYPE_CHECKING:
    from evomerge.space import SearchSpace

FINE_SIGMA = 0.1  # CMA-ES's first step in the fine phase, as a fraction of each range (its default: 1/6)
COARSE_PER_DIM = 4  # coarse-phase trials per tied number (24 for 6 tied numbers)


def tie_groups(space: SearchSpace) -> dict[str, list[str]]:
    """The tied space: tied name (``model.param``, or the name itself) -> the parameter names it
    sets. Per-layer and per-filter copies of one model's parameter share a group; anything else
    (a method choice, a switch, a layer-path space) is its own group. Copies with different
    distributions are never tied."""
    dists = distributions(space)
    if space.layer_path is not None or space.layer_methods:
        return {name: [name] for name in dists}
    groups: dict[str, list[str]] = {}
    for method in space.methods:
        for s in slots(space, method):
            key = ".".join(p for p in (s.model, s.param) if p)
            members = groups.setdefault(key, [])
            if s.name not in members:
                members.append(s.name)
    out: dict[str, list[str]] = {}
    for key, members in groups.items():
        if len({repr(dists[m]) for m in members}) == 1 and key not in dists:
            out[key] = members
        else:
            out.update({m: [m] for m in members})
    out.update({name: [name] for name in dists if not any(name in m for m in out.values())})
    return out


def coarse_trials(space: SearchSpace, budget: int) -> int:
    """How many trials the coarse phase runs: :data:`COARSE_PER_DIM` per tied number, at most a
    third of the trial budget, at least 10."""
    return max(10, min(COARSE_PER_DIM * len(tie_groups(space)), budget // 3))


class CoarseToFineSampler(BaseSampler):
    """Tied GP proposals for the first ``coarse_trials`` trials, then CMA-ES from the best one
    (see the module docstring). ``fine(x0)`` builds the fine phase's CMA-ES with its mean at
    ``x0`` (every parameter's value)."""

    def __init__(self, space: SearchSpace, *, seed: int, pruning: bool, coarse_trials: int,
                 fine: Callable[[dict[str, Any]], BaseSampler]) -> None:
        self._dists = distributions(space)
        self._groups = tie_groups(space)
        self._tied = {key: self._dists[members[0]] for key, members in self._groups.items()}
        self._seed, self._pruning, self.coarse_trials = seed, pruning, coarse_trials
        self._make_fine = fine
        self._fine: BaseSampler | None = None
        self._random = optuna.samplers.RandomSampler(seed=seed)

    # ------------------------------------------------------------ phases
    def in_coarse_phase(self, study: optuna.Study) -> bool:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return len(finished) < self.coarse_trials

    def fine_sampler(self, study: optuna.Study) -> BaseSampler:
        if self._fine is None:
            best = _best_complete(study)
            x0 = {n: best.params[n] for n in self._dists if n in best.params} if best else {}
            self._fine = self._make_fine(x0)
        return self._fine

    # ------------------------------------------------------------ optuna's sampler protocol
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self.in_coarse_phase(study):
            return dict(self._dists)
        return self.fine_sampler(study).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        if self.in_coarse_phase(study):
            tied = self._propose_tied(study, trial)
            full = {m: tied[key] for key, members in self._groups.items() for m in members}
            return {n: full[n] for n in search_space if n in full}
        return self.fine_sampler(study).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if self._fine is not None:
            return self._fine.sample_independent(study, trial, param_name, param_distribution)
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        if self._fine is not None:
            self._fine.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()
        if self._fine is not None:
            self._fine.reseed_rng()

    # ------------------------------------------------------------ the coarse phase's GP
    def _propose_tied(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            gp = optuna.samplers.GPSampler(seed=(self._seed + trial.number) % 2**32, n_startup_trials=5)
        shadow = optuna.create_study(direction=study.direction, sampler=gp)
        for t in study.get_trials(deepcopy=False):
            if t.number == trial.number or not all(m in t.params for ms in self._groups.values() for m in ms):
                continue
            params = {key: _tie([t.params[m] for m in members], self._tied[key])
                      for key, members in self._groups.items()}
            value = _value(t, self._pruning)
            if value is not None:
                shadow.add_trial(optuna.trial.create_trial(params=params, distributions=self._tied, value=value))
            elif t.state == TrialState.RUNNING:
                shadow.add_trial(optuna.trial.create_trial(params=params, distributions=self._tied,
                                                           state=TrialState.RUNNING))
        return shadow.ask(self._tied).params


def _value(t: FrozenTrial, pruning: bool) -> float | None:
    """A trial's value as the coarse GP fits it: the full score, or a pruned trial's last rung."""
    if t.state == TrialState.COMPLETE:
        return t.value
    if pruning and t.state == TrialState.PRUNED and t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _tie(values: list[Any], dist: BaseDistribution) -> Any:
    """One value for a group's copies: equal copies give that value; others their mean (numbers)
    or most common choice."""
    if isinstance(dist, CategoricalDistribution):
        return Counter(values).most_common(1)[0][0]
    mean = sum(values) / len(values)
    if isinstance(dist, IntDistribution):
        return min(max(round(mean), dist.low), dist.high)
    assert isinstance(dist, FloatDistribution)
    return min(max(mean, dist.low), dist.high)


def _best_complete(study: optuna.Study) -> FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(done, key=lambda t: (sign * t.value, -t.number))

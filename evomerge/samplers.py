"""Seeded Optuna samplers and the cheap-first pruner, by name.

The default (``SearchSpace.default_sampler``) is ``gp`` for one objective over at most
``GP_MAX_PARAMS`` parameters, ``cmaes`` above that, and ``nsga2`` for several objectives; every
sampler is seeded so one command proposes the same candidates on every run.
"""

from __future__ import annotations

import copy
import warnings

import optuna

from evomerge.errors import EvomergeError
from evomerge.space import SAMPLERS, Pruning


def make_sampler(name: str, *, seed: int, n_objectives: int = 1, pruning: bool = False,
                 budget: int = 100) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (one of :data:`evomerge.space.SAMPLERS`), seeded with ``seed``.

    With ``pruning``, samplers that can learn from pruned trials do (CMA-ES then ranks a pruned
    candidate by its cheap-first score instead of dropping it from its generation). ``budget``
    (trials) sizes NSGA-II's population so that small budgets still see several generations.
    """
    if name not in SAMPLERS:
        raise EvomergeError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    if n_objectives > 1 and name in ("cmaes", "gp"):
        raise EvomergeError(f"sampler {name} optimizes one objective; with {n_objectives} "
                            "objectives use nsga2, tpe or random")
    if name == "cmaes":
        # Categorical choices (method, normalize) are outside CMA-ES; a seeded random sampler
        # proposes them, which is expected here, so the warning is noise.
        return optuna.samplers.CmaEsSampler(
            seed=seed, consider_pruned_trials=pruning, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    if name == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            gp = PrunedAwareGPSampler if pruning else optuna.samplers.GPSampler
            return gp(seed=seed, n_startup_trials=5, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, budget // 4)))
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(pruning: Pruning | None) -> optuna.pruners.BasePruner:
    """Stop candidates whose cheap-first score is below the given percentile of earlier ones."""
    if pruning is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.PercentilePruner(pruning.percentile, n_startup_trials=pruning.startup_trials,
                                           n_warmup_steps=0)


class _PrunedAsComplete:
    """A read-only view of a study in which each pruned trial with a reported value looks
    complete, valued at its last report (the cheap-first score)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> object:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: object = None,
                    use_cache: bool = False) -> list[optuna.trial.FrozenTrial]:
        from optuna.trial import TrialState

        wanted = None if states is None else tuple(states)
        ask = None if wanted is None else tuple(set(wanted) | {TrialState.PRUNED})
        out = []
        for t in self._study._get_trials(deepcopy=False, states=ask, use_cache=use_cache):
            if t.state == TrialState.PRUNED:
                if not t.intermediate_values or (wanted is not None and TrialState.COMPLETE not in wanted):
                    continue
                t = copy.deepcopy(t)
                t.state = TrialState.COMPLETE
                t.values = [t.intermediate_values[max(t.intermediate_values)]]
            out.append(t)
        return out


class PrunedAwareGPSampler(optuna.samplers.GPSampler):
    """Optuna's GP, also fitted to pruned trials at their cheap-first score.

    The stock GP only learns from complete trials, so with cheap-first pruning most of what it
    proposes teaches it nothing and it keeps proposing near the poor points
    (results/benchmarks/search_efficiency.md). CMA-ES has ``consider_pruned_trials`` for this.
    """

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict) -> dict:
        return super().sample_relative(_PrunedAsComplete(study), trial, search_space)

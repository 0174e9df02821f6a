"""The one sampler registry: seeded Optuna samplers by name, the default-sampler policy, the pruner.

Every sampler is seeded: one uninterrupted run proposes the same candidates every time; a
resumed run and each worker get their own seed (``search.preflight.sampler_seed``), so they
propose new ones. The default (:func:`default_sampler`) is ``gp`` for one objective over at most :data:`GP_MAX_PARAMS`
parameters, ``cmaes`` above that, and ``nsga2`` for several objectives. The space file's
``sampler`` and ``evomerge search --sampler`` are checked against :data:`SAMPLERS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from evomerge.adapters.optuna import PrunedAsComplete
from evomerge.errors import EvomergeError
from evomerge.search.fidelity import RungPruner
from evomerge.space.genome import distributions
from evomerge.space.rungs import Fidelity

if TYPE_CHECKING:
    from evomerge.space import Pruning, SearchSpace

GP_MAX_PARAMS = 16  # up to this many searched parameters the default single-objective sampler is GP


@dataclass(frozen=True)
class SamplerKind:
    """A sampler name: how to build it and how many objectives it optimizes."""

    build: Callable[[int, bool, int], optuna.samplers.BaseSampler]  # (seed, pruning, budget)
    single: bool = True
    multi: bool = True


def _cmaes(seed: int, pruning: bool, budget: int) -> optuna.samplers.BaseSampler:
    # Categorical choices (method, normalize) are outside CMA-ES; a seeded random sampler
    # proposes them, which is expected here, so the warning is noise.
    return optuna.samplers.CmaEsSampler(
        seed=seed, consider_pruned_trials=pruning, warn_independent_sampling=False,
        independent_sampler=optuna.samplers.RandomSampler(seed=seed))


def _gp(seed: int, pruning: bool, budget: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        gp = PrunedAwareGPSampler if pruning else optuna.samplers.GPSampler
        return gp(seed=seed, n_startup_trials=5, warn_independent_sampling=False)


SAMPLERS: dict[str, SamplerKind] = {
    "cmaes": SamplerKind(_cmaes, multi=False),
    "tpe": SamplerKind(lambda seed, pruning, budget: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)),
    "gp": SamplerKind(_gp, multi=False),
    "random": SamplerKind(lambda seed, pruning, budget: optuna.samplers.RandomSampler(seed=seed)),
    # population sized so that small budgets still see several generations
    "nsga2": SamplerKind(lambda seed, pruning, budget: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=max(8, min(50, budget // 4))), single=False),
}


def sampler_problems(name: str | None, n_objectives: int | None) -> list[str]:
    """Why sampler ``name`` cannot optimize ``n_objectives`` objectives (empty when it can;
    ``n_objectives`` None: only whether the name is known)."""
    if name is None:
        return []
    kind = SAMPLERS.get(name)
    if kind is None:
        return [f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}"]
    if n_objectives is None:
        return []
    if n_objectives > 1 and not kind.multi:
        able = ", ".join(n for n, k in SAMPLERS.items() if k.multi)
        return [f"sampler {name} optimizes one objective; with {n_objectives} objectives use {able}"]
    if n_objectives == 1 and not kind.single:
        able = ", ".join(n for n, k in SAMPLERS.items() if k.single)
        return [f"sampler {name} is for several objectives; use {able}"]
    return []


def make_sampler(name: str, *, seed: int, n_objectives: int = 1, pruning: bool = False,
                 budget: int = 100) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (a key of :data:`SAMPLERS`), seeded with ``seed``.

    With ``pruning``, samplers that can learn from pruned trials do (CMA-ES then ranks a pruned
    candidate by its cheap-first score instead of dropping it from its generation). ``budget``
    (trials) sizes NSGA-II's population.
    """
    if problems := sampler_problems(name, n_objectives):
        raise EvomergeError(problems[0])
    return SAMPLERS[name].build(seed, pruning, budget)


def default_sampler(space: SearchSpace) -> str:
    """The space's ``sampler``, else: NSGA-II for several objectives; for one, a Gaussian
    process while the space has at most ``GP_MAX_PARAMS`` parameters (far fewer evaluations
    than CMA-ES at that size: results/benchmarks/search_efficiency.md), CMA-ES above."""
    if space.sampler:
        return space.sampler
    if len(space.objectives) > 1:
        return "nsga2"
    return "gp" if len(distributions(space)) <= GP_MAX_PARAMS else "cmaes"


def make_pruner(pruning: Pruning | Fidelity | None) -> optuna.pruners.BasePruner:
    """``pruning``: stop candidates whose cheap-first score is below the given percentile of
    earlier ones; ``fidelity``: successive halving at each rung (:class:`RungPruner`)."""
    if pruning is None:
        return optuna.pruners.NopPruner()
    if isinstance(pruning, Fidelity):
        return RungPruner(pruning.reduction_factor, pruning.startup_trials)
    return optuna.pruners.PercentilePruner(pruning.percentile, n_startup_trials=pruning.startup_trials,
                                           n_warmup_steps=0)


class PrunedAwareGPSampler(optuna.samplers.GPSampler):
    """Optuna's GP, also fitted to pruned trials at their cheap-first score.

    The stock GP only learns from complete trials, so with cheap-first pruning most of what it
    proposes teaches it nothing and it keeps proposing near the poor points
    (results/benchmarks/search_efficiency.md). CMA-ES has ``consider_pruned_trials`` for this.
    """

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict) -> dict:
        return super().sample_relative(PrunedAsComplete(study), trial, search_space)

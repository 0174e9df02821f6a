"""The one sampler registry: seeded Optuna samplers by name, the default-sampler policy, the pruner.

Every sampler is seeded: one uninterrupted run proposes the same candidates every time; a
resumed run and each worker get their own seed (``search.preflight.sampler_seed``; worker k of a
study gets seed ``space.seed + k * 0x9E3779B1 mod 2**32``, distinct for every k), so they propose
new ones. The default (:func:`default_sampler`) is ``gp`` for one objective over at most
:data:`GP_MAX_PARAMS` parameters; above that ``coarse-to-fine`` (:mod:`evomerge.search.coarse`:
a GP over the space with every layer's copy of a number tied, then CMA-ES over all of them from
the best tied point) where the tied space has at most :data:`GP_MAX_PARAMS` numbers, else
``cmaes``; and ``nsga2`` for several objectives. The
space file's ``sampler`` and ``evomerge search --sampler`` are checked against :data:`SAMPLERS`.

Several workers on one study (trials still running when a worker asks):

- ``gp`` proposes the point whose expected improvement is largest jointly with the running
  trials' points (optuna's qLogEI: Monte Carlo draws from the GP's joint posterior over the
  running points and the new one), so it does not propose again where another worker is already
  looking; it publishes each proposal in the storage before it is evaluated, so other workers
  see it at once, and a proposal that repeats an earlier trial's point (two workers asking at the
  same moment) is made again (:class:`~evomerge.adapters.optuna.DistinctGPSampler`).
- ``tpe`` runs with ``constant_liar``: a running trial counts as a bad result at its point.
- ``coarse-to-fine`` fits its coarse phase's GP with the running trials' (tied) points, as
  ``gp`` does; its fine phase is ``cmaes``.
- ``cmaes`` needs no liar: a generation's points are independent draws from one Gaussian that only
  changes once the whole generation is scored, so a running trial would not change the next draw
  even in one process; workers' distinct seeds make their draws differ. The same holds for
  ``nsga2`` (generations) and ``random``.

CMA-ES defaults for big spaces (:func:`cmaes_settings`): population 4 + floor(3 ln n) for n
numeric parameters (Hansen's default), initial step a sixth of each parameter's range (all
parameters are scaled to [0, 1]), mean at the space's equal-weights point (moved one step inside
the box where it lies on a bound, as a default density of 1.0 does), and IPOP restarts
(twice the population) when a run converges. The space's start points are enqueued trials, so
they are scored first; the first one only teaches optuna the search space (CMA-ES starts with
the second trial), any further ones enter CMA-ES's first generation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import FloatDistribution, IntDistribution

from evomerge.adapters.optuna import DistinctGPSampler, PrunedAsComplete, RestartingCmaEsSampler
from evomerge.errors import EvomergeError
from evomerge.search.coarse import FINE_SIGMA, CoarseToFineSampler, coarse_trials, tie_groups
from evomerge.search.fidelity import RungPruner
from evomerge.space.genome import distributions, equal_params
from evomerge.space.rungs import Fidelity

if TYPE_CHECKING:
    from evomerge.space import Pruning, SearchSpace

GP_MAX_PARAMS = 16  # up to this many searched parameters the default single-objective sampler is GP
CMAES_MAX_RESTARTS = 8  # IPOP: the 8th restart runs 256 times the first population


@dataclass(frozen=True)
class SamplerSettings:
    """What a sampler is built from: its seed, whether pruned trials carry a cheap score, the
    trial budget, and the space (None: library defaults where a setting needs the space)."""

    seed: int
    pruning: bool = False
    budget: int = 100
    space: SearchSpace | None = None


@dataclass(frozen=True)
class SamplerKind:
    """A sampler name: how to build it and how many objectives it optimizes."""

    build: Callable[[SamplerSettings], optuna.samplers.BaseSampler]
    single: bool = True
    multi: bool = True


def cmaes_settings(space: SearchSpace | None) -> dict[str, Any]:
    """Population and mean of CMA-ES for ``space`` (empty without a space: optuna's defaults,
    the same population, the box's centre as mean)."""
    if space is None:
        return {}
    numeric = {n: d for n, d in distributions(space).items()
               if isinstance(d, (FloatDistribution, IntDistribution))}
    if not numeric:
        return {}
    equal = equal_params(space)
    x0 = {n: _inside(equal.get(n, (d.low + d.high) / 2), d) for n, d in numeric.items()}
    return {"popsize": 4 + int(3 * math.log(len(numeric))), "x0": x0}


def _inside(value: float, dist: FloatDistribution | IntDistribution, step: float = 1 / 6) -> float | int:
    """``value`` moved at least one initial step (``step`` of the range, CMA-ES's first sigma)
    away from each bound: a mean on a bound (a method's default density 1.0 in [0.1, 1]) would
    put half of every draw outside the box, where CMA-ES clips it onto the bound."""
    step = (dist.high - dist.low) * step
    inner = min(max(value, dist.low + step), dist.high - step)
    return round(inner) if isinstance(dist, IntDistribution) else inner


def _cmaes(s: SamplerSettings, x0: dict[str, Any] | None = None,
           sigma0: float | None = None) -> optuna.samplers.BaseSampler:
    """CMA-ES with :func:`cmaes_settings`; ``x0``/``sigma0``: its mean (moved inside the box by
    ``sigma0``) and first step (a fraction of each range) instead."""
    settings = cmaes_settings(s.space)
    if x0 and settings:
        dists = distributions(s.space)
        settings["x0"] = {n: _inside(x0.get(n, v), dists[n], sigma0 or 1 / 6) for n, v in settings["x0"].items()}
    if sigma0 is not None:
        settings["sigma0"] = sigma0
    # Categorical choices (method, normalize) are outside CMA-ES; a seeded random sampler
    # proposes them, which is expected here, so the warning is noise. Optuna marks x0
    # deprecated (to go in optuna 6; pinned below that): the warning says nothing to a user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # consider_pruned_trials
        return RestartingCmaEsSampler(
            seed=s.seed, consider_pruned_trials=s.pruning, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=s.seed),
            max_restarts=CMAES_MAX_RESTARTS, **settings)


def _gp(s: SamplerSettings) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        gp = PrunedAwareGPSampler if s.pruning else DistinctGPSampler
        return gp(seed=s.seed, n_startup_trials=5, warn_independent_sampling=False)


def _coarse_to_fine(s: SamplerSettings) -> optuna.samplers.BaseSampler:
    if s.space is None:
        raise EvomergeError("sampler coarse-to-fine needs the search space")
    return CoarseToFineSampler(s.space, seed=s.seed, pruning=s.pruning, coarse_trials=coarse_trials(s.space, s.budget),
                               fine=lambda x0: _cmaes(s, x0, FINE_SIGMA))


SAMPLERS: dict[str, SamplerKind] = {
    "cmaes": SamplerKind(_cmaes, multi=False),
    "coarse-to-fine": SamplerKind(_coarse_to_fine, multi=False),
    "tpe": SamplerKind(lambda s: optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=5,
                                                            constant_liar=True)),
    "gp": SamplerKind(_gp, multi=False),
    "random": SamplerKind(lambda s: optuna.samplers.RandomSampler(seed=s.seed)),
    # population sized so that small budgets still see several generations
    "nsga2": SamplerKind(lambda s: optuna.samplers.NSGAIISampler(
        seed=s.seed, population_size=max(8, min(50, s.budget // 4))), single=False),
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
                 budget: int = 100, space: SearchSpace | None = None) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (a key of :data:`SAMPLERS`), seeded with ``seed``.

    With ``pruning``, samplers that can learn from pruned trials do (CMA-ES then ranks a pruned
    candidate by its cheap-first score instead of dropping it from its generation). ``budget``
    (trials) sizes NSGA-II's population; ``space`` sizes CMA-ES's population and places its mean.
    """
    if problems := sampler_problems(name, n_objectives):
        raise EvomergeError(problems[0])
    return SAMPLERS[name].build(SamplerSettings(seed, pruning, budget, space))


def default_sampler(space: SearchSpace) -> str:
    """The space's ``sampler``, else: NSGA-II for several objectives; for one, a Gaussian
    process while the space has at most ``GP_MAX_PARAMS`` parameters (far fewer evaluations
    than CMA-ES at that size: results/benchmarks/search_efficiency.md); above, coarse-to-fine
    (a GP over the tied space, then CMA-ES over all: :mod:`evomerge.search.coarse`) where tying
    the per-layer copies leaves at most ``GP_MAX_PARAMS`` numbers
    (results/benchmarks/search_efficiency_big.md), else CMA-ES."""
    if space.sampler:
        return space.sampler
    if len(space.objectives) > 1:
        return "nsga2"
    n = len(distributions(space))
    if n <= GP_MAX_PARAMS:
        return "gp"
    return "coarse-to-fine" if len(tie_groups(space)) <= GP_MAX_PARAMS else "cmaes"


def make_pruner(pruning: Pruning | Fidelity | None) -> optuna.pruners.BasePruner:
    """``pruning``: stop candidates whose cheap-first score is below the given percentile of
    earlier ones; ``fidelity``: successive halving at each rung (:class:`RungPruner`)."""
    if pruning is None:
        return optuna.pruners.NopPruner()
    if isinstance(pruning, Fidelity):
        return RungPruner(pruning.reduction_factor, pruning.startup_trials)
    return optuna.pruners.PercentilePruner(pruning.percentile, n_startup_trials=pruning.startup_trials,
                                           n_warmup_steps=0)


class PrunedAwareGPSampler(DistinctGPSampler):
    """The GP (:class:`~evomerge.adapters.optuna.DistinctGPSampler`), also fitted to pruned
    trials at their cheap-first score.

    The stock GP only learns from complete trials, so with cheap-first pruning most of what it
    proposes teaches it nothing and it keeps proposing near the poor points
    (results/benchmarks/search_efficiency.md). CMA-ES has ``consider_pruned_trials`` for this.
    """

    def _view(self, study: optuna.Study) -> optuna.Study:
        return PrunedAsComplete(study)

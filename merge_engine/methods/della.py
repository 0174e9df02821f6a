"""DELLA: drop task-vector entries with magnitude-rank dependent probability, then mix."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec, Param
from merge_engine.randomness import TensorRandom
from merge_engine.sparsify import della_drop
from merge_engine.task_vectors import merge_trimmed

EPSILON = Param("epsilon", per_model=True, default=0.15, low=0.0, high=0.5, search=(0.01, 0.1),
                help="keep probabilities span density - epsilon (smallest) to density + epsilon")

# density +/- epsilon must stay inside (0, 1), so search densities away from the ends
_DENSITY = _params.density(search=(0.3, 0.85))


def _della(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float],
           density: list[float], epsilon: list[float], normalize: bool, rescale: bool,
           lambda_: float, paper_rescale: bool, rng: TensorRandom,
           elect_signs: bool) -> torch.Tensor:
    return merge_trimmed(
        tensors, base, weight, normalize=normalize, lambda_=lambda_, elect_signs=elect_signs,
        trim=lambda i, delta: della_drop(delta, density[i], epsilon[i], rng, i, rescale=rescale,
                                         paper_rescale=paper_rescale))


def della(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
          density: list[float], epsilon: list[float], normalize: bool, rescale: bool,
          lambda_: float, int8_mask: bool, paper_rescale: bool,
          rng: TensorRandom) -> torch.Tensor:
    """Per-row rank-based Bernoulli drop, rescale, TIES sign election."""
    return _della(tensors, base, weight, density, epsilon, normalize, rescale, lambda_,
                  paper_rescale, rng, elect_signs=True)


def della_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                 density: list[float], epsilon: list[float], normalize: bool, rescale: bool,
                 lambda_: float, int8_mask: bool, paper_rescale: bool,
                 rng: TensorRandom) -> torch.Tensor:
    """Per-row rank-based Bernoulli drop, rescale, weighted sum (no sign election)."""
    return _della(tensors, base, weight, density, epsilon, normalize, rescale, lambda_,
                  paper_rescale, rng, elect_signs=False)


def _draws(kwargs: dict) -> list[tuple[int, None]]:
    """Uniform draws ``della_drop`` asks for: models with 0 < density < 1."""
    return [(i, None) for i, d in enumerate(kwargs["density"]) if 0 < d < 1]


SPEC = MethodSpec(
    name="della",
    embed_rows="base",
    fn=della,
    params=(_params.weight(), _DENSITY, EPSILON, _params.normalize(True), _params.rescale(True),
            _params.LAMBDA, _params.INT8_MASK, _params.PAPER_RESCALE),
    base="required",
    description="DELLA: magnitude-ranked drop (MagPrune), rescale, sign election (Deep et al. 2024)",
    random=True,
    draws=_draws,
)

SPEC_LINEAR = MethodSpec(
    name="della_linear",
    embed_rows="base",
    fn=della_linear,
    params=(_params.weight(), _DENSITY, EPSILON, _params.normalize(False), _params.rescale(True),
            _params.LAMBDA, _params.INT8_MASK, _params.PAPER_RESCALE),
    base="required",
    description="DELLA drop and rescale, then task arithmetic without sign election",
    random=True,
    draws=_draws,
)

"""DARE: randomly drop and rescale task-vector entries, then mix linearly or TIES-style."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec
from merge_engine.randomness import TensorRandom
from merge_engine.sparsify import dare_drop
from merge_engine.task_vectors import merge_trimmed


def _dare(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float],
          density: list[float], normalize: bool, rescale: bool, lambda_: float,
          paper_rescale: bool, rng: TensorRandom, elect_signs: bool) -> torch.Tensor:
    return merge_trimmed(
        tensors, base, weight, normalize=normalize, lambda_=lambda_, elect_signs=elect_signs,
        trim=lambda i, delta: dare_drop(delta, density[i], rng, i, rescale=rescale,
                                        paper_rescale=paper_rescale))


def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                density: list[float], normalize: bool, rescale: bool, lambda_: float,
                int8_mask: bool, paper_rescale: bool, rng: TensorRandom) -> torch.Tensor:
    """Keep each delta entry with probability ``density``, rescale, weighted sum."""
    return _dare(tensors, base, weight, density, normalize, rescale, lambda_, paper_rescale, rng,
                 elect_signs=False)


def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
              density: list[float], normalize: bool, rescale: bool, lambda_: float,
              int8_mask: bool, paper_rescale: bool, rng: TensorRandom) -> torch.Tensor:
    """Keep each delta entry with probability ``density``, rescale, sign-elected mean."""
    return _dare(tensors, base, weight, density, normalize, rescale, lambda_, paper_rescale, rng,
                 elect_signs=True)


def _draws(kwargs: dict) -> list[tuple[int, float]]:
    """Keep masks ``dare_drop`` asks for: models with density below 1."""
    return [(i, float(d)) for i, d in enumerate(kwargs["density"]) if d < 1]


_PARAMS = (_params.weight(), _params.density(), _params.normalize(False), _params.rescale(True),
           _params.LAMBDA, _params.INT8_MASK, _params.PAPER_RESCALE)

SPEC_LINEAR = MethodSpec(
    name="dare_linear",
    embed_rows="base",
    fn=dare_linear,
    params=_PARAMS,
    base="required",
    description="DARE drop-and-rescale, then task arithmetic (Yu et al. 2023)",
    random=True,
    draws=_draws,
)

SPEC_TIES = MethodSpec(
    name="dare_ties",
    embed_rows="base",
    fn=dare_ties,
    params=_PARAMS,
    base="required",
    description="DARE drop-and-rescale, then TIES sign election (Yu et al. 2023)",
    random=True,
    draws=_draws,
)

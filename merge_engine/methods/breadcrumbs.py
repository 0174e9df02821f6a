"""Model Breadcrumbs: drop the largest outliers and the smallest entries of each task vector."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec, Param
from merge_engine import selection
from merge_engine.sparsify import breadcrumbs_trim
from merge_engine.task_vectors import merge_trimmed

GAMMA = Param("gamma", per_model=True, default=0.01, low=0.0, high=1.0, search=(0.0, 0.1),
              help="fraction of largest-magnitude delta entries dropped as outliers")


def _breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor, weight: list[float],
                 density: list[float], gamma: list[float], normalize: bool, rescale: bool,
                 lambda_: float, elect_signs: bool) -> torch.Tensor:
    return merge_trimmed(
        tensors, base, weight, normalize=normalize, lambda_=lambda_, elect_signs=elect_signs,
        trim=lambda i, delta: breadcrumbs_trim(delta, density[i], gamma[i], rescale=rescale),
        select=selection.breadcrumbs(density, gamma), rescale=rescale)


def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                density: list[float], gamma: list[float], normalize: bool, rescale: bool,
                lambda_: float, int8_mask: bool) -> torch.Tensor:
    """Breadcrumbs trim (top ``gamma``, bottom ``1 - density - gamma``), then weighted sum."""
    return _breadcrumbs(tensors, base, weight, density, gamma, normalize, rescale, lambda_,
                        elect_signs=False)


def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                     density: list[float], gamma: list[float], normalize: bool, rescale: bool,
                     lambda_: float, int8_mask: bool) -> torch.Tensor:
    """Breadcrumbs trim, then TIES sign election."""
    return _breadcrumbs(tensors, base, weight, density, gamma, normalize, rescale, lambda_,
                        elect_signs=True)


_PARAMS = (_params.weight(), _params.density(), GAMMA, _params.normalize(False),
           _params.rescale(False), _params.LAMBDA, _params.INT8_MASK)

SPEC = MethodSpec(
    name="breadcrumbs",
    embed_rows="base",
    fn=breadcrumbs,
    params=_PARAMS,
    base="required",
    description="Model Breadcrumbs: drop outliers and small entries (Davari & Belilovsky 2023)",
)

SPEC_TIES = MethodSpec(
    name="breadcrumbs_ties",
    embed_rows="base",
    fn=breadcrumbs_ties,
    params=_PARAMS,
    base="required",
    description="Model Breadcrumbs trim with TIES sign election",
)

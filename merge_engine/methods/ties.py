"""TIES: trim each task vector by magnitude, elect signs, take the disjoint mean."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec
from merge_engine import selection
from merge_engine.sparsify import magnitude_trim
from merge_engine.task_vectors import merge_trimmed


def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
         density: list[float], normalize: bool, rescale: bool, lambda_: float,
         int8_mask: bool) -> torch.Tensor:
    """Keep the top ``density`` of each delta by magnitude, then sign-elected weighted mean.

    A model whose ``density`` keeps less than one entry keeps its largest entry;
    ``density = 0`` leaves it out (see ``sparsify.magnitude_trim``).
    """
    return merge_trimmed(
        tensors, base, weight, normalize=normalize, lambda_=lambda_, elect_signs=True,
        trim=lambda i, delta: magnitude_trim(delta, density[i], rescale=rescale),
        select=selection.magnitude(density), rescale=rescale)


SPEC = MethodSpec(
    name="ties",
    embed_rows="base",
    fn=ties,
    params=(_params.weight(), _params.density(), _params.normalize(True), _params.rescale(False),
            _params.LAMBDA, _params.INT8_MASK),
    base="required",
    description="TIES-merging: trim, elect sign, disjoint merge (Yadav et al. 2023)",
)

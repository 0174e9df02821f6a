"""Task arithmetic: add weighted task vectors to the base."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec
from merge_engine.sparsify import merge_task_vectors


def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: list[float],
                    normalize: bool, lambda_: float, int8_mask: bool) -> torch.Tensor:
    """``base + lambda * sum(w_i * (x_i - base))`` (÷ ``sum(w_i)`` when ``normalize``)."""
    return merge_task_vectors(tensors, base, weight, normalize=normalize, lambda_=lambda_,
                              elect_signs=False)


SPEC = MethodSpec(
    name="task_arithmetic",
    embed_rows="base",
    fn=task_arithmetic,
    params=(_params.weight(), _params.normalize(False), _params.LAMBDA, _params.INT8_MASK),
    base="required",
    description="base plus the weighted sum of task vectors (Ilharco et al. 2022)",
)

"""Passthrough: copy one model's tensor (layer stacking / frankenmerges)."""

from __future__ import annotations

import torch

from merge_engine.methods._params import COEF_LIMIT
from merge_engine.methods.spec import MethodSpec, Param


def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, *,
                scale: list[float]) -> torch.Tensor:
    """The single input, multiplied by ``scale`` when it is not 1."""
    (x,) = tensors
    return x if scale[0] == 1 else x * scale[0]


SPEC = MethodSpec(
    name="passthrough",
    fn=passthrough,
    params=(Param("scale", per_model=True, default=1.0, low=-COEF_LIMIT, high=COEF_LIMIT,
                  search=(0.0, 1.0), help="factor applied to the copied tensor"),),
    base="unused",
    description="copy the tensor of the one source (layer stacking)",
    min_models=1,
    max_models=1,
)

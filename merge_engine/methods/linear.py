"""Linear: a weighted average of the inputs."""

from __future__ import annotations

import numpy as np
import torch

from merge_engine.errors import MergeError
from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec


def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
           normalize: bool) -> torch.Tensor:
    """``sum(w_i * x_i)``, divided by ``sum(w_i)`` when ``normalize``; accumulated in float32
    one model at a time and cast back to the inputs' dtype once.

    Weights summing to 0 with ``normalize`` raise MergeError (mergekit divides by zero).
    """
    total = sum(float(w) for w in weight)
    if normalize and abs(total) < 1e-8:
        raise MergeError(f"linear: the weights {list(weight)} sum to 0 and normalize is true, "
                         "so the merge would divide by zero; change the weights or set "
                         "normalize: false")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for w, x in zip(weight, tensors):
        acc.add_(x.float() if x.dtype != torch.float32 else x, alpha=float(w))
    if normalize:
        # the divisor is the float32 sum of the float32 weights, in order (mergekit's arithmetic)
        divisor = np.float32(0)
        for w in weight:
            divisor = np.float32(divisor + np.float32(w))
        if divisor != 1:  # dividing by 1 changes no bits
            acc.div_(float(divisor))
    return acc.to(tensors[0].dtype)


SPEC = MethodSpec(
    name="linear",
    fn=linear,
    elementwise=True,
    params=(_params.weight(), _params.normalize(True)),
    base="unused",
    description="weighted average of the models (model soup)",
)

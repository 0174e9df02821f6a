"""Linear: a weighted average of the inputs."""

from __future__ import annotations

import torch

from merge_engine.errors import MergeError
from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec


def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
           normalize: bool) -> torch.Tensor:
    """``sum(w_i * x_i)``, divided by ``sum(w_i)`` when ``normalize``; in the inputs' dtype.

    Weights summing to 0 with ``normalize`` raise MergeError (mergekit divides by zero).
    """
    stacked = torch.stack(tensors)  # [N, *shape]
    w = torch.tensor(list(weight), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.dim() - 1)))  # [N, 1, ...]
    out = (w * stacked).sum(dim=0)
    if normalize:
        w_sum = w.sum(dim=0)
        if abs(float(w_sum.sum())) < 1e-8:
            raise MergeError(f"linear: the weights {list(weight)} sum to 0 and normalize is true, "
                             "so the merge would divide by zero; change the weights or set "
                             "normalize: false")
        out = out / w_sum
    return out


SPEC = MethodSpec(
    name="linear",
    fn=linear,
    params=(_params.weight(), _params.normalize(True)),
    base="unused",
    description="weighted average of the models (model soup)",
)

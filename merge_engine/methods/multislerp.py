"""Multi-SLERP: weighted spherical mean of any number of models (or task vectors)."""

from __future__ import annotations

import torch

from merge_engine.errors import MergeError
from merge_engine.methods import _params
from merge_engine.methods._reduce import l2_norm, row_norm, sum_last
from merge_engine.methods.spec import MethodSpec, Param


def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
               normalize_weights: bool, eps: float) -> torch.Tensor:
    """Weighted mean of directions through the tangent space, scaled by ``sum(w_i * |x_i|)``.

    Computed in float32 on ``x_i`` (on ``x_i - base`` with a base). Directions
    that cancel raise MergeError, except for two inputs, which fall back to the
    weighted sum.
    """
    if len(tensors) == 1:
        return tensors[0]
    shape, dtype = tensors[0].shape, tensors[0].dtype
    x = torch.stack([t.float() for t in tensors])  # [N, *shape]
    if base is not None:
        x = x - base.float()
    flat = x.reshape(len(tensors), -1)  # [N, D]
    w = torch.tensor(list(weight), dtype=torch.float32, device=flat.device)
    if normalize_weights:
        if abs(float(w.sum())) < 1e-8:
            raise MergeError(f"multislerp: the weights {list(weight)} sum to 0 and "
                             "normalize_weights is true; change the weights")
        w = w / w.sum()
    norms = row_norm(flat).unsqueeze(-1)  # [N, 1]
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)  # [D]
    mean_norm = float(l2_norm(mean))
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergeError("multislerp: the weighted directions cancel out (opposite models "
                             "with balancing weights); change the weights")
        res = (x[0] * w[0] + x[1] * w[1]).reshape(shape)
    else:
        mean = mean / mean_norm
        tangents = units - sum_last(units * mean).unsqueeze(-1) * mean  # [N, D]
        step = (tangents * w[:, None]).sum(dim=0)  # [D]
        step_norm = l2_norm(step) + eps
        res = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
        res = (res * (norms.squeeze(-1) * w).sum()).reshape(shape)
    if base is not None:
        res = res + base.float()
    return res.to(dtype)


SPEC = MethodSpec(
    name="multislerp",
    fn=multislerp,
    params=(
        _params.weight(),
        Param("normalize_weights", per_model=False, default=True, kind="bool",
              help="divide the weights by their sum"),
        Param("eps", per_model=False, default=1e-8, low=0.0, high=1e-2,
              help="numerical floor for norms"),
    ),
    base="optional",
    description="barycentric spherical interpolation of several models or task vectors",
)

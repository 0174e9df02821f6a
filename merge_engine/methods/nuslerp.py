"""NuSLERP: slerp of two models (or of their task vectors) with weights instead of t."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods._reduce import row_norm, sum_last
from merge_engine.methods.spec import MethodSpec, Param

COLINEAR_EPS = 1e-8
NORM_CLAMP = 1e-7


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of each vector along the last dimension; lerp where sin(theta) ~ 0. [..., n]."""
    u0 = v0 / row_norm(v0).unsqueeze(-1).clamp(min=NORM_CLAMP)
    u1 = v1 / row_norm(v1).unsqueeze(-1).clamp(min=NORM_CLAMP)
    cos = sum_last(u0 * u1).unsqueeze(-1)  # [..., 1]
    theta = torch.acos(cos.clamp(-1, 1))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    lerp = (1 - t) * v0 + t * v1
    return torch.where(sin_theta.abs() < COLINEAR_EPS, lerp, res)


def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
            nuslerp_flatten: bool, nuslerp_row_wise: bool) -> torch.Tensor:
    """Slerp at ``t = w2 / (w1 + w2)`` (0.5 when the weights sum to ~0), in float32.

    ``nuslerp_flatten`` treats each tensor as one vector; otherwise vectors run
    along the last dimension, or along dim 0 with ``nuslerp_row_wise`` (mergekit's
    naming). With a base, ``base + slerp(x1 - base, x2 - base)``.
    """
    w_sum = weight[0] + weight[1]
    t = 0.5 if abs(w_sum) < 1e-6 else weight[1] / w_sum
    v0, v1 = tensors[0].float(), tensors[1].float()
    if base is not None:
        v0, v1 = v0 - base.float(), v1 - base.float()
    shape = v0.shape
    if nuslerp_flatten:
        res = slerp_rows(t, v0.reshape(-1), v1.reshape(-1))
    elif nuslerp_row_wise and v0.dim() > 1:
        res = slerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        res = slerp_rows(t, v0, v1)
    res = res.reshape(shape)
    if base is not None:
        res = base.float() + res
    return res.to(tensors[0].dtype)


SPEC = MethodSpec(
    name="nuslerp",
    fn=nuslerp,
    params=(
        _params.weight(),
        Param("nuslerp_flatten", per_model=False, default=True, kind="bool",
              help="slerp whole tensors as single vectors"),
        Param("nuslerp_row_wise", per_model=False, default=False, kind="bool",
              help="when not flattening, slerp vectors along dim 0 instead of the last dim"),
    ),
    base="optional",
    description="slerp of two models, or of their task vectors when a base is given",
    min_models=2,
    max_models=2,
)

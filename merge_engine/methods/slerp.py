"""SLERP: spherical interpolation between the base and one other model."""

from __future__ import annotations

import math

import torch

from merge_engine.methods._reduce import dot, l2_norm
from merge_engine.methods.spec import MethodSpec, Param

DOT_THRESHOLD = 0.9995  # above this |cos| the tensors are ~colinear: plain lerp
NORM_EPS = 1e-8


def slerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of two float32 tensors treated as flat vectors; lerp when nearly colinear."""
    n0, n1 = float(l2_norm(v0)), float(l2_norm(v1))
    u0 = v0 / n0 if n0 > NORM_EPS else v0
    u1 = v1 / n1 if n1 > NORM_EPS else v1
    cos = float(dot(u0, u1))
    if abs(cos) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    s0 = math.sin(theta * (1 - t)) / sin_theta
    s1 = math.sin(theta * t) / sin_theta
    return s0 * v0 + s1 * v1


def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical interpolation from ``base`` (t=0) to ``tensors[0]`` (t=1), in float32."""
    (other,) = tensors
    return slerp_flat(t, base.float(), other.float()).to(base.dtype)


SPEC = MethodSpec(
    name="slerp",
    fn=slerp,
    params=(Param("t", per_model=False, required=True, low=0.0, high=1.0, search=(0.0, 1.0),
                  help="interpolation position: 0 gives the base, 1 the other model"),),
    base="required",
    description="spherical linear interpolation between the base and one other model",
    min_models=1,
    max_models=1,
)

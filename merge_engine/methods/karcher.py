"""Karcher mean: the Riemannian (geodesic) mean of the models' directions."""

from __future__ import annotations

import math

import torch

from merge_engine.methods._reduce import dot, l2_norm
from merge_engine.methods.spec import MethodSpec, Param


def spherical_mean(units: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of unit vectors, by fixed-point iteration in the tangent space."""
    alpha = 1.0 / len(units)
    mean = sum(alpha * u for u in units)
    mean_norm = float(l2_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for u in units:
            cos = min(1.0, max(-1.0, float(dot(mean, u))))
            theta = math.acos(cos)
            if theta < tol:
                continue
            step += alpha * (theta / math.sin(theta)) * (u - cos * mean)
        step_norm = float(l2_norm(step))
        if step_norm < tol:
            break
        mean = math.cos(step_norm) * mean + math.sin(step_norm) * (step / step_norm)
        norm = float(l2_norm(mean))
        if norm > tol:
            mean = mean / norm
    return mean


def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, *, max_iter: int,
            tol: float) -> torch.Tensor:
    """Karcher mean of the directions, scaled by the mean norm of all inputs; in float32.

    Inputs with norm <= ``tol`` take no part in the direction; all such gives zeros.
    """
    if len(tensors) == 1:
        return tensors[0]
    flat = [t.float().reshape(-1) for t in tensors]
    norms = [float(l2_norm(x)) for x in flat]
    units = [x / n for x, n in zip(flat, norms) if n > tol]
    if not units:
        return torch.zeros_like(tensors[0])
    direction = spherical_mean(units, int(max_iter), tol)
    scale = sum(norms) / len(norms)
    return (scale * direction).reshape(tensors[0].shape).to(tensors[0].dtype)


SPEC = MethodSpec(
    name="karcher",
    fn=karcher,
    params=(
        Param("max_iter", per_model=False, default=10, kind="int", low=1, high=1000,
              help="maximum fixed-point iterations"),
        Param("tol", per_model=False, default=1e-5, low=0.0, high=1.0,
              help="convergence tolerance (also the norm below which an input is ignored)"),
    ),
    base="unused",
    description="Riemannian (Karcher) mean of the models on the hypersphere",
)

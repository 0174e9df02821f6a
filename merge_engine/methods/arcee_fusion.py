"""Arcee Fusion: keep the base except where the other model differs from it unusually much."""

from __future__ import annotations

import torch

from merge_engine.methods._reduce import sum_last
from merge_engine.methods.spec import MethodSpec

PROB_EPS = 1e-8  # added to both softmax distributions before the KL divergence
IQR_FACTOR = 1.5  # the outlier fence: median + 1.5 * interquartile range


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|other - base|`` times the KL divergence of softmax(other) from softmax(base).

    The divergence is taken per row (over the last dimension; a vector is one row) and
    scales every entry of that row. Computed in the inputs' dtype (the row sum in a fixed
    order, then rounded to that dtype), as mergekit 0.1.5 computes it.
    """
    p = torch.softmax(other, dim=-1) + PROB_EPS
    q = torch.softmax(base, dim=-1) + PROB_EPS
    kl = sum_last(p * torch.log(p / q)).to(other.dtype).unsqueeze(-1)
    return (other - base).abs() * kl


def outlier_fence(scores: torch.Tensor) -> torch.Tensor:
    """``median + 1.5 * (q3 - q1)`` of all entries (0-dim, in the scores' dtype).

    Quartile k of n sorted values is the value at index ``floor(k * (n - 1) / 4)`` (no
    interpolation), taken over every entry. mergekit 0.1.5 takes the same order statistics
    but, above 1M entries, of 1M entries drawn at random from the global RNG; ours are exact,
    so they are reproducible and equal to mergekit's for tensors up to 1M entries.
    """
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.kthvalue(flat, 1 + last * k // 4).values for k in (1, 2, 3))
    return median + IQR_FACTOR * (q3 - q1)


def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The base, plus the other model's change at entries whose importance reaches the fence.

    An entry is taken when ``importance >= outlier_fence(importance)`` (ties at the fence are
    taken): ``base + (other - base) * mask``. Identical inputs give the base back (every
    importance is 0, so is the fence, and every zero change is taken).
    """
    (other,) = tensors
    scores = importance(other, base)
    mask = (scores >= outlier_fence(scores)).to(base.dtype)
    return base + (other - base) * mask


SPEC = MethodSpec(
    name="arcee_fusion",
    fn=arcee_fusion,
    params=(),
    base="required",
    description="Arcee Fusion: take the other model's changes that are outliers of importance",
    min_models=1,
    max_models=1,
)

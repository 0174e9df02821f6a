"""NearSwap: take the other model's value where it is already close to the base's."""

from __future__ import annotations

import torch

from merge_engine.methods.spec import MethodSpec, Param

MIN_GAP = 1e-6  # distances below this count as this far apart (no division by zero)


def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """``w * other + (1 - w) * base`` per entry with ``w = clamp(t / |base - other|, 0, 1)``.

    Entries closer than ``t`` become the other model's; farther ones move toward it by
    ``t / distance``. Equal entries (distance 0, floored at ``MIN_GAP``) stay equal. Runs in
    the inputs' dtype with mergekit 0.1.5's order of operations, so half-precision results
    round as mergekit's do. ``t = 0`` gives the base.
    """
    (other,) = tensors
    gap = (base - other).abs().clamp(min=MIN_GAP)
    w = (t / gap).clamp(min=0.0, max=1.0)
    return w * other + (1 - w) * base


SPEC = MethodSpec(
    name="nearswap",
    fn=nearswap,
    params=(Param("t", per_model=False, required=True, low=0.0, high=1.0, search=(0.0, 0.01),
                  help="distance below which an entry takes the other model's value"),),
    base="required",
    description="NearSwap: swap in the other model's entries that lie within t of the base",
    min_models=1,
    max_models=1,
)

"""RAM (Reinforced Agent Merging) and RAM+ tensor-local: average each entry over the models
that changed it, so a change only one model made is kept whole instead of diluted."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec, Param

EPSILON = Param("epsilon", per_model=False, default=1e-5, low=0.0, high=1.0,
                help="a change of at most this magnitude counts as no change")
R = Param("r", per_model=False, default=0.1, low=0.0, high=_params.COEF_LIMIT, search=(0.0, 0.5),
          help="how much a model's unique changes are amplified per unit of overlap ratio")
ALPHA = Param("alpha", per_model=False, default=0.2, low=0.0, high=_params.COEF_LIMIT,
              search=(0.0, 1.0), help="cap on the overlap ratio (shared / unique changes)")


def _changes(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """Each model's delta, where it counts as changed (``|delta| > epsilon``, strictly),
    and how many models changed each entry (int64)."""
    deltas = [x - base for x in tensors]
    changed = [d.abs() > epsilon for d in deltas]
    count = torch.zeros_like(base, dtype=torch.int64)
    for c in changed:
        count += c
    return deltas, changed, count


def _accumulator(base: torch.Tensor) -> torch.Tensor:
    """Zeros to sum model terms in: float32 for half-precision inputs (as torch's sum does)."""
    half = base.dtype in (torch.float16, torch.bfloat16)
    return torch.zeros_like(base, dtype=torch.float32 if half else base.dtype)


def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """``base + sum_i [changed_i] * delta_i / count`` where ``count`` models changed the entry.

    An entry one model changed takes that change whole; one several changed takes their
    mean; one no model changed stays the base. Each term is divided in the inputs' dtype,
    the terms summed in float32 (half inputs) or the inputs' dtype, model by model, and
    rounded once before adding the base: mergekit 0.1.5's roundings.
    """
    deltas, changed, count = _changes(tensors, base, epsilon)
    divisor = count.clamp(min=1).to(base.dtype)
    total = _accumulator(base)
    for d, c in zip(deltas, changed):
        total += torch.where(c, d / divisor, 0.0)
    return base + total.to(base.dtype)


def unique_boost(changed: torch.Tensor, count: torch.Tensor, *, r: float, alpha: float,
                 epsilon: float) -> torch.Tensor:
    """RAM+'s factor for one model's unique changes: ``1 + r * clamp(rho, 0, alpha)`` (float32).

    ``rho`` = (entries this model changed together with another) / (entries only it changed),
    the divisor floored at ``epsilon``. A model that changed nothing gets ``rho = 0`` (mergekit
    0.1.5 gives NaN, poisoning the tensor, when also ``epsilon = 0``).
    """
    shared = int((changed & (count > 1)).sum())
    unique = int((changed & (count == 1)).sum())
    if shared == 0:
        rho = torch.tensor(0.0)
    else:
        rho = torch.tensor(float(shared)) / torch.tensor(max(float(unique), epsilon))
    return 1 + r * rho.clamp(min=0.0, max=alpha)


def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, *, r: float, alpha: float,
               epsilon: float) -> torch.Tensor:
    """RAM with each model's unique changes scaled by :func:`unique_boost`, per tensor.

    Shared changes are averaged as in :func:`ram` (divided in the inputs' dtype); the boosted
    unique changes and the sum are float32, as is the final ``base + sum``, which is then
    rounded to the inputs' dtype (mergekit 0.1.5 returns float32 here and rounds on saving).
    """
    deltas, changed, count = _changes(tensors, base, epsilon)
    divisor = count.clamp(min=1).to(base.dtype)
    shared_entries = count > 1
    total = torch.zeros_like(base, dtype=torch.float32)
    for d, c in zip(deltas, changed):
        boost = unique_boost(c, count, r=r, alpha=alpha, epsilon=epsilon)
        shared_part = torch.where(c & shared_entries, d / divisor, 0.0).float()
        unique_part = torch.where(c & (count == 1), d, 0.0).float() * boost
        total += shared_part + unique_part
    return (base.float() + total).to(base.dtype)


SPEC = MethodSpec(
    name="ram",
    embed_rows="base",
    fn=ram,
    params=(EPSILON,),
    base="required",
    description="RAM: mean of each entry's changes over the models that made them (arXiv 2601.13572)",
)

SPEC_PLUS_TL = MethodSpec(
    name="ramplus_tl",
    embed_rows="base",
    fn=ramplus_tl,
    params=(R, ALPHA, EPSILON),
    base="required",
    description="RAM+ (tensor-local): RAM with unique changes amplified by the overlap ratio",
)

"""SCE: select high-variance entries, weight models by delta energy, erase minority signs."""

from __future__ import annotations

import torch

from merge_engine.methods import _params
from merge_engine.methods.spec import MethodSpec, Param
from merge_engine.sparsify import sign_agreement, top_k_mask
from merge_engine.task_vectors import energy_shares, merge_sce


def sce(tensors: list[torch.Tensor], base: torch.Tensor, *, select_topk: float,
        int8_mask: bool) -> torch.Tensor:
    """SCE merge of the deltas ``x_i - base``, in the base dtype.

    Select: keep the ``int(select_topk * #nonzero)`` entries with the largest
    variance across models (all when ``select_topk >= 1``). Calculate: model
    weights ``mean(delta_i**2)`` normalised to sum 1 (equal when all are 0).
    Erase: TIES sign election on the selected deltas, weighted mean of survivors.
    Large bf16 CPU tensors take the native fast path (``task_vectors.merge_sce``, the same bits).
    """
    fast = merge_sce(tensors, base, select_topk)
    if fast is not None:
        return fast
    deltas = torch.stack([x.to(base.dtype) - base for x in tensors])  # [N, *shape]
    if select_topk < 1:
        var = deltas.var(dim=0, unbiased=False)
        k = int(abs(select_topk) * int(torch.count_nonzero(var)))
        deltas = deltas * top_k_mask(var, k)
    w = torch.tensor(energy_shares(list(deltas)), dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))  # [N, 1, ...]
    w = w * sign_agreement(deltas)
    mixed = (deltas * w).sum(dim=0)
    divisor = w.sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + mixed / divisor).to(base.dtype)


SPEC = MethodSpec(
    name="sce",
    embed_rows="base",
    fn=sce,
    params=(Param("select_topk", per_model=False, default=1.0, low=0.0, high=1.0,
                  search=(0.1, 1.0), help="fraction of highest-variance entries kept"),
            _params.INT8_MASK),
    base="required",
    description="SCE: select, calculate, erase (FuseChat, Wan et al. 2024)",
)

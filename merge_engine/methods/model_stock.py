"""Model Stock: move from the base toward the mean of the fine-tunes by their agreement."""

from __future__ import annotations

import torch

from merge_engine.methods._reduce import row_norm, sum_last
from merge_engine.methods.spec import MethodSpec, Param


def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *,
                filter_wise: bool) -> torch.Tensor:
    """``t * mean(x_i) + (1 - t) * base`` with ``t = N c / (1 + (N - 1) c)``; in float32.

    ``c`` is the mean pairwise cosine between the deltas ``x_i - base`` of the
    whole tensor, or of each row (last dimension) when ``filter_wise``.
    """
    shape, n = base.shape, len(tensors)
    w0 = base.float()
    ws = [x.float() for x in tensors]
    if not filter_wise:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    elif w0.dim() == 1:  # a bias is one row
        w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    offsets = [w - w0 for w in ws]
    norms = [row_norm(o) for o in offsets]  # each [...] (0-dim unless filter_wise)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            cos = sum_last(offsets[i] * offsets[j]) / (norms[i] * norms[j]).clamp(min=1e-6)
            cosines.append(cos.clamp(-1, 1))
    c = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # [..., 1]
    denom = 1 + (n - 1) * c
    # where the deltas cancel (c ≈ -1/(N-1)) the ratio is undefined: keep the base (t = 0)
    t = torch.where(denom.abs() < 1e-6, torch.zeros_like(c), n * c / torch.where(denom.abs() < 1e-6, torch.ones_like(denom), denom))
    mean = torch.stack(ws).sum(dim=0) / n
    return (t * mean + (1 - t) * w0).reshape(shape).to(base.dtype)


SPEC = MethodSpec(
    name="model_stock",
    fn=model_stock,
    params=(Param("filter_wise", per_model=False, default=False, kind="bool",
                  help="compute the interpolation ratio per row instead of per tensor"),),
    base="required",
    description="Model Stock: ratio from the angle between fine-tunes (Jang et al. 2024)",
    min_models=2,
)

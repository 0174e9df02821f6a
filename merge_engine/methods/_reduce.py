"""Reductions whose result does not depend on the thread count.

``torch.sum`` over a whole large tensor splits the work between threads and
adds the partial sums in an order that depends on how many threads there are,
so ``x.abs().sum()`` can differ in the last bit between 1 and 2 threads. Every
whole-tensor (or whole-row) reduction a merge method uses goes through here:
we fold the reduced dimension into fixed 1024-wide chunks, so each partial sum
is always computed by one thread over the same elements in the same order.
Half-precision inputs are accumulated in float32.
"""

from __future__ import annotations

import torch

_CHUNK = 1024


def sum_last(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension, in a fixed order. [..., n] -> [...]."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    while x.shape[-1] > _CHUNK:
        pad = (-x.shape[-1]) % _CHUNK
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
        x = x.reshape(*x.shape[:-1], -1, _CHUNK).sum(dim=-1)  # [..., n/1024]
    return x.sum(dim=-1)


def total(x: torch.Tensor) -> torch.Tensor:
    """Sum of all elements (0-dim tensor, float32 for half inputs)."""
    return sum_last(x.reshape(-1))


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the whole tensor (0-dim)."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return total(x * x).sqrt()


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dimension. [..., n] -> [...]."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return sum_last(x * x).sqrt()


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product of two tensors of one shape, flattened (0-dim)."""
    return total(a * b)

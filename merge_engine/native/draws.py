"""ctypes wrappers of ``draws_ranks.c``: torch's seeded CPU draws and DELLA's per-row magnitude
ranks, the same bits as the torch reference (tests/test_native_draws.py compares them).

Callers check :func:`usable` (the kernels are built) and keep the torch code as the reference for
everything else (other dtypes, other generators, NaN rows).
"""

from __future__ import annotations

import ctypes

import torch

from merge_engine import native
from merge_engine.native.sparse import _parallel

_P, _L, _F, _U64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_uint64
_SIGNATURES = {
    "mt_uniform_f32": ([_P, _U64, _L], None),
    "mt_keep_u8": ([_P, _U64, _F, _L], None),
    "row_rank_probs_bf16": ([_P, _P, _P, _L, _L, _L], _L),
    "row_rank_keep_seeded_bf16": ([_P, _U64, _P, _P, _L, _L, _L], _L),
}


def _lib() -> ctypes.CDLL | None:
    return native.declared(_SIGNATURES)


def usable() -> bool:
    return _lib() is not None


def uniform(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``torch.rand(shape, generator=torch.Generator().manual_seed(seed))`` (float32), natively."""
    out = native.empty(shape, torch.float32)
    _lib().mt_uniform_f32(out.data_ptr(), seed & 0xFFFFFFFFFFFFFFFF, out.numel())
    return out


def keep_mask(shape: tuple[int, ...], seed: int, keep: float) -> torch.Tensor:
    """``(torch.rand(shape, generator=...manual_seed(seed)) < keep).view(torch.uint8)``, natively."""
    out = native.empty(shape, torch.uint8)
    _lib().mt_keep_u8(out.data_ptr(), seed & 0xFFFFFFFFFFFFFFFF, float(keep), out.numel())
    return out


def row_rank_probs(delta: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """For a contiguous 2-D bf16 ``delta`` [R, C]: float32 ``table[rank]`` where ``rank`` is each
    entry's 0-based position in a stable ascending sort of its row by magnitude; None when a row
    holds a NaN (the torch reference then ranks)."""
    rows, cols = delta.shape
    probs = native.empty(delta.shape, torch.float32)
    n = delta.numel()
    lib = _lib()

    def part(_p: int, a: int, b: int) -> int:
        return int(lib.row_rank_probs_bf16(probs.data_ptr(), delta.data_ptr(), table.data_ptr(),
                                           cols, a // cols, b // cols))
    bad = _parallel(part, n)
    if any(b < 0 for b in bad):
        raise MemoryError("row_rank_probs_bf16: out of memory for its row buffers")
    return None if any(bad) else probs


def row_rank_keep_seeded(delta: torch.Tensor, table: torch.Tensor, seed: int) -> torch.Tensor | None:
    """``uniform(delta.shape, seed) < row_rank_probs(delta, table)`` as a bool tensor of
    ``delta``'s shape, in one pass per row and with no tensor of draws: each thread makes its
    rows' draws itself, the generator first skipped to its first row (a twist per 624 draws
    skipped, no tempering); None when a row holds a NaN."""
    rows, cols = delta.shape
    keep = native.empty(delta.shape, torch.bool)
    lib = _lib()
    seed &= 0xFFFFFFFFFFFFFFFF

    def part(_p: int, a: int, b: int) -> int:
        return int(lib.row_rank_keep_seeded_bf16(keep.data_ptr(), seed, delta.data_ptr(),
                                                 table.data_ptr(), cols, a // cols, b // cols))
    bad = _parallel(part, delta.numel())
    if any(b < 0 for b in bad):
        raise MemoryError("row_rank_keep_seeded_bf16: out of memory for its row buffers")
    return None if any(bad) else keep

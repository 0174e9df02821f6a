"""ctypes wrappers of the sparse task-vector kernels (``sparse_mix.c``), run on torch's threads.

Each wrapper takes contiguous bfloat16 CPU tensors and splits the flat range between
``torch.get_num_threads()`` Python threads (ctypes releases the GIL, so they run in parallel);
every entry's result depends only on that entry (and on whole-tensor selections fixed before
the call), so the split never changes the bits. Callers check :func:`usable` first and keep
the torch path as the reference.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from merge_engine import native

KEYS = 32768  # |bf16| magnitude bits: 15
MAX_MODELS = 64
KEEP_ALL, KEEP_ZERO, KEEP_TOP, KEEP_BAND = 0, 1, 2, 3

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "delta_hist_bf16": ([_P, _P, _P, _P, _L, _L], None),
    "hist_bf16": ([_P, _P, _L, _L], None),
    "delta_bf16": ([_P, _P, _P, _L, _L], None),
    "count_key_bf16": ([_P, _L, _L, _I], _L),
    "nth_key_bf16": ([_P, _L, _L, _I, _L], _L),
    "select_bf16": ([_P, _P, _I, _I, _L, _I, _L, _L, _L], None),
    "sparse_mix_bf16": ([_P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _I, _I, _F, _I, _F, _L, _L], None),
    "var_bf16": ([_P, _P, _I, _L, _L], None),
    "sce_mix_bf16": ([_P, _P, _P, _I, _P, _I, _I, _L, _P, _L, _L], None),
}


def _lib() -> ctypes.CDLL | None:
    return native.declared(_SIGNATURES)


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernels are built and every tensor is a contiguous bf16 CPU tensor of one
    size, large enough to be worth the thread start."""
    first = tensors[0]
    if first.numel() < native.MIN_ENTRIES or len(tensors) > MAX_MODELS + 1:
        return False
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous()
           or t.numel() != first.numel() for t in tensors):
        return False
    return _lib() is not None


def _cuts(n: int) -> list[tuple[int, int]]:
    threads = max(1, min(torch.get_num_threads(), n // native.MIN_ENTRIES))
    bounds = [n * i // threads for i in range(threads + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` helper threads (a search makes thousands of calls)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="evomerge-native")
        return _pool


def _parallel(call: Callable[[int, int, int], object], n: int) -> list[object]:
    """``call(part, start, stop)`` on each thread's range; the results in range order."""
    cuts = _cuts(n)
    if len(cuts) == 1:
        return [call(0, *cuts[0])]
    futures = [_workers(len(cuts) - 1).submit(call, p, *cuts[p]) for p in range(1, len(cuts))]
    return [call(0, *cuts[0])] + [f.result() for f in futures]


def delta_and_histogram(x: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x - base`` in bf16 (the bits of torch's subtraction) and the int64 histogram [KEYS] of
    its magnitude bits. Both flat."""
    lib = _lib()
    n = x.numel()
    delta = native.empty(n, torch.bfloat16)
    parts = _parts(n)
    _parallel(lambda p, a, b: lib.delta_hist_bf16(delta.data_ptr(), parts[p].ctypes.data,
                                                  x.data_ptr(), base.data_ptr(), a, b), n)
    return delta, torch.from_numpy(parts.sum(0))


def delta_only(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``x - base`` in bf16 (flat), as :func:`delta_and_histogram` gives it, without the histogram."""
    lib = _lib()
    n = x.numel()
    delta = native.empty(n, torch.bfloat16)
    _parallel(lambda p, a, b: lib.delta_bf16(delta.data_ptr(), x.data_ptr(), base.data_ptr(), a, b), n)
    return delta


def _parts(n: int) -> np.ndarray:
    """Zeroed per-thread histograms. numpy, not torch: these small ops would wake torch's OpenMP
    team between native calls, whose spinning threads then compete with the kernels' threads."""
    return np.zeros((len(_cuts(n)), KEYS), dtype=np.int64)


def histogram(delta: torch.Tensor) -> torch.Tensor:
    """The int64 histogram [KEYS] of a bf16 tensor's magnitude bits."""
    lib = _lib()
    n = delta.numel()
    parts = _parts(n)
    _parallel(lambda p, a, b: lib.hist_bf16(parts[p].ctypes.data, delta.data_ptr(), a, b), n)
    return torch.from_numpy(parts.sum(0))


def nth_with_key(delta: torch.Tensor, key: int, nth: int) -> int:
    """Flat index of the ``nth`` (1-based) entry whose magnitude bits are ``key``."""
    lib = _lib()
    n, ptr = delta.numel(), delta.data_ptr()
    cuts = _cuts(n)
    counts = _parallel(lambda p, a, b: lib.count_key_bf16(ptr, a, b, key), n) if len(cuts) > 1 else [nth]
    for (a, b), count in zip(cuts, counts):
        if nth <= count:
            return int(lib.nth_key_bf16(ptr, a, b, key, nth))
        nth -= count
    raise ValueError(f"fewer than the requested entries have magnitude bits {key}")


def select(delta: torch.Tensor, sel: Sequence[int]) -> torch.Tensor:
    """``delta * mask`` for a selection ``(mode, lo, lo_cut, hi, hi_cut)`` of KEEP_TOP/KEEP_BAND."""
    lib = _lib()
    out = native.empty(delta.shape, delta.dtype)
    _parallel(lambda p, a, b: lib.select_bf16(out.data_ptr(), delta.data_ptr(), *sel, a, b),
              delta.numel())
    return out


def sparse_mix(deltas: Sequence[torch.Tensor], selections: Sequence[Sequence[int]],
               base: torch.Tensor, weights: Sequence[float], *, elect: bool, normalize: bool,
               divisor: float, lambda_: float) -> torch.Tensor:
    """One pass of ``sparsify._mix`` over selected deltas: ``selections[i]`` is
    ``(mode, lo, lo_cut, hi, hi_cut)``; ``weights`` are the bf16 weights as floats; ``divisor``
    the bf16 sum of weights (without sign election). Returns bf16 of ``base``'s shape."""
    lib = _lib()
    n_models = len(deltas)
    out = native.empty(base.shape, torch.bfloat16)
    ptrs = (ctypes.c_void_p * n_models)(*[d.data_ptr() for d in deltas])
    cols = list(zip(*selections))
    arrays = [(ctypes.c_int * n_models)(*cols[0]), (ctypes.c_int * n_models)(*cols[1]),
              (ctypes.c_long * n_models)(*cols[2]), (ctypes.c_int * n_models)(*cols[3]),
              (ctypes.c_long * n_models)(*cols[4]), (ctypes.c_float * n_models)(*weights)]
    args = (out.data_ptr(), base.data_ptr(), ptrs, n_models, *arrays, int(elect), int(normalize),
            float(divisor), int(lambda_ != 1), float(lambda_))
    _parallel(lambda p, a, b: lib.sparse_mix_bf16(*args, a, b), base.numel())
    return out


def variance(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(deltas).var(dim=0, unbiased=False)`` of flat bf16 deltas, the same bits."""
    lib = _lib()
    out = native.empty(deltas[0].shape, deltas[0].dtype)
    ptrs = (ctypes.c_void_p * len(deltas))(*[d.data_ptr() for d in deltas])
    _parallel(lambda p, a, b: lib.var_bf16(out.data_ptr(), ptrs, len(deltas), a, b), out.numel())
    return out


def sce_mix(deltas: Sequence[torch.Tensor], base: torch.Tensor, var: torch.Tensor | None,
            top: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
    """SCE's erase-and-mix (``methods.sce``) over flat bf16 deltas: entries outside the top
    selection ``top`` = ``(KEEP_TOP, lo, lo_cut, ...)`` of ``var`` are dropped (``var`` None:
    none), ``weights`` are the bf16 shares as floats. Returns bf16 of ``base``'s shape."""
    lib = _lib()
    n_models = len(deltas)
    out = native.empty(base.shape, torch.bfloat16)
    ptrs = (ctypes.c_void_p * n_models)(*[d.data_ptr() for d in deltas])
    w = (ctypes.c_float * n_models)(*weights)
    args = (out.data_ptr(), base.data_ptr(), ptrs, n_models,
            var.data_ptr() if var is not None else None, int(var is not None), int(top[1]),
            int(top[2]), w)
    _parallel(lambda p, a, b: lib.sce_mix_bf16(*args, a, b), base.numel())
    return out

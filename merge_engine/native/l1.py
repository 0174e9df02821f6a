"""ctypes wrappers of ``l1_sums.c``: the fixed-order norms of ``methods._reduce`` over bf16 deltas,
fused with the masks that produce the kept entries, the same bits as the torch reference.

``_reduce.total`` adds ``x.float()`` in 1024-wide chunks with torch's contiguous inner sum, then
sums the chunk sums the same way; the kernel computes the first (large) level in one pass over
the bf16 entries, without the ``abs``/``float``/mask temporaries, and the small remaining levels
run through ``_reduce.sum_last`` itself. The order of the inner sum depends on the width of the
float vectors of torch's sum kernel: 8 lanes on AVX2 builds, and on AVX512 CPUs too (torch
dispatches its sum to the AVX2 kernel there: a 16-lane order differs in the last bit on about one
tensor in three, measured with torch 2.13); tests/test_native_l1.py compares both paths.
"""

from __future__ import annotations

import ctypes

import torch

from merge_engine import native
from merge_engine.methods._reduce import sum_last
from merge_engine.native.sparse import _workers

CHUNK = 1024
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "chunk_sums_bf16": ([_P, _P, _L, _P, _P, _I, _L, _I, _I, _L, _L], None),
    "mask_scale_bf16": ([_P, _P, _P, _F, _I, _L, _L], None),
    "count_nonfinite_bf16": ([_P, _L, _L], _L),
}
_LANES = {"AVX2": 8, "AVX512": 8}  # the lanes of torch's float sum kernel per CPU capability


def _lib() -> ctypes.CDLL | None:
    return native.declared(_SIGNATURES)


def usable(t: torch.Tensor) -> bool:
    """True for a contiguous bf16 CPU tensor of at least ``native.MIN_ENTRIES`` entries when the
    kernels are built and torch's sum order is known for this CPU."""
    return (t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
            and t.numel() >= native.MIN_ENTRIES
            and torch.backends.cpu.get_cpu_capability() in _LANES and _lib() is not None)


def _split(total: int, threads: int) -> list[tuple[int, int]]:
    bounds = [total * i // threads for i in range(threads + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run(call, total: int, per_thread_min: int) -> None:
    """``call(start, stop)`` over ``[0, total)`` split between torch's thread count of threads."""
    threads = max(1, min(torch.get_num_threads(), total // per_thread_min))
    cuts = _split(total, threads)
    futures = [_workers(len(cuts) - 1).submit(call, *c) for c in cuts[1:]] if len(cuts) > 1 else []
    call(*cuts[0])
    for f in futures:
        f.result()


def total(delta: torch.Tensor, mask: torch.Tensor | None = None, *, square: bool = False,
          var: torch.Tensor | None = None, top: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``_reduce.total(f(kept))`` (0-dim float32), the same bits, for a bf16 ``delta``.

    ``kept`` is ``delta * mask`` (``mask`` uint8/bool of delta's size, None: all kept), further
    masked, when ``var`` is given, by the top selection ``top = (lo, lo_cut)`` of ``var``'s
    magnitude bits (as ``native.sparse.sce_mix`` reads it); ``f`` is ``abs`` or, with ``square``,
    ``x.float() ** 2``.
    """
    lib = _lib()
    flat = delta.reshape(-1)
    n = flat.numel()
    chunks = -(-n // CHUNK)
    out = torch.empty(chunks, dtype=torch.float32)
    lanes = _LANES[torch.backends.cpu.get_cpu_capability()]
    m = mask.reshape(-1).view(torch.uint8) if mask is not None else None
    args = (out.data_ptr(), flat.data_ptr(), n, m.data_ptr() if m is not None else None,
            var.data_ptr() if var is not None else None, int(top[0]), int(top[1]), int(square), lanes)
    _run(lambda a, b: lib.chunk_sums_bf16(*args, a, b), chunks, native.MIN_ENTRIES // CHUNK)
    return sum_last(out) if chunks > 1 else out[0]


def mask_scale(delta: torch.Tensor, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """``(delta * mask) * scale`` in bf16 (``mask`` None: none; ``scale`` None: none; a float32
    value, as a 0-dim float32 tensor multiplies), the same bits, delta's shape."""
    lib = _lib()
    flat = delta.reshape(-1)
    out = native.empty(flat.shape, flat.dtype)
    m = mask.reshape(-1).view(torch.uint8) if mask is not None else None
    args = (out.data_ptr(), flat.data_ptr(), m.data_ptr() if m is not None else None,
            float(scale) if scale is not None else 1.0, int(scale is not None))
    _run(lambda a, b: lib.mask_scale_bf16(*args, a, b), flat.numel(), native.MIN_ENTRIES)
    return out.view(delta.shape)


def nonfinite(t: torch.Tensor) -> int | None:
    """How many entries of ``t`` are NaN or infinite, in one pass over its bf16 bits; None where
    the kernel does not apply (not a large contiguous bf16 CPU tensor)."""
    if not usable(t):
        return None
    lib = _lib()
    flat = t.reshape(-1)
    counts = [0]

    def part(a: int, b: int) -> None:
        counts.append(int(lib.count_nonfinite_bf16(flat.data_ptr(), a, b)))
    _run(part, flat.numel(), native.MIN_ENTRIES)
    return sum(counts)

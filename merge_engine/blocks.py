"""Run elementwise tensor work block by block over flattened inputs.

Whole-tensor elementwise chains stream every temporary through memory; on blocks of
``block_size(device)`` entries the temporaries stay in the CPU cache (a 4-model linear
merge ran 2.4x faster); on a GPU a block is a whole tensor (one kernel launch per op, not
thousands), sized by the device's free memory so that the temporaries fit. The result is the same
bits as one call on the whole tensors, as long as every output entry depends only on the inputs'
entries at the same position (tests/test_blocks_whole.py runs the whole-tensor path on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BLOCK = 1 << 18  # entries per block on a CPU (1 MiB of float32 temporaries)
GPU_BLOCK = 1 << 28  # other accelerators: one block per tensor up to 268M entries
CUDA_SHARE = 0.5  # of the free CUDA memory a block's temporaries may take


def block_size(device: torch.device | str, entry_bytes: int = 64) -> int:
    """Entries per block on ``device``: small on a CPU (temporaries stay in its caches); on a GPU
    each block is a kernel launch per op, so a block is as large as the free memory allows for
    temporaries of ``entry_bytes`` per entry (a whole realistic tensor: one block)."""
    device = torch.device(device)
    if device.type == "cpu":
        return BLOCK
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(BLOCK, int(free * CUDA_SHARE) // max(1, entry_bytes))
    return GPU_BLOCK


def _entry_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Temporaries per entry of a block: a few float32 copies of the stacked inputs."""
    return 4 * 4 * (len(tensors) + 1)


def blockwise(fn: Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor],
              tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(blocks of tensors, block of base)`` on consecutive blocks of the flattened inputs,
    written into one output with the shape of ``tensors[0]`` (dtype and device from ``fn``)."""
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    n, out = flats[0].numel(), None
    step = block_size(flats[0].device, _entry_bytes(flats))
    for start in range(0, max(n, 1), step):
        stop = min(start + step, n)
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
    step = block_size(device, _entry_bytes(flats) + scratch * torch.finfo(scratch_dtype).bits // 8)
    buffers = [torch.empty(min(n, step), dtype=scratch_dtype, device=device) for _ in range(scratch)]
    for start in range(0, n, step):
        stop = min(start + step, n)
        kernel([f[start:stop] for f in flats], out[start:stop], [b[: stop - start] for b in buffers])
    return out.reshape(tensors[0].shape)

"""Where merge work runs: resolving a device name once, and the per-device-type settings.

- :func:`pick_device` turns ``auto``/``cpu``/``cuda``/``cuda:N`` into a concrete ``torch.device``
  (``auto`` never reaches ``.to()``); every command resolves its ``--device`` through it once.
- The block size of elementwise work per device type lives with the blocks
  (:func:`merge_engine.blocks.block_size`).
- :func:`source_home`: where the in-memory merger keeps the source tensors it caches across
  candidates: on the GPU when they fit in a share of its free memory (no host-to-device copy
  per candidate), else in pinned host memory (asynchronous copies), and on a CPU where they are.

Merged bits are the same for any block size and any source home (elementwise work, same
kernels); they are identical per device type, not across types: CUDA reductions may add in
another order than the CPU's.
"""

from __future__ import annotations

from typing import Literal

import torch

from merge_engine.errors import MergeError

#: Share of a GPU's free memory the cached source tensors may take before they go to pinned RAM.
SOURCE_CACHE_SHARE = 0.5

SourceHome = Literal["cpu", "device", "pinned"]


class DeviceError(MergeError):
    """A device was asked for that this machine does not have."""


def pick_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None -> ``cuda:0`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:0``;
    ``cpu``/``cuda:N`` as given. Raises :class:`DeviceError` (one line naming the fix) for CUDA
    without CUDA, an index past the last GPU, or a name torch does not know."""
    if name is None or name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {name} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name} was requested but CUDA is not available; "
                          "use --device cpu (or auto), or install a CUDA build of torch")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise DeviceError(f"device {name} was requested but this machine has {count} GPU(s) "
                          f"(cuda:0 to cuda:{count - 1}); pick one of those")
    return torch.device("cuda", index)


def source_home(device: torch.device | str, needed_bytes: int, free_bytes: int | None,
                on_device: bool | None = None) -> SourceHome:
    """Where cached source tensors live for a merge on ``device``.

    ``on_device`` True/False forces the GPU or pinned host memory; None decides: on the GPU
    when ``needed_bytes`` (all sources of the recipe) fit in ``SOURCE_CACHE_SHARE`` of
    ``free_bytes``. A CPU merge always keeps them where they are (``"cpu"``).
    """
    if torch.device(device).type == "cpu":
        return "cpu"
    if on_device is None:
        on_device = free_bytes is not None and needed_bytes <= SOURCE_CACHE_SHARE * free_bytes
    return "device" if on_device else "pinned"


def free_memory(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA ``device`` (None on a CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def stage(tensor: torch.Tensor, device: torch.device | str, home: SourceHome) -> torch.Tensor:
    """Put a source tensor read on the CPU into its ``home`` for a merge on ``device``."""
    if home == "device":
        return tensor.to(device, non_blocking=True)
    if home == "pinned":
        return tensor.pin_memory()
    return tensor

"""In-place merges into a model that accelerate has partly offloaded.

A model loaded with a ``device_map`` that does not fit the GPUs (``device_map: auto`` with
``max_memory``, or explicit ``cpu``/``disk`` entries) keeps its offloaded parameters on the
``meta`` device: accelerate's hook on each offloaded module copies the values from its store
onto the execution device before every forward and drops them after. Writing a merged tensor
into the parameter itself would therefore never reach the forward pass. What the store is
decides what an in-place merge can do:

- CPU offload (a GPU run with ``cpu`` in the device map, or ``accelerate.cpu_offload``): the store
  holds one CPU tensor per parameter, read by every forward. Writing the merged values into that
  tensor is exactly what the next forward sees: :func:`writable_targets` returns it.
- Disk offload (``disk`` in the device map): the store reads each value from a file at every
  forward, and that file is the source checkpoint itself (or an offload folder). It is never
  written: :func:`writable_targets` refuses the model in one line naming the fix.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import EvomergeError

DISK_OFFLOAD_FIX = ("give the model more memory (the eval config's max_memory, e.g. "
                    "{0: 70GiB, cpu: 200GiB}: parameters past the GPUs then stay in CPU memory, "
                    "which in-place merges write), score a quantized copy (load_in: 8bit), or use "
                    "backend: vllm with tensor_parallel_size")


class OffloadError(EvomergeError):
    """The resident model is offloaded where an in-place merge cannot write."""


def offloaded(model: Any) -> bool:
    """True when some parameter of ``model`` lives only in an accelerate hook's store."""
    return any(p.device.type == "meta" for p in model.parameters())


def execution_device(model: Any) -> Any:
    """The device ``model``'s forward runs on (inputs go there): its first parameter's device,
    or, when that parameter is offloaded (on ``meta``), the execution device of the first
    offloading hook (its store is copied there before each forward)."""
    import torch

    first = next(model.parameters()).device
    if first.type != "meta":
        return first
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for one in getattr(hook, "hooks", (hook,)) if hook is not None else ():
            if getattr(one, "execution_device", None) is not None:
                return torch.device(one.execution_device)
    return first


def writable_targets(model: Any) -> dict[str, Any]:
    """The tensor an in-place merge writes for each name of ``model.state_dict()``: the
    parameter itself, or, for a CPU-offloaded one, the store tensor its hook copies from before
    each forward (see the module docstring). Raises :class:`OffloadError` (one line naming the
    fix) for a disk-offloaded parameter, or a ``meta`` one without a store."""
    targets = dict(model.state_dict(keep_vars=True))
    for name, tensor in targets.items():
        if tensor.device.type == "meta":
            targets[name] = _store_tensor(model, name)
    return targets


def _store_tensor(model: Any, name: str) -> Any:
    """The persistent store tensor of the offloaded tensor ``name``; refuses a file-backed one."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the deepest hooked module holding ``name``
        module = model.get_submodule(".".join(parts[:cut]))
        store = _offload_store(getattr(module, "_hf_hook", None))
        if store is None:
            continue
        key = ".".join(parts[cut:])
        try:
            first = store[key]
        except KeyError:
            continue
        # a tensor kept in memory comes back as the same object; a file-backed store reads a
        # new tensor at each access, so writing into the one returned would be lost
        if store[key].data_ptr() != first.data_ptr():
            raise OffloadError(f"{name} is offloaded to disk, where an in-place merge cannot "
                               f"write (each forward reads it from the checkpoint file); {DISK_OFFLOAD_FIX}")
        return first
    raise OffloadError(f"{name} is on the meta device with no offload store to write into; "
                       "load the model with its weights (no init_empty_weights/meta device_map)")


def _offload_store(hook: Any) -> Any:
    """The ``weights_map`` of an offloading accelerate hook (inside a SequentialHook too)."""
    if hook is None:
        return None
    for one in getattr(hook, "hooks", (hook,)):
        if getattr(one, "offload", False) and getattr(one, "weights_map", None) is not None:
            return one.weights_map
    return None

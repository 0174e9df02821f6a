"""Device placement for evomerge: one resolution of ``--device``, and one memory plan per backend.

Every command resolves its ``--device`` once, at argument parsing (:func:`device_arg`, through
:func:`merge_engine.devices.pick_device`): ``auto`` becomes ``cuda:0`` or ``cpu`` before any
model is loaded, and ``cuda`` on a machine without one is a one-line error.

Memory plans (:func:`placement`), for a run on ``device``:

- ``hf``: the resident model lives on ``device`` (``device_map: auto``: spread over every visible
  GPU by accelerate; past ``max_memory`` the rest is offloaded to CPU memory and merged in place
  through accelerate's store, :mod:`evomerge.offload`; a spill to disk is refused); merging runs
  on ``device`` and writes into its parameters in place; the evaluator scores that very model.
  One copy of the weights on the GPU(s), plus the cached sources when they fit (``merge_engine.devices.source_home``).
- ``hf`` with ``load_in: 8bit|4bit``: the resident model stays at full precision on the CPU and
  is merged there; each ``evaluate`` saves it to a scratch folder (tmpfs when there is one) and
  loads a quantized copy onto ``device`` with bitsandbytes, dropped after scoring.
- ``vllm``: the resident model stays on the CPU and is merged there; the engine holds the only
  GPU copy, and merged weights are pushed into it (``reload_weights``). The engine reserves
  ``gpu_memory_utilization`` of its GPU(s) (vLLM's default when unset).
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.evaluate.tasks.config import EvalConfig


def resolve_device(name: str | None) -> str:
    """``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as a concrete device string
    (``cpu``/``cuda:N``); raises ``merge_engine.devices.DeviceError`` naming the fix."""
    from merge_engine.devices import pick_device

    return str(pick_device(name))


def device_arg(text: str) -> str:
    """argparse ``type=`` of every ``--device`` option: resolves the name once, at parsing."""
    from merge_engine.devices import DeviceError

    try:
        return resolve_device(text)
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


DEVICE_HELP = "auto (default: cuda:0 if CUDA is present, else cpu), cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Placement:
    """Where the resident model is loaded, where merge kernels run, and the model's
    ``device_map`` (None: the whole model on ``model_device``)."""

    model_device: str
    merge_device: str
    device_map: str | None = None


def placement(cfg: EvalConfig | None, device: str) -> Placement:
    """The memory plan of the module docstring for an eval config (None: the hf plan)."""
    if cfg is not None and (cfg.backend == "vllm" or cfg.load_in is not None):
        return Placement("cpu", "cpu")
    if cfg is not None and cfg.device_map == "auto":
        return Placement(device, device, "auto")
    return Placement(device, device)


def hf_load_kwargs(cfg: EvalConfig, device: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments of the model the hf backend scores on ``device``:
    ``device_map`` (with ``max_memory``) and the bitsandbytes ``quantization_config``. Raises ``EvalConfigError`` (one
    line naming the fix) for a setting this device cannot run. Imports bitsandbytes' config
    only when quantizing."""
    from evomerge.evaluate.tasks.config import EvalConfigError

    on_cpu = device == "cpu"
    if cfg.load_in is not None:
        if on_cpu:
            raise EvalConfigError(f"load_in: {cfg.load_in} needs a CUDA device (bitsandbytes "
                                  "quantizes on the GPU); run with --device cuda or remove load_in")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise EvalConfigError(f"load_in: {cfg.load_in} needs bitsandbytes: pip install "
                                  "bitsandbytes (or remove load_in to score at full precision)")
        import torch
        from transformers import BitsAndBytesConfig

        if cfg.load_in == "8bit":
            quant = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
        return {"quantization_config": quant, "device_map": {"": device}}
    if cfg.device_map == "auto":
        if on_cpu:
            raise EvalConfigError("device_map: auto spreads a model over GPUs but this run is on "
                                  "the cpu; run with --device cuda or remove device_map")
        return {"device_map": "auto", **({"max_memory": dict(cfg.max_memory)} if cfg.max_memory else {})}
    return {}

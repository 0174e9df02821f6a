"""Seeded, order- and device-independent random draws for sparsifying methods.

Every draw for a tensor comes from a CPU generator seeded by a hash of
(recipe seed, tensor name, model index), so the same recipe yields the same
masks on any device, in any execution order, in memory or on disk. Large draws are made by the
native kernels (``merge_engine.native.draws``: the same generator and conversion as torch's CPU
``torch.rand``, the same bits, tested) when they are built; torch makes the rest.
"""

from __future__ import annotations

import hashlib

import torch

from merge_engine.native import draws as native_draws

NATIVE_MIN = 1 << 12  # below this the ctypes call costs more than torch's draw


def derive_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A 63-bit seed that depends only on its three arguments."""
    key = f"{int(seed)}\x00{tensor_name}\x00{int(model_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class TensorRandom:
    """Random draws for one output tensor; ``model_index`` picks the stream.

    ``drawn`` holds results the engine made ahead of time with this very class, keyed by
    ``(model_index, None)`` for :meth:`uniform` and ``(model_index, p)`` for :meth:`keep_mask`;
    each is handed out once when its shape matches, else the draw is made on the spot.
    """

    def __init__(self, seed: int, tensor_name: str,
                 drawn: dict[tuple[int, float | None], torch.Tensor] | None = None) -> None:
        self.seed = int(seed)
        self.tensor_name = tensor_name
        self._drawn = dict(drawn or {})

    def generator(self, model_index: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed_for(model_index))
        return g

    def seed_for(self, model_index: int) -> int:
        """The seed of ``model_index``'s stream (what :meth:`generator` is seeded with)."""
        return derive_seed(self.seed, self.tensor_name, model_index)

    def _ready(self, key: tuple[int, float | None], shape, device) -> torch.Tensor | None:
        ready = self._drawn.pop(key, None)
        if ready is not None and tuple(ready.shape) == tuple(shape):
            return ready.to(device)
        return None

    def uniform(self, shape: torch.Size | tuple[int, ...], model_index: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """U[0, 1) float32 of ``shape`` drawn on the CPU, then moved to ``device``."""
        ready = self._ready((model_index, None), shape, device)
        if ready is not None:
            return ready
        shape = tuple(shape)
        if _native(shape):
            u = native_draws.uniform(shape, derive_seed(self.seed, self.tensor_name, model_index))
        else:
            u = torch.rand(shape, generator=self.generator(model_index), dtype=torch.float32)
        return u.to(device)

    def bernoulli(self, keep: torch.Tensor | float, shape: torch.Size | tuple[int, ...],
                  model_index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean keep-mask: True with probability ``keep`` (scalar or broadcastable tensor)."""
        u = self.uniform(shape, model_index, device)
        if isinstance(keep, torch.Tensor):
            keep = keep.to(device=u.device, dtype=torch.float32)
        return u < keep

    def keep_mask(self, keep: float, shape: torch.Size | tuple[int, ...], model_index: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """:meth:`bernoulli` for a scalar ``keep``, as uint8 0/1: ``x * mask`` gives the same
        bits as ``x * bool_mask`` without a per-entry cast of booleans (about 40% faster)."""
        ready = self._ready((model_index, float(keep)), shape, device)
        if ready is not None:
            return ready
        if _native(tuple(shape)):
            seed = derive_seed(self.seed, self.tensor_name, model_index)
            return native_draws.keep_mask(tuple(shape), seed, float(keep)).to(device)
        return self.bernoulli(float(keep), shape, model_index, device).view(torch.uint8)


def _native(shape: tuple[int, ...]) -> bool:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel >= NATIVE_MIN and native_draws.usable()

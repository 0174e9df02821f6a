"""Seeded, order- and device-independent random draws for sparsifying methods.

Every draw for a tensor comes from a CPU generator seeded by a hash of
(recipe seed, tensor name, model index), so the same recipe yields the same
masks on any device, in any execution order, in memory or on disk.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A 63-bit seed that depends only on its three arguments."""
    key = f"{int(seed)}\x00{tensor_name}\x00{int(model_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class TensorRandom:
    """Random draws for one output tensor; ``model_index`` picks the stream."""

    def __init__(self, seed: int, tensor_name: str) -> None:
        self.seed = int(seed)
        self.tensor_name = tensor_name

    def generator(self, model_index: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.seed, self.tensor_name, model_index))
        return g

    def uniform(self, shape: torch.Size | tuple[int, ...], model_index: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """U[0, 1) float32 of ``shape`` drawn on the CPU, then moved to ``device``."""
        u = torch.rand(tuple(shape), generator=self.generator(model_index), dtype=torch.float32)
        return u.to(device)

    def bernoulli(self, keep: torch.Tensor | float, shape: torch.Size | tuple[int, ...],
                  model_index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean keep-mask: True with probability ``keep`` (scalar or broadcastable tensor)."""
        u = self.uniform(shape, model_index, device)
        if isinstance(keep, torch.Tensor):
            keep = keep.to(device=u.device, dtype=torch.float32)
        return u < keep

"""Stream tensors straight into pre-laid-out safetensors shards: memory bounded by a few tensors.

When the names, shapes and dtypes of every output tensor are known before the
first one is computed (the planner knows them), each shard's header can be
written up front and every tensor's bytes written at its own offset the moment
it arrives, in any order. Nothing waits in memory for a shard to fill up.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_engine.errors import MergeError
from merge_engine.io.st_header import SAFETENSORS_DTYPES

_CODE_OF = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute file offset of the tensor's first byte
    entry: PlannedTensor


def layout_shards(entries: Sequence[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``shard_size`` bytes (a larger tensor alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class ShardStream:
    """Files laid out for ``entries``; :meth:`write` puts one tensor's bytes in place.

    Lifecycle: construct (creates and sizes every shard file, writes headers) →
    :meth:`write` each planned tensor exactly once, from one thread → :meth:`close`
    (checks every tensor arrived) → :meth:`index` for the sharded index JSON.
    """

    def __init__(self, directory: Path, entries: Sequence[PlannedTensor], shard_size: int) -> None:
        self.directory = directory
        groups = layout_shards(entries, shard_size)
        self.names = shard_names(len(groups))
        self.slots: dict[str, _Slot] = {}
        self.fds: list[int] = []
        self.total = 0
        for i, (group, fname) in enumerate(zip(groups, self.names)):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            pos = 0
            for e in group:
                if e.dtype not in _CODE_OF:
                    raise MergeError(f"cannot write tensor {e.name} of dtype {e.dtype}; choose another out_dtype")
                header[e.name] = {"dtype": _CODE_OF[e.dtype], "shape": list(e.shape),
                                  "data_offsets": [pos, pos + e.nbytes]}
                pos += e.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            fd = os.open(directory / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + pos)
            pos = 0
            for e in group:
                self.slots[e.name] = _Slot(i, start + pos, e)
                pos += e.nbytes
            self.total += pos
        self.pending = set(self.slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None or name not in self.pending:
            raise MergeError(f"tensor {name} was not planned for this output or was written twice")
        e = slot.entry
        if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
            raise MergeError(f"tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                             f"{e.shape} {e.dtype}; this is a bug in the planner")
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.fds[slot.shard], view[done:], slot.offset + done)
        self.pending.discard(name)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.pending:
            raise MergeError(f"{len(self.pending)} planned tensors were never written "
                             f"(e.g. {sorted(self.pending)[0]}); the merge did not finish")

    def index(self) -> dict[str, object] | None:
        if len(self.names) == 1:
            return None
        weight_map = {name: self.names[s.shard] for name, s in sorted(self.slots.items())}
        return {"metadata": {"total_size": self.total}, "weight_map": weight_map}

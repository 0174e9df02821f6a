"""Lazy, memory-mapped access to one model checkpoint, validated before any tensor is read."""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.st_header import read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Pickle files that are never weights.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


@dataclass(frozen=True)
class _Slot:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int = -1  # absolute file offset of a safetensors tensor's bytes


# Linux 5.14+: map every page of a file range now, without copying it (the number is Linux's own)
_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None


def _pread_tensor(fd: int, slot: _Slot) -> torch.Tensor:
    """Read one tensor's bytes into a fresh buffer the caller owns (no shared mmap pages)."""
    buf = torch.empty(slot.nbytes, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    while done < slot.nbytes:
        got = os.preadv(fd, [view[done:]], slot.offset + done)
        if got <= 0:
            raise CheckpointError(f"{slot.file} ended early while reading; re-download the checkpoint")
        done += got
    return buf.view(slot.dtype).reshape(slot.shape)


def _populate(mapped: mmap.mmap) -> bool:
    """Map every page of ``mapped`` now (MADV_POPULATE_READ); False where the kernel cannot."""
    if _MADV_POPULATE_READ is None:
        return False
    try:
        mapped.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError):
        return False
    return True


def _map_tensor(fd: int, slot: _Slot) -> torch.Tensor:
    """One tensor as a private copy-on-write mapping of its file range.

    No bytes are copied: the pages are the page cache's own until somebody writes to them, and
    then only that page is copied (so in-place changes never reach the file or later reads). The
    pages are mapped up front (MADV_POPULATE_READ; on older kernels, one read per page), so the
    thread that calls this pays for the mapping and any disk reads, not the thread that computes.
    The mapping is released when the last tensor viewing it is freed.
    """
    start = slot.offset - slot.offset % mmap.ALLOCATIONGRANULARITY
    length = slot.offset + slot.nbytes - start
    mapped = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=start)
    if not _populate(mapped):
        pages = torch.frombuffer(mapped, dtype=torch.uint8)[::mmap.PAGESIZE]
        int(pages.sum())  # touch one byte per page
    flat = torch.frombuffer(mapped, dtype=torch.uint8, offset=slot.offset - start, count=slot.nbytes)
    return flat.view(slot.dtype).reshape(slot.shape)


_CAN_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap.mmap, "madvise")


class CheckpointReader:
    """Read one model's tensors one at a time, from ``model_dir``.

    Layouts: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``; pickle
    checkpoints (``pytorch_model.bin[.index.json]``, ``*.bin``, ``*.pt``) only with
    ``allow_pickle`` (loaded memory-mapped with ``weights_only=True``). Construction validates
    everything that can be checked without reading tensor data (config.json present and not
    requiring remote code unless ``trust_remote_code``, index entries inside the directory and
    naming existing shards and tensors, safetensors headers consistent with file sizes) and raises
    ``CheckpointError`` with a fix otherwise. Shapes, dtypes and sizes come from headers; ``get``
    reads one tensor. ``name`` is how messages name the model (default: the directory).
    Use as a context manager or call ``close()``; ``get`` may be called from several threads.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        name: str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.name = name or str(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory {self.model_dir} does not exist; check the path")
        self._config = read_config(self.model_dir, self.name, trust_remote_code)
        self._slots: dict[str, _Slot] = {}
        self._handles: dict[Path, int] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._find_weights(allow_pickle)
        self._names = tuple(sorted(self._slots))

    # -- metadata (no tensor data read) -------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The parsed config.json (a copy: callers may modify it)."""
        return json.loads(json.dumps(self._config))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every tensor name, sorted."""
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def shape(self, name: str) -> tuple[int, ...]:
        return self._slot(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._slot(name).dtype

    def nbytes(self, name: str) -> int:
        return self._slot(name).nbytes

    # -- data ---------------------------------------------------------------------------------

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read tensor ``name``, moved to ``device`` and cast to ``dtype`` (if given).

        The result belongs to the caller: modifying it in place never affects later reads.
        """
        slot = self._slot(name)
        if self._closed:
            raise CheckpointError(f"reader for model {self.name} is closed; open a new CheckpointReader")
        if slot.offset >= 0:
            fd = self._fd(slot.file)
            tensor = None
            # mapped only when the bytes are aligned for the dtype (every well-formed file)
            if _CAN_MAP and slot.offset % slot.dtype.itemsize == 0 and slot.nbytes:
                try:
                    tensor = _map_tensor(fd, slot)
                except OSError:  # e.g. out of mappings (vm.max_map_count) with many tensors kept
                    pass
            if tensor is None:
                tensor = _pread_tensor(fd, slot)
            return tensor.to(device=device, dtype=dtype)
        raw = self._pickled[name]
        out = raw.to(device=device, dtype=dtype)
        # mmap'd pickles hand out views of shared storage: copy if `to` did not.
        return out.clone() if out.data_ptr() == raw.data_ptr() else out

    def close(self) -> None:
        """Release file handles and mappings. Safe to call twice."""
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()
            self._pickled.clear()
            self._closed = True

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.name!r}, {len(self._names)} tensors)"

    # -- internals ----------------------------------------------------------------------------

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise CheckpointError(
                f"model {self.name} has no tensor {name!r}; check the name (see CheckpointReader.tensor_names)"
            ) from None

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._handles:
                self._handles[path] = os.open(path, os.O_RDONLY)
            return self._handles[path]

    def _find_weights(self, allow_pickle: bool) -> None:
        d = self.model_dir
        if (d / SAFE_INDEX).is_file():
            for shard, names in self._read_index(d / SAFE_INDEX).items():
                self._add_safetensors(shard, names)
        elif (d / SAFE_SINGLE).is_file():
            self._add_safetensors(d / SAFE_SINGLE, None)
        else:
            pickles = _pickle_files(d)
            if not pickles:
                raise CheckpointError(
                    f"model {self.name} has no weights (no {SAFE_SINGLE} or {SAFE_INDEX}); "
                    "check the directory or re-download the model"
                )
            if not allow_pickle:
                raise CheckpointError(
                    f"model {self.name} has only pickle weights ({pickles[0].name}), which can run code when "
                    "loaded; convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust them"
                )
            if (d / PICKLE_INDEX).is_file():
                groups = self._read_index(d / PICKLE_INDEX)
            else:
                groups = {p: None for p in pickles}
            for shard, names in groups.items():
                self._add_pickle(shard, names)

    def _read_index(self, index: Path) -> dict[Path, list[str]]:
        """Validate a shard index; return {shard path: tensor names in it}."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"{index} is not a valid shard index (needs a 'weight_map' object); re-download the model"
            ) from None
        groups: dict[Path, list[str]] = {}
        for tensor, fname in weight_map.items():
            groups.setdefault(self._shard_path(index, tensor, fname), []).append(tensor)
        missing = sorted(p.name for p in groups if not p.is_file())
        if missing:
            raise CheckpointError(
                f"model {self.name}: {index.name} names shard files that do not exist "
                f"({', '.join(missing[:3])}); re-download the model"
            )
        return groups

    def _shard_path(self, index: Path, tensor: str, fname: object) -> Path:
        # Lexical check: hub-cache shards are symlinks into ../../blobs, so resolving would misfire.
        bad = not isinstance(fname, str) or not fname
        if not bad:
            rel = PurePosixPath(fname.replace("\\", "/"))
            bad = rel.is_absolute() or PureWindowsPath(fname).drive != "" or ".." in rel.parts
        if bad:
            raise CheckpointError(
                f"model {self.name}: {index.name} maps tensor {tensor} to {fname!r}, outside the model directory; "
                "shard entries must be plain file names inside it: fix or re-download the index"
            )
        return self.model_dir / rel

    def _add_safetensors(self, path: Path, names: list[str] | None) -> None:
        header = read_header(path)
        with path.open("rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
        if names is None:
            names = list(header)
        for tensor in names:
            info = header.get(tensor)
            if info is None:
                raise CheckpointError(
                    f"model {self.name}: tensor {tensor} is listed in the shard index but missing from "
                    f"{path.name}; re-download the model"
                )
            self._slots[tensor] = _Slot(path, info.shape, info.dtype, info.nbytes, data_start + info.begin)

    def _add_pickle(self, path: Path, names: list[str] | None) -> None:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise CheckpointError(
                f"cannot load pickle checkpoint {path} ({type(exc).__name__}); convert it to safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{path} is not a flat state dict of tensors; save model.state_dict() as safetensors instead"
            )
        for tensor in names if names is not None else list(state):
            if tensor not in state:
                raise CheckpointError(
                    f"model {self.name}: tensor {tensor} is listed in the shard index but missing from "
                    f"{path.name}; re-download the model"
                )
            if names is None and tensor in self._slots:
                raise CheckpointError(
                    f"model {self.name}: tensor {tensor} appears in several pickle files; "
                    "keep one checkpoint per directory"
                )
            value = state[tensor]
            self._pickled[tensor] = value
            self._slots[tensor] = _Slot(path, tuple(value.shape), value.dtype, value.nbytes)


def read_config(model_dir: Path, name: str, trust_remote_code: bool) -> dict[str, Any]:
    """Parsed ``config.json`` of ``model_dir``; CheckpointError if missing, malformed or needing
    custom code without ``trust_remote_code``."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"model {name} has no config.json; point at a full model directory (config.json + weights)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path} is not valid JSON; re-download the model") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download the model")
    if "auto_map" in config and not trust_remote_code:
        raise CheckpointError(
            f"model {name} needs custom code (config.json has auto_map); "
            "pass trust_remote_code=True (--trust-remote-code) only if you trust its author"
        )
    return config


def _pickle_files(model_dir: Path) -> list[Path]:
    files = [p for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth") and p.is_file()]
    return sorted(p for p in files if p.name not in _NOT_WEIGHTS)

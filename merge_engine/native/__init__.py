"""Optional native kernels, compiled on first use with the system C compiler and cached.

The torch code paths stay the reference: a kernel is used only where it gives the same bits
(the tests compare both), only on the CPU, and only when a C compiler is there. Nothing fails
without one: ``weighted_sum_bf16`` then returns None and the caller falls back to torch.

The shared library lives in ``$EVOMERGE_CACHE`` (default ``~/.cache/evomerge``)/``native/``, named
by a hash of the source, compiler and flags, and is built once (about 0.3 s) into a temporary
file that is renamed into place, so concurrent workers never load a half-written library.
``EVOMERGE_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from merge_engine.errors import MergeError
from merge_engine.sizes import parse_bytes

_SOURCES = tuple(Path(__file__).with_name(name)
                 for name in ("weighted_sum.c", "sparse_mix.c", "sce_mix.c", "draws_ranks.c", "l1_sums.c"))
_HEADER = Path(__file__).with_name("bf16.h")  # bf16 conversions, included by every kernel
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_declared: set[tuple[int, int]] = set()  # (library, signature table) pairs already declared
MIN_ENTRIES = 1 << 16  # below this the torch path is as fast and saves the thread start


def _cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "native"


def _build() -> ctypes.CDLL | None:
    if os.environ.get("EVOMERGE_NATIVE") == "0" or not sys.platform.startswith(("linux", "darwin")):
        return None
    # torch's float32 multiply-add is fused on AVX2/AVX512 builds: the kernel (always fused) must match
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    source = b"".join(path.read_bytes() for path in (*_SOURCES, _HEADER))
    # no contraction of a*b+c: the sparse kernels round every step as the torch path does
    for flags in (["-O3", "-march=native", "-ffp-contract=off"], ["-O3", "-ffp-contract=off"]):
        key = hashlib.sha256(source + cc.encode() + " ".join(flags).encode()).hexdigest()[:16]
        target = _cache_dir() / f"weighted_sum-{key}.so"
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
                os.close(fd)
                done = subprocess.run([cc, *flags, "-fPIC", "-shared", "-o", tmp, *map(str, _SOURCES), "-lm"],
                                      capture_output=True, timeout=120)
                if done.returncode != 0:
                    os.unlink(tmp)
                    continue
                os.replace(tmp, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError):
            continue
        fn = lib.weighted_sum_bf16
        fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float),
                       ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int]
        fn.restype = None
        return lib
    return None


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def declared(signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL | None:
    """The kernel library with ``signatures`` (function name -> (argtypes, restype)) declared on it,
    once per library and table; None where the kernels are not available."""
    lib = _library()
    if lib is not None and (id(lib), id(signatures)) not in _declared:
        for name, (args, res) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _declared.add((id(lib), id(signatures)))
    return lib


_POOLED = 1 << 22  # smaller buffers come from malloc's heap, already reused
# the most the scratch pool keeps between uses (least recently given back leaves first); None:
# EVOMERGE_SCRATCH (a size: 512M, 2GiB; 0 keeps nothing), read at the first use, else 1 GiB
SCRATCH_BYTES: int | None = None
_scratch: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # nbytes -> free uint8 buffers
_scratch_bytes = 0
_scratch_lock = threading.Lock()


def empty(shape: tuple[int, ...] | torch.Size | int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor: a buffer of the same byte size given back with
    :func:`recycle` when there is one, else ``torch.empty``.

    The kernels write fresh outputs and scratch deltas of hundreds of MB per tensor, and the OS
    zeroes every fresh page on its first touch (a fault per 4 KiB page): system time of the order
    of the kernels' own work on the 1B benchmark. A recycled buffer costs neither. (Asking for
    transparent huge pages instead, MADV_HUGEPAGE, made merges slower there: with the page cache
    full of checkpoints the faults stall in compaction.) The bits never depend on the buffer.
    """
    numel = shape if isinstance(shape, int) else math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes >= _POOLED:
        with _scratch_lock:
            free = _scratch.get(nbytes)
            buf = free.pop() if free else None
            if buf is not None:
                global _scratch_bytes
                _scratch_bytes -= nbytes
                if not free:
                    del _scratch[nbytes]
        if buf is not None:
            return buf.view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype)


def scratch_cap() -> int:
    """:data:`SCRATCH_BYTES`, from ``EVOMERGE_SCRATCH`` the first time (a bad value is a MergeError)."""
    global SCRATCH_BYTES
    if SCRATCH_BYTES is None:
        try:
            SCRATCH_BYTES = parse_bytes(os.environ.get("EVOMERGE_SCRATCH", 1 << 30))
        except ValueError as exc:
            raise MergeError(f"EVOMERGE_SCRATCH: {exc}") from None
    return SCRATCH_BYTES


def recycle(*tensors: torch.Tensor | None) -> None:
    """Give dead CPU tensors' buffers to :func:`empty` for reuse. The caller guarantees that
    nothing reads or writes them afterwards (no other tensor shares their storage); a tensor
    that is not a whole contiguous buffer of at least 4 MiB is left to torch."""
    global _scratch_bytes
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0:
            continue
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes < _POOLED or nbytes > scratch_cap() or t.numel() * t.element_size() != nbytes:
            continue
        buf = torch.empty(0, dtype=torch.uint8).set_(storage)
        with _scratch_lock:
            if any(b.data_ptr() == buf.data_ptr() for b in _scratch.get(nbytes, ())):
                continue  # given back twice
            _scratch.setdefault(nbytes, []).append(buf)
            _scratch.move_to_end(nbytes)
            _scratch_bytes += nbytes
            while _scratch_bytes > scratch_cap():
                size, free = next(iter(_scratch.items()))
                free.pop(0)
                _scratch_bytes -= size
                if not free:
                    del _scratch[size]


def available() -> bool:
    """True when the native kernels are built (or could be built now) and enabled."""
    return _library() is not None


def weighted_sum_bf16(tensors: list[torch.Tensor], weights: list[float],
                      divisor: float | None) -> torch.Tensor | None:
    """``sum(w_i * x_i) [/ divisor]`` of contiguous bfloat16 CPU tensors of one shape, in bf16,
    on ``torch.get_num_threads()`` threads; None when the kernel cannot be used (use torch)."""
    first = tensors[0]
    if first.numel() < MIN_ENTRIES or any(
            t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous()
            or t.shape != first.shape for t in tensors):
        return None
    lib = _library()
    if lib is None:
        return None
    n = first.numel()
    out = empty(first.shape, torch.bfloat16)
    ins = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    w = (ctypes.c_float * len(weights))(*[float(x) for x in weights])
    args = (out.data_ptr(), ins, w, len(tensors))
    tail = (float(divisor) if divisor is not None else 1.0, int(divisor is not None))
    threads = max(1, min(torch.get_num_threads(), n // MIN_ENTRIES))
    cuts = [n * i // threads for i in range(threads + 1)]
    # ctypes releases the GIL for the call, so the slices run in parallel
    workers = [threading.Thread(target=lib.weighted_sum_bf16, args=(*args, cuts[i], cuts[i + 1], *tail))
               for i in range(1, threads)]
    for t in workers:
        t.start()
    lib.weighted_sum_bf16(*args, cuts[0], cuts[1], *tail)
    for t in workers:
        t.join()
    return out

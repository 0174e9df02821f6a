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
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

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
    out = torch.empty(first.shape, dtype=torch.bfloat16)
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

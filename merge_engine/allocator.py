"""Keep freed tensor memory in the process for reuse (glibc malloc only).

A merge allocates and frees tensors of the same few sizes thousands of times. glibc serves every
allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap`` on free, so each new tensor pays a page fault per 4 KiB page: on a 1B-parameter linear
merge that was about half of the compute time (measured: `benchmarks/merge_speed.py`). Telling
malloc to take large blocks from its heap and not to give freed memory back makes later tensors
of the same size reuse those pages. The process keeps its peak heap until it exits, which is what
a merge or a search wants. PyTorch's CPU tuning guide gets the same effect with jemalloc/tcmalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Switch glibc malloc to heap-only, no-trim mode. True if applied; a no-op elsewhere.

    Set ``EVOMERGE_SYSTEM_MALLOC=1`` to leave malloc alone.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("EVOMERGE_SYSTEM_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; the trim threshold is an int, so use its largest value.
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done

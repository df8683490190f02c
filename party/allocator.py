"""How an agent's process keeps memory between calls.

Each call runs the model in a gRPC worker thread, and glibc gives each thread its own malloc
arena, whose freed top it returns to the system at once (beyond 128 KiB by default): the next
call page-faults its activations in again. On the demo CNN at batch 256 that cost a remote
call about 2 ms of its 7 (``benchmarks/protocol.py``). Keeping freed memory for the next call
removes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: blocks above it are mapped on their own


def keep_freed_memory(megabytes: int) -> bool:
    """Keep up to ``megabytes`` of freed heap in the process for later allocations, and serve
    blocks up to 32 MiB from the heap rather than from fresh mappings (glibc's ``mallopt``).
    Returns whether the setting took: False for ``megabytes <= 0`` or a C library other than
    glibc (musl, macOS), which keep their own defaults."""
    if megabytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, megabytes << 20)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    )

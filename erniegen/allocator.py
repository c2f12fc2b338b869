"""Keep the memory of freed tensors in the process instead of handing it back to the kernel.

Why: PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its mmap
threshold (128 KiB, rising adaptively to at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` on free, so the next training step's activations and gradients, the same sizes again, fault
every page in anew and the kernel zero-fills each one. A fine-tuning run of all-MiniLM-L6-v2 at batch 32 took
~125,000 page faults a second and spent 12% of its CPU time in the kernel (BENCHMARKS.md section 2, "Freed
memory kept"). :func:`keep_freed_memory` tells glibc to serve large blocks from its heap and never to trim
it, so freed blocks are reused: the process keeps its peak memory instead of returning it between steps.

The ``erniegen`` command line and ``make demo`` call it first; a program using the Python API may call it
too. Elsewhere than on glibc (musl, macOS, Windows, or another ``malloc`` preloaded) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest, ~2 GiB of free heap top kept


def keep_freed_memory() -> bool:
    """Serve large allocations from glibc's heap and keep freed memory in it; whether glibc took the settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc's own: musl has a mallopt that does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM) == 1

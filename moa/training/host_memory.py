"""Keep freed host memory in the process, so that a CPU step reuses mapped pages.

glibc's malloc serves large blocks (32 MiB and up, and smaller ones by its dynamic
threshold) with mmap and unmaps them on free, and trims the heap whenever 128 KiB lie
free at its top. A training step on the CPU allocates and frees the same large
activations every step (attention weights of 64 x 4 heads x 256 x 256 floats are 64 MiB),
so every step faults their pages in again, zero-filled by the kernel. `keep_freed()` turns
both off with `mallopt`, which is what the caching allocators of PyTorch's CPU tuning
guide (jemalloc, tcmalloc) do by design: freed memory stays with the process for the next
allocation. The cost is that the process's resident memory stays at its peak, as under a
GPU's caching allocator. The saving is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed() -> bool:
    """Tell glibc's malloc to keep freed memory; -> whether it did (False with another
    C library, which keeps its own policy)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                         LARGEST_TRIM_THRESHOLD))

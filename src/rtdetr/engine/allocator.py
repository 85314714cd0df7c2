"""CPU training and glibc's malloc: keep freed memory in the process instead of handing it back to the kernel.

By default glibc serves blocks over a (dynamic, at most 32 MiB) threshold with their own mmap and returns the top of
the heap to the kernel once enough of it is free, so a training step that frees and re-allocates the same
activations every step page-faults them in again every step. Measured (`rtdetr_tiny`, batch 16, 320 px, AMD EPYC
Zen 3, 2 cores): ~35,000-48,000 minor page faults per step by default, under 900 with `keep_freed_memory()`; 0.90 ->
0.81 s per step (means of 3 runs each, interleaved), and the first steps, which time a budgeted run, 1.3 -> 0.8 s.
The cost: the process keeps its peak heap (training reaches that peak every step anyway).
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
# The largest mmap threshold the C library accepts: recent glibc takes 1 GiB, older ones stop at 32 MiB on 64-bit.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> int:
    """Serve allocations below the largest accepted threshold from the heap and never trim it (glibc `mallopt`),
    for the whole process. Returns the mmap threshold set in bytes, or 0 where the C library has no such option
    (not Linux, or not glibc): nothing changes there."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return 0
    if not mallopt(M_TRIM_THRESHOLD, ctypes.c_int(NEVER_TRIM)):
        return 0
    for threshold in MMAP_THRESHOLDS:
        if mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)):
            logger.debug("malloc keeps freed memory: mmap threshold %d MiB, no trimming", threshold >> 20)
            return threshold
    return 0

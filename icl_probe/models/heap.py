"""How the process hands freed host memory back: glibc keeps freed blocks for reuse, and by
default raises its mmap threshold as large blocks are freed (up to 32 MiB on 64-bit), so the
many medium tensors a run frees stay in the heap and its peak RSS grows past what it holds.

:func:`return_freed_memory` fixes the threshold at 128 KiB: every tensor above it gets its own
mapping, returned to the system when freed. Measured on ``experiments/default.toml`` (embedded
model, this 2-core CPU): peak RSS 2.57 GB with glibc's defaults, 2.43 GB with the threshold
fixed; wall time 6 min 02 s and 6 min 10 s, within the machine's noise (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024
HEAP_ENV = "ICL_PROBE_HEAP"


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold (Linux with glibc only; elsewhere nothing is done). Call it
    before the first large allocation. Returns whether it took effect. ``ICL_PROBE_HEAP=glibc``
    in the environment leaves glibc's defaults (to measure against them), and a threshold the
    user set (``MALLOC_MMAP_THRESHOLD_``) is kept."""
    if os.environ.get(HEAP_ENV) == "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False

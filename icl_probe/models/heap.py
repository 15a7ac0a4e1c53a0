"""How the process hands freed host memory back: glibc keeps freed blocks for reuse, and by
default raises its mmap threshold as large blocks are freed (up to 32 MiB on 64-bit), so the
many medium tensors a run frees stay in the heap and its peak RSS grows past what it holds.

:func:`return_freed_memory` fixes the threshold at 2 MiB: every tensor above it gets its own
mapping, returned to the system when freed, while the many small temporaries stay in the heap
and are reused. The lower the threshold, the lower the peak and the more page faults. Measured
on this 2-core CPU (BENCHMARKS.md, 2026-12-05), a small Dai table on the embedded model (the
plan-vs-peak test's): peak 1.53 GB and 40 s with glibc's defaults; 1.41 GB and 48 s at 128 KiB;
1.44-1.47 GB and 41 s at 4 MiB; 1.58 GB at 16 MiB. ``icl_vs_gd.toml`` at 128 KiB: 2.80 GB
against 3.19 GB, but 25 min 29 s against 18 min 29 s (500 s of system time against 52 s): too
dear. At 4 MiB it peaked at 3.06 GB (over its 3 GB target), at 2 MiB at 2.91 GB in 16 min 23 s;
``default.toml`` at 2 MiB: 2.50 GB in 4 min 02 s (4 min 20 s at 4 MiB). Hence 2 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 2 * 1024 * 1024
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

"""Keep freed CPU memory for the next forward pass instead of handing it back to the kernel after each one.

glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised as such blocks are freed) with
fresh pages from the kernel and returns them on free, and it trims the top of its heap whenever more than the trim
threshold lies free there. A forward pass allocates its activations (MiniLM at 8 x 128 tokens: 1.5-6 MiB each) and
frees them, so the next pass touches new pages again: scoring the demo's pairs at batch 8 took 1,362-1,773 minor
page faults and 4.1-5.0 ms of system CPU per pair, 0 and 0 with this setting (about a tenth of the pair's CPU
time; `benchmarks/cpu_memory.py`; `tests/test_cpu_memory.py` counts the faults of a small loop). The cost is the
one every GPU caching allocator pays: the process keeps its peak working set instead of shrinking between calls.

Only glibc on Linux is tuned (`mallopt`, process-wide); elsewhere, or with MOERM_KEEP_CPU_MEMORY=0, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "MOERM_KEEP_CPU_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: blocks up to it come from the reused heap
TRIM_THRESHOLD = 1 << 30  # free heap kept before any is returned

_applied: bool | None = None


def keep_cpu_memory() -> bool:
    """Make malloc reuse freed memory (once per process); whether the setting is in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied

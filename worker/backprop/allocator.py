"""Keep freed memory in the process for the next step instead of handing it back to the OS.

NumPy takes every array from malloc and frees each temporary as soon as it is dropped. With
glibc's defaults a block of 128 KiB or more (one (2048, 128) float32 activation is 1 MiB) is
mmap'd and unmapped again on free, and free memory at the top of the heap is trimmed away, so
the next training step page-faults the same memory back in, zero-filled by the kernel. On the
transformer benchmark step (bench/models.py) that was a quarter of the step's CPU time.
Raising both thresholds keeps blocks up to 32 MiB (glibc's maximum) on the heap and the heap
from shrinking below 256 MiB of free space: a steady training loop reuses its own memory, as
PyTorch's caching allocator makes it do. Elsewhere than glibc (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds as described above; True when they were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

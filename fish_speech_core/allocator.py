"""Make glibc give freed tensor memory back to the system during training.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the
first steps most activations come from the heap, and freed heap memory stays in the process:
a real-size 1x1024 LoRA step peaked at 12.5 GB with the default and at 4.3 GB with the threshold
fixed at 1 MiB (docs/performance.md, Memory). Setting the threshold fixes it (no more raising).
Called by the training entry points at run time, never on import; process-wide by nature.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MMAP_THRESHOLD = 1 << 20  # bytes: blocks from here up are mmap'ed, and unmapped when freed
# Free space at the top of the heap beyond this goes back to the system: glibc's start value, which
# its dynamic rule raises to twice the mmap threshold (64 MiB) in a process that ran a while.
TRIM_THRESHOLD = 128 << 10
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None  # musl, macOS, Windows: no mallopt, or a different allocator
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap (and trim) threshold for this process, what ``MALLOC_MMAP_THRESHOLD_=1048576``
    in the environment does; False (and nothing done) without glibc or when the user exported
    ``MALLOC_MMAP_THRESHOLD_`` (theirs wins)."""
    import os

    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    trimmed = "MALLOC_TRIM_THRESHOLD_" in os.environ or libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) and trimmed)


def mmapped_bytes() -> int | None:
    """Bytes glibc holds in mmap'ed blocks right now (mallinfo2 ``hblkhd``); None without glibc >= 2.33."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)

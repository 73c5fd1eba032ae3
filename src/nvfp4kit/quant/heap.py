"""Give freed heap memory back to the OS between big temporaries.

glibc keeps freed blocks of up to 32 MB in its arenas (its mmap threshold grows as big blocks are freed), and
the per-expert temporaries of quantization and the per-chunk activations of calibration fragment them: measured
on a 26B-A4B-shaped layer, quantizing held 5.4 GB of freed memory against a 1.0 GB working set. `malloc_trim`
returns it; elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _load_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _load_trim()


def trim_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

"""Large XLA buffers from the heap, not from fresh pages each run.

XLA's CPU runtime allocates a program's buffers anew on each run. glibc's
``malloc`` serves blocks above its mmap threshold (128 KiB at start) with
``mmap`` and returns them with ``munmap``, so each run of a program with
large temporaries touches fresh pages, and the kernel zero-fills every one of
them on first write. For InstEval's 1156 x 1156 Schur block a value and
gradient took 75-90 ms that way and 51-70 ms with the threshold at 64 or 256
MiB (alternating runs of one script, ``LMMJAX_MMAP_THRESHOLD`` set each
time); 32 MiB gained nothing, presumably because a run's temporaries are
allocated together, larger than that.

:func:`tune_allocator` raises the threshold once, at import, to
:data:`MMAP_THRESHOLD` (where glibc refuses that, before version 2.35, to
its 64-bit maximum of 32 MiB). Set ``LMMJAX_MMAP_THRESHOLD`` (bytes) to
choose it, or to ``0`` to leave ``malloc`` as it is. Elsewhere than glibc it
does nothing.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "tune_allocator"]

MMAP_THRESHOLD = 256 << 20
_OLD_GLIBC_MAX = 32 << 20  # glibc's cap on the threshold before 2.35, on 64-bit
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def tune_allocator() -> bool:
    """Raise glibc's mmap threshold to ``LMMJAX_MMAP_THRESHOLD`` (default :data:`MMAP_THRESHOLD`).

    Returns
    -------
    bool
        Whether the threshold was set.
    """
    raw = os.environ.get("LMMJAX_MMAP_THRESHOLD", str(MMAP_THRESHOLD))
    try:
        threshold = int(raw)
    except ValueError:
        raise ValueError(f"LMMJAX_MMAP_THRESHOLD must be a number of bytes, got {raw!r}") from None
    if threshold <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    threshold = min(threshold, 2**31 - 1)
    if mallopt(_M_MMAP_THRESHOLD, threshold):
        return True
    return bool(mallopt(_M_MMAP_THRESHOLD, min(threshold, _OLD_GLIBC_MAX)))

"""The process's memory: XLA's large buffers from the heap, and Python's cyclic collector.

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

Python's cyclic collector runs a full pass over every live object a few
times while JAX, pandas, SciPy and formulaic import (three full passes and
hundreds of young ones for a command-line fit), and again, several times,
at interpreter shutdown. :func:`collector_paused` holds it off while the
package imports; :func:`freeze_for_exit` moves every live object out of its
reach just before the process ends (the command line calls it once its
result is written; ``import lmmjax`` registers it with :mod:`atexit` for
every other process), and after
:func:`freeze_imports` (the command line's process) every import pause ends
with the same freeze. Measured on sleepstudy's command-line fit (2-core CPU,
alternating runs): imports 1.18-1.47 s with the collector running against
0.99-1.16 s paused; shutdown 0.41-0.50 s against 0.06-0.08 s after the
freeze; and the whole process 1.47-1.58 s against 1.27-1.44 s with the
imports' objects frozen (the collector's full passes while the model is
built and fitted had walked every object the libraries made). In a script
that fits and exits, the shutdown took 0.53-0.59 s after a REML fit of
sleepstudy and 1.5-1.7 s after a NUTS fit of dillonE1 (4 chains x 2,000
iterations), against 0.08-0.13 s and 0.18-0.25 s with the freeze at exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import threading
from collections.abc import Iterator

__all__ = [
    "MMAP_THRESHOLD",
    "collector_paused",
    "command_line_process",
    "freeze_for_exit",
    "freeze_imports",
    "tune_allocator",
]

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


_PAUSE_LOCK = threading.Lock()
# pauses open in any thread; the state to restore; whether a pause's end freezes (freeze_imports)
_PAUSE = {"depth": 0, "restore": False, "freeze": False, "imports": False}


@contextlib.contextmanager
def collector_paused(*, imports: bool = True) -> Iterator[None]:
    """Hold Python's cyclic collector off inside the block (for imports).

    ``imports=False`` marks a pause that imports nothing for good (a
    program's trace): its end never freezes, even after :func:`freeze_imports`.

    Pauses may overlap, in one thread or several: the collector stays off
    until the last one open ends, and is then enabled again if it was enabled
    when the first began (a lock keeps the count and that state). Cycles made
    meanwhile are collected by its next pass; nothing is kept from it for good.
    """
    with _PAUSE_LOCK:
        if _PAUSE["depth"] == 0:
            _PAUSE["restore"] = gc.isenabled()
            gc.disable()
        _PAUSE["depth"] += 1
    try:
        yield
    finally:
        with _PAUSE_LOCK:
            _PAUSE["depth"] -= 1
            _PAUSE["imports"] = _PAUSE["imports"] or imports
            if _PAUSE["depth"] == 0:
                if _PAUSE["freeze"] and _PAUSE["imports"]:
                    gc.freeze()
                _PAUSE["imports"] = False
                if _PAUSE["restore"]:
                    gc.enable()


def freeze_imports() -> None:
    """Freeze every live object now, and again as each import pause ends; for a one-shot process.

    Now: ``python -m lmmjax.fit`` imports the package before its entry point
    runs, and the objects made while a pause imports wait in the collector's
    youngest generation, where its first pass afterwards walks them all
    (about 50 ms on the command line's imports). Frozen, the modules each
    pause imports, and everything else alive then, leave the collector's
    reach (they live until the process ends anyway), so that its passes
    while the process builds and fits its model walk only what it made
    since. Refcounting still frees frozen objects, but a frozen object is
    never collected as part of a cycle, then or later (a command-line NUTS
    fit of sleepstudy kept about 12,000 such objects to the end, against
    3,400 unfrozen). The command line's process calls this
    (see :func:`command_line_process`), never a library call.
    """
    with _PAUSE_LOCK:
        _PAUSE["freeze"] = True
        gc.freeze()


def command_line_process() -> bool:
    """Whether this process is the command line's: ``python -m lmmjax.fit`` or ``lmmjax-fit``.

    Read from the interpreter's own command line, because both import the
    ``lmmjax`` package before the entry point runs: the package then calls
    :func:`freeze_imports` before its own imports, where the entry point
    would be too late for them.
    """
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    module = _run_module(getattr(sys, "orig_argv", []))
    return module == "lmmjax.fit" or script in ("lmmjax-fit", "lmmjax-fit.exe")


def _run_module(argv: list[str]) -> str | None:
    """The module that the interpreter's own options run with ``-m``, or None.

    Reads the options before the first argument that is not one (a script,
    ``-c``'s command, or ``-m``'s module ends them): a script's own ``-m``
    is not the interpreter's.
    """
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--check-hash-based-pycs":
            i += 2
            continue
        if not arg.startswith("-") or arg == "-" or arg.startswith("--"):
            return None
        for k, flag in enumerate(arg[1:], start=1):  # clustered flags, e.g. -Im module
            rest = arg[k + 1 :]
            if flag == "m":
                return rest or (argv[i + 1] if i + 1 < len(argv) else None)
            if flag == "c":
                return None
            if flag in "XW":  # the option's value is the rest, or the next argument
                i += 0 if rest else 1
                break
        i += 1
    return None


def freeze_for_exit() -> None:
    """Move every live object out of the cyclic collector's reach; for a process about to end.

    Shutdown then skips the collector's passes over the imported libraries'
    objects. Objects frozen are never collected as cycles afterwards, so only
    a process that is about to exit calls this: the command line after its
    fit, and :mod:`atexit` as the interpreter's shutdown begins (registered
    by ``import lmmjax``). Refcounting still frees what the shutdown
    releases; the finalisers of objects left in reference cycles at exit,
    which Python does not promise to run, are then not run.
    """
    gc.freeze()

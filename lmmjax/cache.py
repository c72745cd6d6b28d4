"""Compilation caches: one in memory for this process, one on disk across processes.

:func:`compiled` ahead-of-time compiles a function once per argument shapes,
dtypes and static options and keeps the executable (at most 64, least recently
used first out). Every method compiles through it, so one place decides what
is reused; :func:`compile_seconds` tells how long compiling took, whoever did it.

The persistent XLA cache stores compiled programs on disk so that a model
shape compiles once per machine. lmmjax turns it on at import, in
``$LMMJAX_CACHE_DIR`` (default ``~/.cache/lmmjax/xla``). Set
``LMMJAX_CACHE_DIR=off`` to disable it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["clear", "compile_seconds", "compiled", "enable_compilation_cache"]

_MAX_ENTRIES = 64
_CACHE: OrderedDict = OrderedDict()
_COMPILE = {"seconds": 0.0}


def _on_duration(event: str, seconds: float, **_: Any) -> None:
    # tracing, lowering and backend compilation (which includes reading the disk cache);
    # the /jax/compilation_cache/ events repeat that time or report time *saved*
    if event.startswith("/jax/core/compile/"):
        _COMPILE["seconds"] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling (or loading) programs.

    A running total from JAX's monitoring events: the difference across a
    phase is the compile time inside it, whoever compiled (lmmjax, NumPyro, BlackJAX).
    """
    return _COMPILE["seconds"]


def _signature(args) -> tuple:
    """Shapes, dtypes and, for arrays laid out over several devices, their sharding."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((jnp.shape(leaf), str(jnp.result_type(leaf)), _layout(leaf)) for leaf in leaves)
    return treedef, shapes


def _layout(leaf):
    sharding = getattr(leaf, "sharding", None)
    return None if sharding is None or len(sharding.device_set) == 1 else sharding


# XLA options for programs whose run time is negligible next to their compile time:
# no LLVM optimisation passes (sleepstudy's REML program compiles in 0.85 s instead of
# 1.56 s, and runs in 109-141 us instead of 124 us)
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(fn: Callable, *args, quick: bool = False, **static) -> tuple[Callable, float]:
    """``fn`` compiled for the shapes of ``args`` with keyword options ``static`` fixed.

    Parameters
    ----------
    fn : callable
        A pure, jit-compatible function (the key is the function object itself).
    *args
        Example arguments (pytrees of arrays); only their shapes and dtypes matter.
    quick : bool
        Compile with :data:`QUICK_COMPILE` (for small problems, where compile
        time dominates).
    **static
        Hashable options bound with :func:`functools.partial`.

    Returns
    -------
    executable : callable
        Takes arguments of the same shapes as ``args``.
    seconds : float
        Time spent compiling now (0 when the executable was cached).
    """
    key = (fn, _signature(args), tuple(sorted(static.items())), quick)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], 0.0
    start = time.perf_counter()
    lowered = jax.jit(partial(fn, **static)).lower(*args)
    _CACHE[key] = lowered.compile(QUICK_COMPILE) if quick else lowered.compile()
    while len(_CACHE) > _MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return _CACHE[key], time.perf_counter() - start


def clear() -> None:
    """Forget every cached executable of this process."""
    _CACHE.clear()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Store compiled programs in ``path`` (or the default location).

    Returns the directory used, or None when the cache is disabled.
    """
    setting = str(path) if path is not None else os.environ.get("LMMJAX_CACHE_DIR", "")
    if setting.lower() in {"off", "0", "none", "false"}:
        return None
    directory = Path(setting) if setting else Path.home() / ".cache" / "lmmjax" / "xla"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory

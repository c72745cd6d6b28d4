"""Persistent XLA compilation cache, so a model shape compiles once per machine.

Compiling the fit for a model shape takes seconds; JAX can store the compiled
program on disk and load it in later processes. lmmjax turns this on at import,
in ``$LMMJAX_CACHE_DIR`` (default ``~/.cache/lmmjax/xla``). Set
``LMMJAX_CACHE_DIR=off`` to disable it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


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

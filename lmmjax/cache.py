"""Compilation caches: one in memory for this process, one on disk across processes.

:func:`compiled` ahead-of-time compiles a function once per argument shapes,
dtypes and static options and keeps the executable (at most 64, least recently
used first out). Every method compiles through it, so one place decides what
is reused; :func:`compile_seconds` tells how long compiling took, whoever did it.

Programs compile with XLA's legacy CPU fusion emitters and LLVM's
optimisation level 1 (:data:`DEFAULT_COMPILE`), which compile faster than
XLA's default MLIR emitters at level 2 for programs like these and run about
as fast (see the numbers below); small ones with neither LLVM optimisation
(:data:`QUICK_COMPILE`).

The persistent XLA cache stores compiled programs on disk so that a model
shape compiles once per machine. lmmjax turns it on at import, in
``$LMMJAX_CACHE_DIR`` (default ``~/.cache/lmmjax/xla``). Set
``LMMJAX_CACHE_DIR=off`` to disable it.

Beside it, each program is kept as a serialized :mod:`jax.export` module
(``export/`` in the same directory), so that a fresh process does not even
trace it: tracing and lowering sleepstudy's Satterthwaite program took
0.76 s, deserializing and lowering its export 0.02 s. The key holds a hash of
lmmjax's own source, so any change to the code starts afresh. Every program
is compiled from its export, first run or not, so that the persistent cache
holds one entry for it. Programs that call :mod:`lmmjax.lapack`'s foreign
target are exported with that target allowed, and a process registers it
before it compiles such an export.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lmmjax.memory import collector_paused

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
# 1.56 s, and runs in 109-141 us instead of 124 us), XLA's legacy loop emitters (below),
# and, where jaxlib knows the option (0.9 and later; older ones reject it), no YNNPACK
# fusions of matrix products, which prepare themselves on a program's first run
# (sleepstudy's Satterthwaite program: first run 30-72 ms with them, 5-13 ms without;
# later runs 4-9 ms either way)
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA's CPU backend emits its fusions through MLIR by default; its older LLVM emitters
# compile in about two thirds of the time or less, and every lmmjax program uses them
# (DEFAULT_COMPILE, and QUICK_COMPILE's share): sleepstudy's REML program compiled quickly
# in 0.51 s against 1.25 s, dillonE1's NUTS sampler in 3.1 s against 4.8 s (its values and
# gradients 351-375 against 351-354 us) and its recovery in 0.70 s against 1.32 s,
# InstEval's REML loop in 2.9-3.1 s against 3.2-3.3 s (fit 0.79-0.89 s either way).
# With them, LLVM's level 1 instead of 2 (DEFAULT_COMPILE): dillonE1's sampler compiled in
# 2.28-2.39 s against 2.64-2.88 s at 232-264 against 259-283 us per gradient, its recovery
# in 0.39 s against 0.55 s (run 0.43 against 0.58 s), whole fits' compiles 3.65-3.80 s
# against 4.33-4.36 s; InstEval's fit 0.74-1.06 s against 0.76-0.96 s.
# Where jaxlib knows the option: 0.7 to 0.10 (0.11.2's CPU client refused it, seen on a
# GPU machine's image; where a client refuses any option, _compile drops them all)
EMITTER_OPTION = "xla_cpu_use_fusion_emitters"


def legacy_emitter_options(jaxlib_version: tuple) -> dict:
    """XLA's legacy fusion emitters for a jaxlib of ``jaxlib_version``; empty outside 0.7-0.10."""
    return {EMITTER_OPTION: False} if (0, 7) <= tuple(jaxlib_version[:2]) < (0, 11) else {}


def default_compile_options(jaxlib_version: tuple) -> dict:
    """:data:`DEFAULT_COMPILE` for a jaxlib of ``jaxlib_version``."""
    return {**legacy_emitter_options(jaxlib_version), "xla_backend_optimization_level": 1}


def quick_compile_options(jaxlib_version: tuple) -> dict:
    """:data:`QUICK_COMPILE` for a jaxlib of ``jaxlib_version`` (a tuple of ints)."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    options.update(legacy_emitter_options(jaxlib_version))
    if tuple(jaxlib_version[:2]) >= (0, 9):
        options[YNN_OPTION] = ""  # the empty list: no fusion type
    return options


def _jaxlib_version() -> tuple:
    from jaxlib.version import __version__

    return tuple(int(part) for part in __version__.split(".")[:2])


QUICK_COMPILE = quick_compile_options(_jaxlib_version())
DEFAULT_COMPILE = default_compile_options(_jaxlib_version())


def compile_options(quick: bool) -> dict:
    """The XLA options a program is compiled with now.

    :data:`QUICK_COMPILE` or :data:`DEFAULT_COMPILE` on the CPU; none elsewhere,
    where XLA's own defaults stand (a CUDA client refuses the CPU-only options:
    "No such compile option").
    """
    if jax.default_backend() != "cpu":
        return {}
    return QUICK_COMPILE if quick else DEFAULT_COMPILE


def _option_key(options: dict | None) -> tuple:
    return tuple(sorted((options or {}).items()))


_REFUSED: set[tuple] = set()  # option sets this process's XLA client refused


def _compile(lowered, options: dict):
    """``lowered`` compiled with ``options``, or with XLA's defaults where the client
    refuses one of them ("No such compile option": a jaxlib newer or older than the
    options were written for); the options only ever change compile and run time."""
    key = _option_key(options)
    if options and key not in _REFUSED:
        try:
            return lowered.compile(options)
        except RuntimeError as err:  # JaxRuntimeError (from 0.4.34; XlaRuntimeError before)
            if "No such compile option" not in str(err):
                raise
            _REFUSED.add(key)
    return lowered.compile()


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
    options = compile_options(quick)
    # the precision of float32 products is fixed at tracing (see lmmjax.precision)
    options_key = (*_option_key(options), ("matmul", jax.config.jax_default_matmul_precision))
    key = (fn, _signature(args), tuple(sorted(static.items())), options_key)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], 0.0
    start = time.perf_counter()
    # tracing makes objects by the hundred thousand: without the pause, the collector's
    # full passes walked every live object several times per fit (dillonE1's NUTS fit:
    # 0.85-1.05 s of collection against 0.25-0.28 s with the pause)
    with collector_paused(imports=False):
        _CACHE[key] = _from_export(fn, args, static, key, options) or (
            _compile(jax.jit(partial(fn, **static)).lower(*args), options)
        )
    while len(_CACHE) > _MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return _CACHE[key], time.perf_counter() - start


_SOURCE: dict[str, str] = {}


def _source_hash() -> str:
    """A hash of every lmmjax source file: exports of older code are never read."""
    if "hash" not in _SOURCE:
        digest = hashlib.sha256()
        for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
            digest.update(path.read_bytes())
        _SOURCE["hash"] = digest.hexdigest()
    return _SOURCE["hash"]


def _export_path(fn: Callable, key: tuple) -> Path | None:
    """Where the export of ``fn`` at ``key`` lives, or None when exports are off.

    The name hashes the pickled signature and static options (pickles hold
    arrays in full, where reprs elide them), the versions and lmmjax's source.
    """
    directory = jax.config.jax_compilation_cache_dir
    if not directory or getattr(fn, "__qualname__", "<lambda>").endswith("<lambda>"):
        return None
    _, (treedef, shapes), static, options = key
    if any(layout is not None for _, _, layout in shapes):  # sharded over devices: not here
        return None
    try:
        text = pickle.dumps((fn.__module__, fn.__qualname__, treedef, shapes, static, options))
    except Exception:  # noqa: BLE001  (an option that does not pickle: compile directly)
        return None
    digest = hashlib.sha256(text)
    digest.update(repr((jax.__version__, jax.default_backend(), jax.device_count(),
                        _source_hash())).encode())  # fmt: skip
    return Path(directory) / "export" / f"{digest.hexdigest()[:32]}.bin"


def _from_export(fn: Callable, args: tuple, static: dict, key: tuple, options):
    """``fn`` compiled from its serialized export (written first if absent), or None.

    None where exports are off or ``fn`` cannot be exported (the caller then
    compiles it directly).
    """
    path = _export_path(fn, key)
    failed = None if path is None else path.with_suffix(".failed")
    if path is None or failed.exists():
        return None
    leaves, in_tree = jax.tree.flatten(args)
    try:
        from jax import export

        from lmmjax.lapack import TARGET, register

        if path.exists():
            out_tree, blob = pickle.loads(path.read_bytes())
            if TARGET.encode() in blob:  # its handler, before the program is built
                register()
            exported = export.deserialize(bytearray(blob))
        else:
            out_tree = []

            def flat(*flat_args):
                out = fn(*jax.tree.unflatten(in_tree, flat_args), **static)
                leaves_out, tree = jax.tree.flatten(out)
                out_tree.append(tree)
                return leaves_out

            allowed = [export.DisabledSafetyCheck.custom_call(TARGET)]
            exported = export.export(jax.jit(flat), disabled_checks=allowed)(*leaves)
            out_tree = out_tree[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(pickle.dumps((out_tree, bytes(exported.serialize()))))
            tmp.replace(path)
        executable = _compile(jax.jit(exported.call).lower(*leaves), options)
    except Exception:  # noqa: BLE001  (anything export cannot take is compiled directly)
        with contextlib.suppress(OSError):  # a read-only or full disk: compile directly
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.touch()  # and is not tried again
        return None

    def run(*call_args):
        return jax.tree.unflatten(out_tree, executable(*jax.tree.leaves(call_args)))

    return run


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
    # 0.05 s: the small shared programs (0.1 s, compiled from their exports in every new
    # process otherwise), not the eager operations' one-op programs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory

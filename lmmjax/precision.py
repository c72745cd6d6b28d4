"""Floating-point precision: float64 by default, set here and nowhere else.

lmmjax enables JAX's 64-bit mode when it is imported, so every array the
library creates is float64 unless the user opts in to float32 with
:func:`set_precision` (or the environment variable ``LMMJAX_PRECISION``).
float32 changes the dtype of the data arrays handed to the kernels, and
makes JAX's matrix products run at full float32 precision (an accelerator
otherwise multiplies float32 in TensorFloat-32, with a 10-bit mantissa); it
is meant for GPU speed and its accuracy is measured in the benchmarks.
"""

from __future__ import annotations

import os

import jax
import numpy as np

_PRECISIONS = {"float64": np.float64, "float32": np.float32}
_state = {"precision": os.environ.get("LMMJAX_PRECISION", "float64")}
if _state["precision"] not in _PRECISIONS:
    raise ValueError(
        f"LMMJAX_PRECISION must be one of {sorted(_PRECISIONS)}, got {_state['precision']!r}"
    )

jax.config.update("jax_enable_x64", True)
# JAX's matrix-product precision before float32 set it to "highest" (restored with float64),
# and whether float32 set it (a setting of the user's own is left alone)
_matmul = {"before": None, "set": False}


def _global_matmul():
    """JAX's global matrix-product precision (not a ``jax.default_matmul_precision`` block's)."""
    holder = getattr(jax.config, "_value_holders", {}).get("jax_default_matmul_precision")
    if holder is not None and hasattr(holder, "get_global"):
        return holder.get_global()
    return jax.config.jax_default_matmul_precision


def _apply(precision: str) -> None:
    """Hold JAX's default matrix-product precision at "highest" while float32 is on.

    An H100 multiplies float32 in TensorFloat-32 by default: sleepstudy's
    float32 REML criterion (response shifted by 1e4) then missed float64's by
    1.3e-5 relative, against 1e-6 on a CPU. float64 products are not affected.
    """
    current = _global_matmul()
    if precision == "float32" and current != "highest":
        _matmul.update(before=current, set=True)
        jax.config.update("jax_default_matmul_precision", "highest")
    elif precision == "float64" and _matmul["set"]:
        _matmul["set"] = False
        if current == "highest":  # unless changed since
            jax.config.update("jax_default_matmul_precision", _matmul["before"])


def set_precision(precision: str) -> None:
    """Choose the floating-point type of the data passed to the kernels.

    Parameters
    ----------
    precision : {"float64", "float32"}
        ``"float64"`` (default) for lme4-grade accuracy; ``"float32"`` as an
        opt-in for speed on accelerators.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    _apply(precision)
    _state["precision"] = precision


def get_precision() -> str:
    """Return the current precision name ("float64" or "float32")."""
    return _state["precision"]


def float_dtype() -> type:
    """Return the NumPy dtype used for the kernels' floating-point data."""
    return _PRECISIONS[_state["precision"]]


if _state["precision"] == "float32":  # LMMJAX_PRECISION=float32
    _apply("float32")

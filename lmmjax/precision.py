"""Floating-point precision: float64 by default, set here and nowhere else.

lmmjax enables JAX's 64-bit mode when it is imported, so every array the
library creates is float64 unless the user opts in to float32 with
:func:`set_precision` (or the environment variable ``LMMJAX_PRECISION``).
float32 only changes the dtype of the data arrays handed to the kernels;
it is meant for GPU speed and its accuracy is measured in the benchmarks.
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
    _state["precision"] = precision


def get_precision() -> str:
    """Return the current precision name ("float64" or "float32")."""
    return _state["precision"]


def float_dtype() -> type:
    """Return the NumPy dtype used for the kernels' floating-point data."""
    return _PRECISIONS[_state["precision"]]

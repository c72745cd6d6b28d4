"""The Fit protocol every method's result follows, and the one JSON result schema.

Every result has ``method``, ``model``, ``fixef``, ``fixef_se``, ``sigma``,
``theta``, ``varcorr``, ``nobs``, ``converged`` and ``seconds``;
``ranef()``; ``summary()`` (printable lme4-style text); ``to_dict()``; and a
short ``repr``. :func:`result_dict` builds the keys shared by every method, so
that a method's ``to_dict`` only adds its own; :func:`write_json` writes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pandas loads with the first result, not with lmmjax
    import pandas as pd

__all__ = ["Fit", "result_dict", "to_jsonable", "write_json"]


@runtime_checkable
class Fit(Protocol):
    """What every fitted model provides, whatever the method."""

    method: str
    model: Any
    converged: bool
    seconds: float

    @property
    def fixef(self) -> pd.Series: ...

    @property
    def fixef_se(self) -> pd.Series: ...

    @property
    def sigma(self) -> float: ...

    @property
    def theta(self) -> np.ndarray: ...

    @property
    def varcorr(self) -> pd.DataFrame: ...

    @property
    def nobs(self) -> int: ...

    def ranef(self) -> dict[str, pd.DataFrame]: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict: ...


def result_dict(fit: Any, **specific: Any) -> dict:
    """The JSON result: the keys shared by every method, then the method's own.

    Parameters
    ----------
    fit : Fit
        Also reads ``model``, ``fixef_se``, ``theta``, ``converged`` and ``seconds``.
    **specific
        The method's values of ``objective``, ``loglik``, ``aic``, ``bic`` and
        ``singular`` (None where they do not apply), then its own keys.
    """
    model = fit.model
    shared = {
        "method": fit.method,
        "formula": model.formula,
        "nobs": fit.nobs,
        "ngroups": model.ngroups,
        "fixef": fit.fixef.to_dict(),
        "fixef_se": fit.fixef_se.to_dict(),
        "sigma": fit.sigma,
        "theta": np.asarray(fit.theta).tolist(),
        "varcorr": _records(fit.varcorr),
        "objective": None,
        "loglik": None,
        "aic": None,
        "bic": None,
        "converged": fit.converged,
        "singular": None,
        "seconds": fit.seconds,
        "n_dropped": model.n_dropped,
        "dropped_fixef": list(model.dropped_fixef),
    }
    return {**shared, **specific}


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows of a frame as dicts, with missing cells as None."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def to_jsonable(obj: Any) -> Any:
    """Convert a result structure into plain Python that :mod:`json` can write.

    NumPy (and JAX) arrays become nested lists, NumPy scalars become Python
    scalars, tuples become lists, mapping keys become strings, and
    non-finite floats become ``None`` (JSON has no NaN or infinity).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(result: dict, path: str | Path) -> Path:
    """Write a result dictionary as indented JSON, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(result), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path

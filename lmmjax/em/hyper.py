"""Empirical Bayes for ``Theta = (lambda, b, A)`` by the Laplace approximation of the evidence.

``beta`` and ``gamma`` are Gaussian given the variances, so they are integrated
out exactly: with ``V = I + Z Lambda Lambda' Z'`` and ``P = X'V^{-1}X + lambda D``
(both from one :func:`lmmjax.linalg.gls_gram` of ``[X y]``),

    log p(y | sigma^2, Sigma, lambda) = -(N - p_u)/2 log(2 pi sigma^2) - 1/2 log|V|
        - 1/2 log|P| + p_pen/2 log(lambda) - (y'V^{-1}y - c'P^{-1}c) / (2 sigma^2),

``c = X'V^{-1}y``, ``p_u`` the columns with a flat prior (their improper
constant does not depend on Theta). Only the variance parameters
``phi = (log sigma^2, chol(Sigma_l) with log diagonals)`` are integrated by
Laplace's method: with ``l(phi)`` the log of the above plus the log priors of
``sigma^2`` and ``Sigma_l`` (normalised inverse-Wishart with
``eta_l = kappa_l - d_l - 1``, ``Phi_l = kappa_l A_l``) plus the log Jacobian
of ``phi``,

    log p(y | Theta) ~ l(phi*) + k/2 log(2 pi) - 1/2 log|-H(phi*)|,

``H`` the Hessian in ``phi`` (automatic differentiation, :func:`_hessian`) at
the mode ``phi*`` of ``l``, found by damped Newton steps from the EM estimate.
``phi`` has ``1 + sum_l d_l (d_l + 1) / 2`` entries whatever ``p`` is. The
inverse-Wishart is proper only for ``eta_l > d_l - 1``, i.e.
``b_l > 2 d_l / (m_l + 2 d_l)``, so ``"auto"`` searches ``b_l`` above that bound.

Two exact forms of the likelihood (:func:`criterion_data` picks the one
whose variance-dependent dense system is smaller): the primal above, with
the penalised columns replaced by the N x r thin-SVD factor of ``M_u X_p``
when ``p_pen > N - p_u`` (so ``P`` is at most N x N), or the collapsed form
that integrates beta out first and factors the q x q
``I + Lambda' Z' M_lambda Z Lambda`` (:class:`Collapsed`), which is what
makes ``p >> q`` cheap.

The outer search maximises the Laplace value over the ``"auto"`` entries of
``(log lambda, b, log A)`` by L-BFGS-B with the exact gradient, started from
the best point of a small grid in ``(b, a)``
(:func:`_laplace_and_grad`: implicit differentiation through ``phi*``,
third derivatives of ``l`` by automatic differentiation).

Default ``A``: ``"auto"`` is ``a D``, a multiple of a fixed diagonal
``D_j = s^2 / (2 L d mean(z_j^2))`` (``s^2`` the residual variance after the
flat-prior columns, ``L`` terms, ``d`` effects per level), with the one scale ``a``
chosen by empirical Bayes. Why not ``a I``: it forces one prior variance on
effects of different units (in the cubic growth model the intercept's and the
``t^3`` slope's scales differ by orders of magnitude), which would shrink some
of them towards a meaningless value. Why not a free diagonal: with ``d`` free
scales the criterion is maximised at ``b -> 1`` (``Sigma = A``, a diagonal
covariance fitted by type-II ML, every correlation shrunk to zero), which is
what we observed on the cubic model. ``a D`` is ``a I`` on standardised
random-effect columns. A number ``a`` in the options means ``a I``, a list
the diagonal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
from jax import lax
from jax.scipy.linalg import cho_solve, solve_triangular
from jax.scipy.special import multigammaln

from lmmjax.cache import compiled
from lmmjax.em.em import run_em_at, start_params
from lmmjax.em.objective import EmData, Hyper, Params, kappas
from lmmjax.errors import LmmInputError
from lmmjax.linalg import cross_products, gls_gram
from lmmjax.options import MapOptions

__all__ = [
    "HyperSpec",
    "b_lower_bound",
    "choose_hyper",
    "laplace_at",
    "laplace_value",
    "log_marginal",
    "resolve_hyper",
]


@dataclass(frozen=True)
class HyperSpec:
    """The hyperparameters per term, ``None`` where chosen by empirical Bayes.

    Attributes
    ----------
    lam : float or None
    b : list of (float or None)
        One per term.
    A : list of (numpy.ndarray or None)
        Diagonal of each term's ``A``.
    A_start : list of numpy.ndarray
        Starting (or fixed) diagonals.
    groups : list of str
        Each term's grouping factor.
    """

    lam: float | None
    b: list
    A: list
    A_start: list
    groups: list


def _per_term(value, terms, name: str) -> list:
    """Spread a single value or a mapping by grouping factor over the terms."""
    if not isinstance(value, dict):
        return [value] * len(terms)
    groups = list(dict.fromkeys(t.group for t in terms))
    unknown = [k for k in value if k not in groups]
    if unknown:
        raise LmmInputError(
            f"option '{name}': unknown grouping factor {unknown[0]!r}; "
            f"the model's factors are {', '.join(groups)}"
        )
    return [value.get(t.group, "auto") for t in terms]


def resolve_hyper(model, opts: MapOptions, pen=None) -> HyperSpec:
    """Check the options against the model and spread them over its terms.

    ``pen`` (1 for penalised columns) sets the scale of the default ``A``: the
    residual variance after the flat-prior columns only (all columns when
    ``lambda = 0``), since with ``p >= N`` a least-squares fit on every column
    leaves no residual.

    Raises
    ------
    LmmInputError
        For an unknown grouping factor in ``b`` or ``A`` or an ``A`` whose length
        is not the factor's number of random effects.
    """
    bs = [None if v == "auto" else float(v) for v in _per_term(opts.b, model.terms, "b")]
    X, y = model.X, model.y
    if pen is not None and opts.lam != 0:
        X = X[:, np.asarray(pen) == 0]
    res = y - X @ np.linalg.lstsq(X, y, rcond=None)[0] if X.shape[1] else y
    scale = max(float(np.var(res)), 1e-12 * max(float(np.var(y)), 1.0))
    As, starts = [], []
    for t, a in zip(model.terms, _per_term(opts.A, model.terms, "A"), strict=True):
        moment = 0.5 * scale / (len(model.terms) * t.d * np.maximum(np.mean(t.z**2, axis=0), 1e-12))
        if a == "auto":
            As.append(None)
            starts.append(moment)
        elif isinstance(a, list):
            if len(a) != t.d:
                raise LmmInputError(
                    f"option 'A': factor {t.group!r} has {t.d} random effects "
                    f"({', '.join(t.names)}) but A has {len(a)} values"
                )
            As.append(np.asarray(a, dtype=float))
            starts.append(As[-1])
        else:
            As.append(np.full(t.d, float(a)))
            starts.append(As[-1])
    lam = None if opts.lam == "auto" else float(opts.lam)
    return HyperSpec(lam, bs, As, starts, [t.group for t in model.terms])


def b_lower_bound(d: int, m: int) -> float:
    """Smallest ``b`` with a proper inverse-Wishart: ``eta > d - 1`` iff ``b > 2d / (m + 2d)``."""
    return 2.0 * d / (m + 2.0 * d)


# ------------------------------------------------------------ the criterion
class Collapsed(NamedTuple):
    """The criterion's data with beta integrated out before gamma (:func:`criterion_data`).

    With ``X_u`` the columns with a flat prior, ``M_u = I - X_u (X_u'X_u)^{-1} X_u'``
    and ``M_u X_p = U diag(s) W'`` the thin SVD of the penalised columns
    (``r`` singular values), Z ordered term by term, level-major:

    Attributes
    ----------
    zmz : array (q, q)
        ``Z' M_u Z``.
    zmy : array (q,)
        ``Z' M_u y``.
    ymy : scalar
        ``y' M_u y``.
    uz : array (r, q)
        ``U' Z``.
    uy : array (r,)
        ``U' y``.
    sv2 : array (r,)
        ``s^2``.
    logdet_u : scalar
        ``log|X_u' X_u|``.
    n, n_flat : scalars
        ``N`` and ``p_u``.
    nlevels : tuple of scalars
        Each term's number of levels (as floats).
    """

    zmz: jax.Array
    zmy: jax.Array
    ymy: jax.Array
    uz: jax.Array
    uy: jax.Array
    sv2: jax.Array
    logdet_u: jax.Array
    n: jax.Array
    n_flat: jax.Array
    nlevels: tuple


class Criterion(NamedTuple):
    """What :func:`log_marginal` is evaluated on: the data and, for the collapsed form, the
    static number of levels of each term (None for the primal form)."""

    data: EmData | Collapsed
    levels: tuple[int, ...] | None


def _flat_basis(Xu: np.ndarray) -> tuple[np.ndarray, float]:
    """Orthonormal basis of the flat-prior columns and ``log|X_u' X_u|``."""
    if Xu.shape[1] == 0:
        return np.zeros((Xu.shape[0], 0)), 0.0
    Q, R = np.linalg.qr(Xu)
    return Q, 2.0 * float(np.sum(np.log(np.abs(np.diag(R)))))


def _penalised_svd(X: np.ndarray, pen: np.ndarray):
    """``Q_u``, ``log|X_u'X_u|`` and the thin SVD ``U, s`` of ``M_u X_p`` (rank-truncated)."""
    Q, logdet_u = _flat_basis(X[:, ~pen])
    Xp = X[:, pen]
    Mxp = Xp - Q @ (Q.T @ Xp)
    U, s, _ = np.linalg.svd(Mxp, full_matrices=False)
    keep = s > (s[0] if s.size else 0.0) * max(Mxp.shape) * np.finfo(float).eps
    return Q, logdet_u, U[:, keep], s[keep]


def criterion_data(data: EmData, flat: bool, form: str = "auto") -> Criterion:
    """The cheaper exact form of the Laplace criterion's likelihood for this model.

    Both integrate beta (ridge prior) and gamma out exactly; they differ in
    which dense system depends on the variance parameters:

    * primal: ``P = X'V^{-1}X + lambda D`` (p' x p') after the blocked
      factorisation of ``V`` (:func:`lmmjax.linalg.gls_gram`), where, when
      there are more penalised columns than ``N - p_u``, the penalised block is
      first replaced by ``U diag(s)`` from the thin SVD of ``M_u X_p`` (an exact
      reparametrisation: ``W' beta_p`` has the same ridge prior), so
      ``p' <= N``;
    * collapsed (:class:`Collapsed`): beta first, then the q x q
      ``I + Lambda' Z' M_lambda Z Lambda``; chosen when ``q < p'``
      (the issue's p = 500 case: q = 80 against p' = 281).

    Parameters
    ----------
    data : EmData
    flat : bool
        Whether ``lambda`` is fixed at 0 (every column flat).
    form : {"auto", "primal", "collapsed", "full"}
        Force a form: ``"full"`` is the primal without the SVD reduction
        (for checks; ``"auto"`` picks as above).

    Returns
    -------
    Criterion
    """
    X = np.asarray(data.X, dtype=float)
    y = np.asarray(data.y, dtype=float)
    n = X.shape[0]
    pen = (np.asarray(data.pen) > 0) & (not flat)
    p_u, p_pen = int((~pen).sum()), int(pen.sum())
    levels = tuple(int(float(m)) for m in data.nlevels)
    q = sum(m * np.asarray(z).shape[1] for m, z in zip(levels, data.z, strict=True))
    p_reduced = p_u + min(p_pen, n - p_u)
    dtype = data.X.dtype
    if form not in ("auto", "primal", "collapsed", "full"):
        raise ValueError(f"form must be 'auto', 'primal', 'collapsed' or 'full', got {form!r}")
    if form == "primal" or (form == "auto" and q >= p_reduced) or form == "full":
        if p_pen <= n - p_u or form == "full":
            return Criterion(data, None)
        Q, _, U, s = _penalised_svd(X, pen)
        Xr = np.column_stack([X[:, ~pen], U * s])
        pen_r = np.r_[np.zeros(p_u), np.ones(s.size)]
        xp = cross_products(data.struct, np.column_stack([Xr, y]))
        return Criterion(data._replace(X=jnp.asarray(Xr, dtype), pen=jnp.asarray(pen_r, dtype),
                                       xp=xp), None)  # fmt: skip
    Q, logdet_u, U, s = _penalised_svd(X, pen)
    rows, cols, vals, offset = [], [], [], 0
    for refs, z, m in zip(data.refs, data.z, levels, strict=True):
        refs, z = np.asarray(refs), np.asarray(z, dtype=float)
        d = z.shape[1]
        rows.append(np.repeat(np.arange(n), d))
        cols.append((offset + refs[:, None] * d + np.arange(d)).reshape(-1))
        vals.append(z.reshape(-1))
        offset += m * d
    Z = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, q)
    )
    zq = np.asarray(Z.T @ Q)
    qy = Q.T @ y
    zu = np.asarray(Z.T @ U)
    arrays = {
        "zmz": (Z.T @ Z).toarray() - zq @ zq.T, "zmy": Z.T @ y - zq @ qy,
        "ymy": y @ y - qy @ qy, "uz": zu.T, "uy": U.T @ y, "sv2": s**2, "logdet_u": logdet_u,
        "n": float(n), "n_flat": float(p_u),
    }  # fmt: skip
    coll = Collapsed(**{k: jnp.asarray(v, dtype) for k, v in arrays.items()},
                     nlevels=data.nlevels)  # fmt: skip
    return Criterion(coll, levels)


def _unpack(phi: jax.Array, dims: tuple[int, ...]):
    """``phi -> (sigma^2, [L_l])`` with ``L_l`` lower triangular, positive diagonal."""
    s2 = jnp.exp(phi[0])
    k, chols, logdiags = 1, [], []
    for d in dims:
        n = d * (d + 1) // 2
        rows, cols = np.tril_indices(d)
        L = jnp.zeros((d, d), phi.dtype).at[rows, cols].set(phi[k : k + n])
        logdiag = jnp.diagonal(L)
        L = L - jnp.diag(logdiag) + jnp.diag(jnp.exp(logdiag))
        chols.append(L)
        logdiags.append(logdiag)
        k += n
    return s2, chols, logdiags


def pack(params: Params) -> np.ndarray:
    """``(sigma^2, Sigma_l) -> phi``, the inverse of :func:`_unpack`."""
    out = [np.log(float(params.sigma2))]
    for S in params.covs:
        L = np.linalg.cholesky(np.asarray(S, dtype=float))
        L[np.diag_indices_from(L)] = np.log(np.diag(L))
        out.extend(L[np.tril_indices(L.shape[0])])
    return np.asarray(out)


def _iw_logpdf(L: jax.Array, kappa, A: jax.Array) -> jax.Array:
    """IW log density at ``Sigma = L L'``, ``eta = kappa - d - 1``, ``Phi = kappa A``."""
    d = L.shape[0]
    nu = kappa - d - 1.0
    logdet_phi = d * jnp.log(kappa) + jnp.sum(jnp.log(A))
    logdet_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
    tr = kappa * jnp.sum(solve_triangular(L, jnp.diag(jnp.sqrt(A)), lower=True) ** 2)
    return (
        0.5 * nu * logdet_phi - 0.5 * nu * d * jnp.log(2.0) - multigammaln(0.5 * nu, d)
        - 0.5 * (nu + d + 1.0) * logdet_s - 0.5 * tr
    )  # fmt: skip


def _prior_and_jacobian(phi, s2, chols, logdiags, hyper: Hyper, nlevels) -> jax.Array:
    """Log priors of ``sigma^2`` and each ``Sigma_l`` plus the log Jacobian of ``phi``."""
    prior = -hyper.s0 / s2
    jac = phi[0]
    for L, logdiag, A, b, kappa in zip(
        chols, logdiags, hyper.A, hyper.b, kappas(hyper, nlevels), strict=True
    ):
        d = L.shape[0]
        iw = _iw_logpdf(L, jnp.where(b > 0, kappa, 2.0 * d + 1.0), A)
        prior = prior + jnp.where(b > 0, iw, 0.0)
        jac = jac + d * jnp.log(2.0) + jnp.sum((d + 1.0 - jnp.arange(d)) * logdiag)
    return prior + jac


def _loglik_primal(s2, chols, data: EmData, hyper: Hyper) -> jax.Array:
    """``log p(y | sigma^2, Sigma, lambda)`` with gamma then beta integrated out (p x p ``P``)."""
    sigma = jnp.sqrt(s2)
    logdet_v, G = gls_gram(data.struct, tuple(L / sigma for L in chols), data.xp)
    n, p = data.X.shape
    on = hyper.lam > 0
    lam = jnp.where(on, hyper.lam, 1.0)
    pen = jnp.where(on, data.pen, 0.0)
    Lp = jnp.linalg.cholesky(G[:p, :p] + jnp.diag(lam * pen))
    w = solve_triangular(Lp, G[:p, p], lower=True)
    quad = G[p, p] - w @ w
    p_pen = jnp.sum(pen)
    return (
        -0.5 * (n - (p - p_pen)) * jnp.log(2 * jnp.pi * s2) - 0.5 * logdet_v
        - jnp.sum(jnp.log(jnp.diagonal(Lp))) + 0.5 * p_pen * jnp.log(lam) - 0.5 * quad / s2
    )  # fmt: skip


def _lambda_t(M: jax.Array, lams, levels: tuple[int, ...]) -> jax.Array:
    """``Lambda' M`` for the block-diagonal ``Lambda`` (term by term, level-major), M (q, k)."""
    out, k = [], 0
    for L, m in zip(lams, levels, strict=True):
        d = L.shape[0]
        blk = M[k : k + m * d].reshape(m, d, -1)
        out.append(jnp.einsum("ca,mck->mak", L, blk).reshape(m * d, -1))
        k += m * d
    return jnp.concatenate(out, axis=0)


def _loglik_collapsed(s2, chols, data: Collapsed, lam, levels: tuple[int, ...]) -> jax.Array:
    """The same log likelihood as :func:`_loglik_primal` with beta integrated out first.

    ``M_lambda = M_u - U diag(s^2 / (s^2 + lambda)) U'`` is the ridge's
    residual maker, so with ``R = Z' M_lambda Z`` (q x q) and
    ``A_R = I + Lambda' R Lambda``:
    ``-2 log p = (N - p_u) log(2 pi sigma^2) + log|X_u'X_u| + sum log(1 + s^2 / lambda)
    + log|A_R| + (y'M_lambda y - r' Lambda A_R^{-1} Lambda' r) / sigma^2``,
    ``r = Z' M_lambda y``. Only q x q arrays depend on the variances.
    """
    sigma = jnp.sqrt(s2)
    lams = tuple(L / sigma for L in chols)
    w = data.sv2 / (data.sv2 + lam)
    R = data.zmz - data.uz.T @ (w[:, None] * data.uz)
    rz = data.zmy - data.uz.T @ (w * data.uy)
    yy = data.ymy - jnp.sum(w * data.uy**2)
    lr = _lambda_t(R, lams, levels)
    A = _lambda_t(lr.T, lams, levels) + jnp.eye(R.shape[0], dtype=R.dtype)
    L = jnp.linalg.cholesky(A)
    t = solve_triangular(L, _lambda_t(rz[:, None], lams, levels)[:, 0], lower=True)
    logdet_a = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
    return -0.5 * (
        (data.n - data.n_flat) * jnp.log(2 * jnp.pi * s2) + data.logdet_u
        + jnp.sum(jnp.log1p(data.sv2 / lam)) + logdet_a + (yy - t @ t) / s2
    )  # fmt: skip


def log_marginal(phi: jax.Array, data, hyper: Hyper, *, levels=None) -> jax.Array:
    """``l(phi)``: log p(y, phi | Theta) with beta and gamma integrated out, plus the log Jacobian.

    ``data`` is the :class:`EmData` of the primal form (``levels`` None) or
    the :class:`Collapsed` form (``levels`` each term's number of levels,
    static); :func:`criterion_data` picks the cheaper. A term with
    ``b_l = 0`` has a flat prior on ``Sigma_l``; the prior of a term with
    ``b_l`` at or below :func:`b_lower_bound` is improper, which the Laplace
    value reports as NaN.
    """
    dims = tuple(a.shape[0] for a in hyper.A)
    s2, chols, logdiags = _unpack(phi, dims)
    if levels is None:
        loglik = _loglik_primal(s2, chols, data, hyper)
    else:
        loglik = _loglik_collapsed(s2, chols, data, hyper.lam, levels)
    return loglik + _prior_and_jacobian(phi, s2, chols, logdiags, hyper, data.nlevels)


def _hessian(fn, data, levels):
    """The Hessian in ``phi``: forward over reverse, or reverse over reverse for the primal
    form of a model with several terms, whose dense Schur block goes through
    :func:`lmmjax.linalg.logdet_quad` (a custom reverse rule, no forward one)."""
    if levels is None and len(data.struct.refs) > 1:  # several terms: a dense Schur block
        return jax.jacrev(jax.grad(fn))
    return jax.hessian(fn)


def _newton(phi0, data, hyper, *, levels=None, maxiter: int = 100):
    """Damped Newton ascent to the mode of :func:`log_marginal`, one :func:`jax.lax.while_loop`.

    Each step solves with ``-H`` whose eigenvalues are raised to at least
    ``1e-6`` of the largest (a k x k eigendecomposition, k = len(phi)), then
    halves the step until ``l`` does not decrease. Stops when ``l`` changes by
    less than ``1e-12`` relative at a negative definite ``H``, the gradient
    is below ``1e-8``, or no step can be taken.

    Returns
    -------
    phi, l, H : arrays
        The mode, ``l`` and its Hessian there.
    ok : bool array
        Whether ``l``, its gradient and ``H`` are finite at the end.
    """
    fn = partial(log_marginal, levels=levels)
    hess = _hessian(fn, data, levels)

    def vgh(phi):
        f, g = jax.value_and_grad(fn)(phi, data, hyper)
        return f, g, hess(phi, data, hyper)

    def finite(f, g, H):
        return jnp.isfinite(f) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(H))

    def body(state):
        it, phi, f, g, H, _ = state
        w, V = jnp.linalg.eigh(-0.5 * (H + H.T))
        floor = 1e-6 * jnp.maximum(jnp.max(jnp.abs(w)), 1.0)
        step = V @ ((V.T @ g) / jnp.maximum(w, floor))
        tol = 1e-12 * jnp.abs(f)

        def worse(ls):
            t, fc = ls
            return (t > 1e-10) & ~(jnp.isfinite(fc) & (fc >= f - tol))

        def halve(ls):
            t, _ = ls
            return 0.5 * t, fn(phi + 0.5 * t * step, data, hyper)

        one = jnp.ones((), phi.dtype)
        t, fc = lax.while_loop(worse, halve, (one, fn(phi + step, data, hyper)))
        moved = jnp.isfinite(fc) & (fc >= f - tol)
        phi_new = jnp.where(moved, phi + t * step, phi)
        f_new, g_new, H_new = vgh(phi_new)
        small = jnp.abs(f_new - f) <= 1e-12 * jnp.maximum(1.0, jnp.abs(f))
        stop = (
            ~moved | ~finite(f_new, g_new, H_new) | (small & jnp.all(w > floor))
            | (jnp.max(jnp.abs(g_new)) < 1e-8)
        )  # fmt: skip
        return it + 1, phi_new, f_new, g_new, H_new, stop

    f, g, H = vgh(phi0)
    state = (jnp.asarray(0), phi0, f, g, H, ~finite(f, g, H))
    _, phi, f, g, H, _ = lax.while_loop(lambda s: (s[0] < maxiter) & ~s[5], body, state)
    return phi, f, H, finite(f, g, H)


def _mode(phi0: np.ndarray, crit: Criterion, hyper: Hyper):
    """The mode of :func:`log_marginal` by :func:`_newton` (compiled once per shape).

    Returns ``(phi*, l*, H*)`` with ``l*`` NaN when the ascent failed.
    """
    phi = jnp.asarray(phi0, hyper.lam.dtype)
    run, _ = compiled(_newton, phi, crit.data, hyper, levels=crit.levels)
    phi, f, H, ok = run(phi, crit.data, hyper)
    return phi, (float(f) if bool(ok) else float("nan")), np.asarray(H, dtype=float)


def _laplace_and_grad(phi, data, hyper, *, levels=None):
    """The Laplace value at the mode ``phi`` and its gradient in the hyperparameters.

    With ``g(phi, Theta) = l + k/2 log(2 pi) - 1/2 log|-H|`` and the mode
    ``phi*(Theta)`` (``l_phi = 0``, so ``dphi*/dTheta = -H^{-1} l_phi,Theta``),
    ``dL/dTheta = g_Theta - (H^{-1} g_phi)' l_phi,Theta``: one reverse pass
    through ``g`` (third derivatives of ``l``) and one vector-Jacobian product
    of ``l_phi`` in ``Theta``.

    Returns
    -------
    value : scalar
    grad : Hyper
        ``dL/dTheta`` (``s0`` included, unused).
    """
    fn = partial(log_marginal, levels=levels)
    grad_phi = jax.grad(fn)

    def g(phi, hyper):
        H = _hessian(fn, data, levels)(phi, data, hyper)
        neg = -0.5 * (H + H.T)
        chol = jnp.linalg.cholesky(neg)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        value = fn(phi, data, hyper) + 0.5 * phi.shape[0] * jnp.log(2 * jnp.pi) - 0.5 * logdet
        return value, chol

    (value, chol), (g_phi, g_hyper) = jax.value_and_grad(g, argnums=(0, 1), has_aux=True)(
        phi, hyper
    )
    v = -cho_solve((chol, True), g_phi)  # H^{-1} g_phi with H = -chol chol'
    _, vjp = jax.vjp(lambda h: grad_phi(phi, data, h), hyper)
    (corr,) = vjp(v)
    return value, jax.tree.map(lambda a, c: a - c, g_hyper, corr)


def _search_point(phi0, data, hyper, *, levels=None):
    """One point of the search as one compiled program: the mode by :func:`_newton` from
    ``phi0``, the Laplace value there (NaN when the ascent failed) and its gradient."""
    phi, _, _, ok = _newton(phi0, data, hyper, levels=levels)
    value, grad = _laplace_and_grad(phi, data, hyper, levels=levels)
    return phi, jnp.where(ok, value, jnp.nan), grad


def laplace_value(phi_star, f_star: float, H: np.ndarray) -> float:
    """``l(phi*) + k/2 log(2 pi) - 1/2 log|-H|`` (NaN when ``-H`` is not positive definite)."""
    sign, logdet = np.linalg.slogdet(-0.5 * (H + H.T))
    if sign <= 0 or not np.isfinite(f_star):
        return float("nan")
    return float(f_star + 0.5 * len(phi_star) * np.log(2 * np.pi) - 0.5 * logdet)


def _proper(hyper: Hyper, data: EmData) -> bool:
    """Whether every term's inverse-Wishart prior is proper or flat (``b = 0``)."""
    return all(
        float(b) == 0.0 or float(b) > b_lower_bound(a.shape[0], float(m))
        for b, a, m in zip(hyper.b, hyper.A, data.nlevels, strict=True)
    )


def laplace_at(
    data: EmData, hyper: Hyper, params: Params, crit: Criterion | None = None
) -> float | None:
    """The Laplace log marginal likelihood at ``hyper``, Newton started from ``params``.

    None when some inverse-Wishart prior is improper (``0 < b_l <= 2d/(m+2d)``).
    ``crit`` defaults to :func:`criterion_data` of ``data``.
    """
    if not _proper(hyper, data):
        return None
    if crit is None:
        crit = criterion_data(data, flat=not float(hyper.lam) > 0)
    phi, f, H = _mode(pack(params), crit, hyper)
    value = laplace_value(phi, f, H)
    return value if np.isfinite(value) else None


# ------------------------------------------------------------ the search
def _to_hyper(spec: HyperSpec, free: np.ndarray, data: EmData, s0: float) -> Hyper:
    """Map the free vector (log lambda, logit b, log A entries for the 'auto' ones) to Hyper."""
    k = 0
    dtype = data.X.dtype
    if spec.lam is None:
        lam, k = float(np.exp(free[0])), 1
    else:
        lam = spec.lam
    bs, As = [], []
    for b, m, a in zip(spec.b, data.nlevels, spec.A_start, strict=True):
        if b is None:
            lo = b_lower_bound(len(a), float(m))
            b, k = lo + (1 - lo) / (1 + np.exp(-free[k])), k + 1
        bs.append(jnp.asarray(b, dtype))
    for a, a0 in zip(spec.A, spec.A_start, strict=True):
        if a is None:
            a, k = np.exp(free[k]) * a0, k + 1
        As.append(jnp.asarray(a, dtype))
    return Hyper(jnp.asarray(lam, dtype), tuple(bs), tuple(As), jnp.asarray(s0, dtype))


def _start_free(spec: HyperSpec) -> np.ndarray:
    free = [0.0] if spec.lam is None else []
    free += [0.0 for b in spec.b if b is None]
    free += [0.0 for a in spec.A if a is None]
    return np.asarray(free, dtype=float)


START_GRID = (-2.0, 0.0, 2.0)
"""Starting values of each ``"auto"`` b's logit and log a (moved together): the criterion
can have a maximum at small b and another at b -> 1 (``Sigma = A``), as in the issue's
p = 500 experiment, so L-BFGS-B starts from the best of these points."""


def _start_grid(spec: HyperSpec) -> list[np.ndarray]:
    """The free vectors of :data:`START_GRID` (``log lambda`` starts at 0)."""
    nb = sum(b is None for b in spec.b)
    na = sum(a is None for a in spec.A)
    lam = np.zeros(int(spec.lam is None))
    return [
        np.r_[lam, np.full(nb, xb), np.full(na, xa)]
        for xb in (START_GRID if nb else (0.0,))
        for xa in (START_GRID if na else (0.0,))
    ]


def _free_grad(spec: HyperSpec, free: np.ndarray, hyper: Hyper, grad: Hyper, nlevels) -> np.ndarray:
    """Chain rule from ``dL/dTheta`` to the free vector of :func:`_to_hyper`."""
    out, k = [], 0
    if spec.lam is None:
        out.append(float(grad.lam) * float(hyper.lam))
        k = 1
    for b, m, a, gb in zip(spec.b, nlevels, spec.A_start, grad.b, strict=True):
        if b is None:
            lo = b_lower_bound(len(a), float(m))
            sig = 1.0 / (1.0 + np.exp(-free[k]))
            out.append(float(gb) * (1.0 - lo) * sig * (1.0 - sig))
            k += 1
    for a, A, gA in zip(spec.A, hyper.A, grad.A, strict=True):
        if a is None:
            out.append(float(np.sum(np.asarray(gA) * np.asarray(A))))
    return np.asarray(out, dtype=float)


def choose_hyper(data: EmData, spec: HyperSpec, s0: float, opts: MapOptions):
    """Hyperparameters: the fixed ones as given, the ``"auto"`` ones maximising the Laplace value.

    L-BFGS-B over the free vector (``log lambda``, a logit of each ``b`` above
    its lower bound, ``log a``), each component in [-15, 15], from the best
    point of :data:`START_GRID`; at each point
    the mode ``phi*`` comes from damped Newton steps warm-started at the last
    mode, and the gradient from :func:`_laplace_and_grad` (implicit
    differentiation through the mode). The likelihood is in the cheaper
    exact form of :func:`criterion_data`.

    Returns
    -------
    hyper : Hyper
    laplace : float or None
        The Laplace log marginal at the chosen hyperparameters (None when
        nothing was searched; :func:`lmmjax.em.fit.fit_map` computes it then).
    search : dict
        ``evaluations`` of the criterion, ``seconds`` spent, whether the
        search ``converged`` and the ``form`` of the criterion; empty when
        nothing was searched.
    """
    free0 = _start_free(spec)
    if free0.size == 0:
        return _to_hyper(spec, free0, data, s0), None, {}
    start = time.perf_counter()
    crit = criterion_data(data, flat=spec.lam == 0)
    hyper0 = _to_hyper(spec, free0, data, s0)
    params = start_params(data, [np.diag(a) for a in spec.A_start])
    trace = run_em_at(data, hyper0, params, maxiter=min(opts.maxiter, 500), tol=1e-8)
    phi_em = pack(trace.params)
    state = {"phi": phi_em, "n": 0, "last": 0.0}
    evaluate, _ = compiled(
        _search_point, jnp.asarray(phi_em, hyper0.lam.dtype), crit.data, hyper0,
        levels=crit.levels,
    )  # fmt: skip

    def laplace(free, phi0):
        """The Laplace value (None when improper or not found), mode and gradient at ``free``."""
        state["n"] += 1
        hyper = _to_hyper(spec, free, data, s0)
        if not _proper(hyper, data):
            return None, hyper, None, None
        phi, value, grad = evaluate(jnp.asarray(phi0, hyper.lam.dtype), crit.data, hyper)
        value = float(value)
        return (value if np.isfinite(value) else None), hyper, np.asarray(phi), grad

    def objective(free):
        value, hyper, phi, grad = laplace(free, state["phi"])
        if value is None:
            return abs(state["last"]) + 1e6, np.zeros_like(free)
        state["phi"], state["last"] = phi, value
        return -value, -_free_grad(spec, free, hyper, grad, data.nlevels)

    grid = []
    for x0 in _start_grid(spec):
        value, _, phi, _ = laplace(x0, phi_em)
        if value is not None:
            grid.append((-value, len(grid), x0, phi))
    _, _, x0, phi = min(grid, key=lambda g: g[:2]) if grid else (0, 0, free0, phi_em)
    state["phi"], state["last"] = phi, 0.0
    best = scipy.optimize.minimize(
        objective, x0, jac=True, method="L-BFGS-B", bounds=[(-15.0, 15.0)] * free0.size,
        options={"maxiter": 200, "ftol": 1e-10, "gtol": 1e-6},
    )  # fmt: skip
    hyper = _to_hyper(spec, best.x, data, s0)
    search = {
        "evaluations": state["n"],
        "seconds": time.perf_counter() - start,
        "converged": bool(best.success),
        "form": "primal" if crit.levels is None else "collapsed",
    }
    return hyper, float(-best.fun), search

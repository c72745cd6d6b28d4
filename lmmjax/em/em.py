"""EM for the MAP of ``(beta, sigma^2, Sigma)``: E-step from linalg, closed-form M-step.

E-step: ``E[gamma_l | y]`` and the per-level blocks of ``Cov[gamma_l | y]`` at the
current parameters, from :func:`lmmjax.linalg.conditional_moments` (the one
blocked factorisation; nothing here factors ``A`` again).

M-step (the joint maximiser of the expected complete log posterior):

* ``beta``: the ridge system ``(X'X + lambda D) beta = X'(y - Z E[gamma])``
  (``D`` marks the penalised columns), solved through a Cholesky factor of the
  p x p system, or when ``p > N`` of its N x N dual (:class:`Ridge`);
  the factor is computed once per fit since ``lambda`` is fixed in EM.
* ``sigma^2 = (E||y - X beta - Z gamma||^2 + lambda ||D beta||^2 + 2 s0) / (N + p_pen)``
  with ``E||.||^2 = ||y - X beta - Z E[gamma]||^2 + sigma_old^2 (q - tr A^{-1})``
  and ``tr A^{-1} = sum_{l,i} tr(Cov[gamma_li | y] Sigma_l^{-1})``, so only the
  diagonal blocks are needed (``p_pen = 0`` when ``lambda = 0``).
* ``Sigma_l = b_l A_l + (1 - b_l) (1 / m_l) sum_i E[gamma_li gamma_li' | y]``.

:func:`run_em` runs the iterations in one compiled :func:`jax.lax.while_loop`
and records the log posterior of every iterate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import cho_solve

from lmmjax.cache import compiled
from lmmjax.em.objective import EmData, Hyper, Params, inv_trace, lambdas_of, log_posterior
from lmmjax.linalg import conditional_moments, z_times

__all__ = [
    "EmTrace", "Ridge", "em_step", "make_ridge", "ridge_solve", "run_em", "run_em_at",
    "start_params",
]  # fmt: skip


class Ridge(NamedTuple):
    """Factors of the ridge system for beta, fixed for one ``lambda``.

    Primal (``dual=False``): ``chol`` is the Cholesky factor of ``X'X + lambda D``.
    Dual (``dual=True``, used when there are more penalised columns than rows):
    with ``X_u`` the unpenalised and ``X_p`` the penalised columns,
    ``G = X_p X_p' + lambda I`` (N x N), ``chol`` its factor, ``gxu = G^{-1} X_u`` and
    ``chol_u`` the factor of ``X_u' G^{-1} X_u``; then
    ``beta_u = (X_u' G^{-1} X_u)^{-1} X_u' G^{-1} r`` and
    ``beta_p = X_p' G^{-1} (r - X_u beta_u)``.
    """

    chol: jax.Array
    iu: jax.Array
    ip: jax.Array
    gxu: jax.Array
    chol_u: jax.Array


def make_ridge(X, pen, lam: float) -> tuple[Ridge, bool]:
    """Factor the ridge system for beta at penalty ``lam``.

    Parameters
    ----------
    X : array (N, p)
    pen : array (p,)
        1 for penalised columns.
    lam : float
        Penalty (>= 0).

    Returns
    -------
    ridge : Ridge
    dual : bool
        Whether the N x N dual is used (more penalised columns than rows and
        ``lam > 0``); it is then the smaller system.
    """
    X = jnp.asarray(X)
    n, p = X.shape
    pen_np = np.asarray(pen) > 0
    iu, ip = np.flatnonzero(~pen_np), np.flatnonzero(pen_np)
    dual = bool(lam > 0 and ip.size > n)
    empty = jnp.zeros((0, 0), X.dtype)
    if not dual:
        chol = jnp.linalg.cholesky(X.T @ X + lam * jnp.diag(jnp.asarray(pen, X.dtype)))
        return Ridge(chol, jnp.asarray(iu), jnp.asarray(ip), empty, empty), False
    Xu, Xp = X[:, iu], X[:, ip]
    chol = jnp.linalg.cholesky(Xp @ Xp.T + lam * jnp.eye(n, dtype=X.dtype))
    gxu = cho_solve((chol, True), Xu)
    chol_u = jnp.linalg.cholesky(Xu.T @ gxu) if iu.size else empty
    return Ridge(chol, jnp.asarray(iu), jnp.asarray(ip), gxu, chol_u), True


def ridge_solve(ridge: Ridge, X: jax.Array, r: jax.Array, *, dual: bool) -> jax.Array:
    """The minimiser of ``||r - X beta||^2 + lambda ||D beta||^2`` (no inverse formed)."""
    if not dual:
        return cho_solve((ridge.chol, True), X.T @ r)
    beta = jnp.zeros(X.shape[1], dtype=X.dtype)
    rr = r
    if ridge.iu.size:
        beta_u = cho_solve((ridge.chol_u, True), ridge.gxu.T @ r)
        beta = beta.at[ridge.iu].set(beta_u)
        rr = r - X[:, ridge.iu] @ beta_u
    beta_p = X[:, ridge.ip].T @ cho_solve((ridge.chol, True), rr)
    return beta.at[ridge.ip].set(beta_p)


def _sym(S: jax.Array) -> jax.Array:
    return 0.5 * (S + S.T)


def em_step(params: Params, data: EmData, hyper: Hyper, ridge: Ridge, *, dual: bool) -> Params:
    """One EM iteration (E-step by :func:`lmmjax.linalg.conditional_moments`, closed-form M-step).

    Parameters
    ----------
    params : Params
        Current iterate.
    data : EmData
    hyper : Hyper
    ridge : Ridge
        From :func:`make_ridge` at ``hyper.lam``.
    dual : bool (static)

    Returns
    -------
    Params
        The next iterate.
    """
    beta, s2, covs = params
    lambdas = lambdas_of(covs, s2)
    mom = conditional_moments(data.struct, lambdas, data.xp.residual(beta), jnp.sqrt(s2), cov=True)
    r = data.y - z_times(data.refs, data.z, mom.mean)
    beta_new = ridge_solve(ridge, data.X, r, dual=dual)
    res = r - data.X @ beta_new
    q = sum(m.size for m in mom.mean)
    second = [m.T @ m + jnp.sum(c, axis=0) for m, c in zip(mom.mean, mom.cov, strict=True)]
    tr_ainv = sum(
        inv_trace(jnp.linalg.cholesky(S), jnp.sum(c, axis=0))
        for S, c in zip(covs, mom.cov, strict=True)
    )
    on = hyper.lam > 0
    penalty = jnp.where(on, hyper.lam * jnp.sum(data.pen * beta_new**2), 0.0)
    num = res @ res + s2 * (q - tr_ainv) + penalty + 2.0 * hyper.s0
    s2_new = num / (data.y.shape[0] + jnp.where(on, jnp.sum(data.pen), 0.0))
    covs_new = tuple(
        _sym(b * jnp.diag(A) + (1.0 - b) * S2 / m)
        for b, A, S2, m in zip(hyper.b, hyper.A, second, data.nlevels, strict=True)
    )
    return Params(beta_new, s2_new, covs_new)


class EmTrace(NamedTuple):
    """Result of :func:`run_em`.

    Attributes
    ----------
    params : Params
        The last iterate.
    iterations : int
        EM iterations run.
    converged : bool
        Whether the relative rise of the log posterior fell below ``tol``.
    history : array (maxiter + 1,)
        Log posterior at the start and after each iteration (NaN past the end).
    """

    params: Params
    iterations: jax.Array
    converged: jax.Array
    history: jax.Array


def run_em(
    params: Params, data: EmData, hyper: Hyper, ridge: Ridge, *, dual: bool, maxiter: int,
    tol: float,
) -> EmTrace:  # fmt: skip
    """EM iterations until the log posterior rises by less than ``tol`` relative to its size.

    One :func:`jax.lax.while_loop`; compile with :func:`lmmjax.cache.compiled`
    (``dual``, ``maxiter`` and ``tol`` static).
    """
    f0 = log_posterior(params, data, hyper)
    history = jnp.full(maxiter + 1, jnp.nan, dtype=f0.dtype).at[0].set(f0)

    def cond(state):
        it, _, f_old, f_new, _ = state
        small = jnp.abs(f_new - f_old) <= tol * jnp.maximum(jnp.abs(f_new), 1.0)
        return (it < maxiter) & ((it == 0) | ~small)

    def body(state):
        it, p, _, f_new, hist = state
        p_next = em_step(p, data, hyper, ridge, dual=dual)
        f_next = log_posterior(p_next, data, hyper)
        return it + 1, p_next, f_new, f_next, hist.at[it + 1].set(f_next)

    it, p, f_old, f_new, history = lax.while_loop(
        cond, body, (jnp.asarray(0), params, f0, f0, history)
    )
    converged = jnp.abs(f_new - f_old) <= tol * jnp.maximum(jnp.abs(f_new), 1.0)
    return EmTrace(p, it, converged, history)


def start_params(data: EmData, covs: list) -> Params:
    """Starting point: least-squares beta, half the residual variance, and ``covs``."""
    X, y = np.asarray(data.X), np.asarray(data.y)
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    s2 = 0.5 * float(np.var(y - X @ beta)) + 1e-12 * max(float(np.var(y)), 1.0)
    dtype = data.X.dtype
    return Params(
        jnp.asarray(beta, dtype), jnp.asarray(s2, dtype), tuple(jnp.asarray(c, dtype) for c in covs)
    )


def run_em_at(data: EmData, hyper: Hyper, params: Params, *, maxiter: int, tol: float) -> EmTrace:
    """EM at fixed hyperparameters, compiled once per shape (:func:`lmmjax.cache.compiled`)."""
    ridge, dual = make_ridge(data.X, data.pen, float(hyper.lam))
    run, _ = compiled(run_em, params, data, hyper, ridge, dual=dual, maxiter=maxiter, tol=tol)
    return run(params, data, hyper, ridge)

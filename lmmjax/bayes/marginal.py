"""Marginal log-likelihood of the Bayesian LMM.

A pure ``jax.numpy`` function of the constrained parameters and a data
pytree, jit-compatible and differentiable:

* the sampled (not marginalised) classes enter through the residual
  ``r = y - X beta - sum_{l not in S} Z_l b_l`` (gathers, O(N d));
* the marginalised classes S are integrated out with
  :func:`lmmjax.linalg.gls_gram` on the blocked factorisation (one class:
  block-diagonal Woodbury, O(N d^2 + M d^3); several: the blocked Cholesky
  with its dense Schur block);
* when every class is marginalised the residual is ``y - X beta`` and its
  cross products come from the precomputed ``Z' [X y]`` (``KernelData.xp``),
  so no evaluation touches the N rows (nor holds them: data streamed from
  Parquet give the same structure and products from sums over row batches,
  :mod:`lmmjax.stream`, and ``y``, ``X`` are then empty); if moreover every
  covariance is a known constant times one scale,
  :func:`lmmjax.linalg.eigen_gls_gram` costs O(q p).

With ``Sigma_l = C_l C_l'`` (``C_l`` the Cholesky factor of term l's
covariance) the relative factors are ``Lambda_l = C_l / sigma``, the
covariance of ``r`` is ``sigma^2 V`` with ``V = I + Z Lambda Lambda' Z'``, and

    log p(y | .) = -1/2 [N log(2 pi sigma^2) + log|V| + r' V^{-1} r / sigma^2] + log_jac,

where ``log_jac`` is ``-sum(log y)`` for the LogNormal likelihood (the
model is Normal on ``log y``) and zero otherwise.

When sigma has its own linear predictor, row i has SD ``sigma_i`` and the
covariance of ``r`` is ``D + Z C C' Z'`` with ``D = diag(sigma_i^2)``. With
``S = D^{-1/2}``, ``S (D + Z C C' Z') S = I + (S Z) C C' (S Z)'``: the same
kernels on the row-scaled structure (:func:`lmmjax.linalg.scale_rows`, O(N d^2)
per evaluation) with the absolute factors ``C_l`` and the scaled residual
``S r``, plus ``log|D| = 2 sum log sigma_i``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmmjax.linalg import (
    ColumnMap,
    CrossProducts,
    EigenSystem,
    Structure,
    cross_products,
    eigen_gls_gram,
    gls_gram,
    linear_predictor,
    scale_rows,
    z_times,
)

__all__ = [
    "KernelData",
    "marginal_loglik",
    "relative_factors",
    "residual",
    "residual_products",
    "row_scaled_products",
]

_LOG_2PI = float(np.log(2.0 * np.pi))


class KernelData(NamedTuple):
    """Data of the marginal likelihood, a JAX pytree (pass it as an argument).

    Attributes
    ----------
    y : array (N,)
        Response on the modelling scale (``log y`` for the LogNormal likelihood).
    X : array (N, p)
        Fixed-effect design.
    log_jac : scalar
        Log-Jacobian of the response transform (``-sum(log y)`` or 0).
    struct : Structure or None
        Blocked system of the marginalised terms (None when none is marginalised).
    xp : CrossProducts or None
        ``Z' [X y]`` and ``[X y]' [X y]`` when every term is marginalised: the
        residual's cross products are then ``xp.residual(beta)``, and an
        evaluation never touches the N rows.
    refs, z : tuples of arrays
        Level index and lhs columns of every term, in model order.
    eig : EigenSystem or None
        Fast-path precomputation (then ``struct`` holds every term).
    sigma_X : array (N, p_s) or None
        Fixed-effect columns of the ``log sigma`` formula, when sigma has one.
    sigma_refs, sigma_z : tuples of arrays
        Its random-effect terms.
    cols, cmap : array (N, K) and ColumnMap
        The distinct columns of ``X`` and the ``z`` (:func:`lmmjax.linalg.column_map`),
        for the linear predictor of the sampled classes.
    x_shift : array (p,) or None
        With centred sampling (``BayesSpec.intercept >= 0``): the column means of
        ``X``, zero at the intercept (see :func:`lmmjax.bayes.model.user_beta`).
    """

    y: jax.Array
    X: jax.Array
    log_jac: jax.Array
    struct: Structure | None
    xp: CrossProducts | None
    refs: tuple
    z: tuple
    eig: EigenSystem | None
    sigma_X: jax.Array | None = None
    sigma_refs: tuple = ()
    sigma_z: tuple = ()
    cols: jax.Array | None = None
    cmap: ColumnMap | None = None
    x_shift: jax.Array | None = None


def residual(beta, effects, data: KernelData) -> jax.Array:
    """``y - X beta - sum_l Z_l b_l`` over the terms whose effects are given (None: skipped)."""
    if data.cmap is None:
        return data.y - data.X @ beta - z_times(data.refs, data.z, effects)
    return data.y - linear_predictor(data.cols, data.cmap, beta, data.refs, effects)


def residual_products(beta, effects, data: KernelData) -> CrossProducts:
    """Cross products of the residual with the marginalised terms.

    O(p q) from the precomputed ``data.xp`` when every term is marginalised,
    O(N d) segment sums otherwise.
    """
    if data.xp is not None:
        return data.xp.residual(beta)
    return cross_products(data.struct, residual(beta, effects, data))


def relative_factors(cov_factors, sigma) -> tuple:
    """``Lambda_l = C_l / sigma``: covariance factors relative to the residual SD."""
    return tuple(c / sigma for c in cov_factors)


def marginal_loglik(
    beta,
    sigma,
    cov_factors,
    effects,
    data: KernelData,
    marginal: tuple[bool, ...],
    fast: bool = False,
    scale=1.0,
    log_sigma=None,
) -> jax.Array:
    """Log-likelihood of the data with the classes flagged in ``marginal`` integrated out.

    Parameters
    ----------
    beta : array (p,)
        Fixed effects.
    sigma : scalar
        Residual standard deviation (on the modelling scale).
    cov_factors : tuple of arrays (d_l, d_l)
        Every term's covariance Cholesky factor ``C_l``.
    effects : tuple
        Per term, its (M_l, d_l) effects ``b_l`` when sampled, None when marginalised.
    data : KernelData
    marginal : tuple of bool (static)
        Which terms are integrated out.
    fast : bool (static)
        Use the eigendecomposition fast path (requires ``data.eig``).
    scale : scalar
        Common multiplier of the fast path's fixed covariance factors.
    log_sigma : array (N,), optional
        Per-row ``log sigma_i``, which then replaces ``sigma`` (pass None).

    Returns
    -------
    scalar
        ``log p(y | beta, sigma, Sigma, b_sampled)`` including the response Jacobian.
    """
    n = data.y.shape[0] if data.struct is None else data.struct.nobs  # streamed: y is empty
    if log_sigma is not None:
        return _rowwise_loglik(beta, log_sigma, cov_factors, effects, data, marginal)
    if fast:
        logdet_V, gram = eigen_gls_gram(data.eig, scale / sigma, data.eig.products.residual(beta))
    elif any(marginal):
        sub = tuple(c for c, m in zip(cov_factors, marginal, strict=True) if m)
        lambdas = relative_factors(sub, sigma)
        xp = residual_products(beta, effects, data)
        logdet_V, gram = gls_gram(data.struct, lambdas, xp)
    else:
        r = residual(beta, effects, data)
        logdet_V, gram = 0.0, jnp.dot(r, r)[None, None]
    quad = gram[0, 0]
    loglik = -0.5 * (n * (_LOG_2PI + 2.0 * jnp.log(sigma)) + logdet_V + quad / sigma**2)
    return loglik + data.log_jac


def row_scaled_products(beta, effects, data: KernelData, log_sigma):
    """The structure of ``diag(1 / sigma_i) Z`` and the cross products of ``r / sigma_i``.

    With these, the marginalised classes are those of an LMM with unit residual
    SD and absolute covariance factors (see the module docstring); shared by
    the likelihood and the exact recovery.
    """
    s = jnp.exp(-log_sigma)
    struct = scale_rows(data.struct, s)
    return struct, cross_products(struct, s * residual(beta, effects, data))


def _rowwise_loglik(beta, log_sigma, cov_factors, effects, data: KernelData, marginal):
    """``marginal_loglik`` with one residual SD per row (see the module docstring)."""
    if any(marginal):
        struct, xp = row_scaled_products(beta, effects, data, log_sigma)
        sub = tuple(c for c, m in zip(cov_factors, marginal, strict=True) if m)
        logdet_v, gram = gls_gram(struct, sub, xp)
        quad = gram[0, 0]
    else:
        r = residual(beta, effects, data) * jnp.exp(-log_sigma)
        logdet_v, quad = 0.0, jnp.dot(r, r)
    n = data.y.shape[0]
    loglik = -0.5 * (n * _LOG_2PI + 2.0 * jnp.sum(log_sigma) + logdet_v + quad)
    return loglik + data.log_jac

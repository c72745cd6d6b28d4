"""The model, its priors and the log posterior maximised by EM.

Model: ``y = X beta + sum_l Z_l gamma_l + e`` with ``gamma_{l,i} ~ N(0, Sigma_l)``
for each level ``i`` of grouping factor ``l`` and ``e ~ N(0, sigma^2 I)``.

Priors (conjugate, as Amestoy, van de Wiel & van Wieringen):

* ``beta_pen ~ N(0, sigma^2 / lambda I)`` on the penalised columns, flat on the
  others (the intercept by default); ``lambda = 0`` is a flat prior on all.
* ``Sigma_l ~ IW(eta_l, Phi_l)``, written with the shrinkage weight
  ``b_l = kappa_l / (m_l + kappa_l)``, ``kappa_l = eta_l + d_l + 1``, and the
  scale ``A_l = Phi_l / kappa_l``; the EM update is then
  ``Sigma_l = b_l A_l + (1 - b_l) S_l / m_l``.
* ``p(sigma^2) ∝ exp(-s0 / sigma^2)``: flat in ``sigma^2`` apart from a
  vanishing inverse-gamma tail at zero, ``s0 = 1e-6 Var(y)`` (see
  :data:`SIGMA_PRIOR_SCALE`). Why: a flat prior leaves the MAP of
  ``sigma^2`` at the ML value on a well-identified model (EM with ``b = 0``,
  ``lambda = 0`` reproduces ML), while the ``exp(-s0 / sigma^2)`` factor keeps
  the posterior bounded as ``sigma^2 -> 0``, which the conjugate ridge prior
  (whose normaliser grows like ``sigma^{-p}``) would otherwise allow when
  ``N <= q``. A proper inverse-gamma with a data-free shape would move the
  estimate by ``O(1/N)`` and is not needed: the empirical-Bayes criterion
  integrates ``beta`` out, which removes that ``sigma^{-p}`` growth.

The log posterior :func:`log_posterior` has ``gamma`` integrated out exactly
(``V = I + Z Lambda Lambda' Z'``, ``Lambda_l = chol(Sigma_l) / sigma``, by
:func:`lmmjax.linalg.gls_gram`); EM never lets it decrease.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from lmmjax.linalg import CrossProducts, Structure, gls_gram

__all__ = ["SIGMA_PRIOR_SCALE", "EmData", "Hyper", "Params", "lambdas_of", "log_posterior"]

SIGMA_PRIOR_SCALE = 1e-6
"""``s0 / Var(y)`` of the residual-variance prior ``p(sigma^2) ∝ exp(-s0 / sigma^2)``."""


class Params(NamedTuple):
    """The parameters EM estimates.

    Attributes
    ----------
    beta : array (p,)
    sigma2 : scalar
        Residual variance.
    covs : tuple of arrays (d_l, d_l)
        Each term's random-effect covariance ``Sigma_l``.
    """

    beta: jax.Array
    sigma2: jax.Array
    covs: tuple


class Hyper(NamedTuple):
    """Hyperparameters of the priors.

    Attributes
    ----------
    lam : scalar
        Ridge penalty (0: flat prior on beta).
    b : tuple of scalars
        Each term's shrinkage weight in [0, 1).
    A : tuple of arrays (d_l,)
        Diagonal of each term's prior scale.
    s0 : scalar
        Scale of the residual-variance prior.
    """

    lam: jax.Array
    b: tuple
    A: tuple
    s0: jax.Array


class EmData(NamedTuple):
    """The data EM works on (a pytree; no N x q or N x N array).

    Attributes
    ----------
    X : array (N, p)
    y : array (N,)
    pen : array (p,)
        1 for penalised columns, 0 for columns with a flat prior.
    refs, z : tuples of arrays
        Each term's level index per row and lhs columns.
    struct : Structure
        The Z-only structure of :func:`lmmjax.linalg.build_structure`.
    xp : CrossProducts
        Of ``[X y]``.
    nlevels : tuple of scalars
        Each term's number of levels ``m_l`` (as floats).
    """

    X: jax.Array
    y: jax.Array
    pen: jax.Array
    refs: tuple
    z: tuple
    struct: Structure
    xp: CrossProducts
    nlevels: tuple


def lambdas_of(covs, sigma2) -> tuple:
    """Relative covariance factors ``Lambda_l = chol(Sigma_l) / sigma`` for :mod:`lmmjax.linalg`."""
    sigma = jnp.sqrt(sigma2)
    return tuple(jnp.linalg.cholesky(S) / sigma for S in covs)


def kappas(hyper: Hyper, nlevels) -> tuple:
    """``kappa_l = eta_l + d_l + 1 = b_l m_l / (1 - b_l)``, the prior's weight in levels."""
    return tuple(b * m / (1.0 - b) for b, m in zip(hyper.b, nlevels, strict=True))


def inv_trace(chol: jax.Array, M: jax.Array) -> jax.Array:
    """``tr(Sigma^{-1} M)`` for symmetric ``M`` from ``chol`` of Sigma (two triangular solves)."""
    W = solve_triangular(chol, M, lower=True)
    return jnp.trace(solve_triangular(chol, W.T, lower=True))


def cov_prior_kernel(covs, hyper: Hyper, nlevels) -> jax.Array:
    """``sum_l -kappa_l / 2 (log|Sigma_l| + tr(A_l Sigma_l^{-1}))``: the IW kernel in (b, A)."""
    total = 0.0
    for S, A, kappa in zip(covs, hyper.A, kappas(hyper, nlevels), strict=True):
        L = jnp.linalg.cholesky(S)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
        tr = jnp.sum(solve_triangular(L, jnp.diag(jnp.sqrt(A)), lower=True) ** 2)
        total = total - 0.5 * kappa * (logdet + tr)
    return total


def beta_prior(beta, sigma2, hyper: Hyper, pen) -> jax.Array:
    """Log density of ``beta_pen ~ N(0, sigma^2 / lambda I)`` (0 when ``lambda = 0``)."""
    on = hyper.lam > 0
    lam = jnp.where(on, hyper.lam, 1.0)
    p_pen = jnp.sum(pen)
    value = (
        0.5 * p_pen * jnp.log(lam / (2 * jnp.pi * sigma2))
        - 0.5 * lam * jnp.sum(pen * beta**2) / sigma2
    )
    return jnp.where(on, value, 0.0)


def log_posterior(params: Params, data: EmData, hyper: Hyper) -> jax.Array:
    """Log posterior of ``(beta, sigma^2, Sigma)`` with gamma integrated out, up to a constant.

    ``log N(y; X beta, sigma^2 V) + log p(beta | sigma^2) + log p(sigma^2)
    + sum_l log p(Sigma_l)`` with the inverse-Wishart written as its kernel in
    ``(b, A)`` (its normaliser depends on the hyperparameters only).

    Parameters
    ----------
    params : Params
    data : EmData
    hyper : Hyper

    Returns
    -------
    scalar
    """
    beta, sigma2, covs = params
    n = data.y.shape[0]
    logdet_v, gram = gls_gram(data.struct, lambdas_of(covs, sigma2), data.xp.residual(beta))
    loglik = -0.5 * (n * jnp.log(2 * jnp.pi * sigma2) + logdet_v + gram[0, 0] / sigma2)
    return (
        loglik
        + beta_prior(beta, sigma2, hyper, data.pen)
        - hyper.s0 / sigma2
        + cov_prior_kernel(covs, hyper, data.nlevels)
    )

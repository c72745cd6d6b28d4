"""Marginal log-likelihood kernels of the Bayesian LMM.

Every kernel is a pure ``jax.numpy`` function of the constrained parameters
and a data pytree, jit-compatible and differentiable:

* the sampled (not marginalised) classes enter through the residual
  ``r = y - X beta - sum_{l not in S} Z_l b_l`` (gathers, O(N d));
* the marginalised classes S are integrated out with the blocked
  factorisation of :mod:`lmmjax.linalg` (one class: block-diagonal Woodbury,
  O(N d^2 + M d^3); several: the blocked Cholesky with its dense Schur block);
* when every class is marginalised and every random-effect covariance is a
  known constant (the seed paper's setting), the eigendecomposition of
  ``T' Z' Z T`` is precomputed once and each evaluation costs O(N + D^2).

With ``Sigma_l = C_l C_l'`` (``C_l`` the Cholesky factor of term l's
covariance), the relative factor of the factorisation is
``Lambda_l = C_l / sigma`` and

    log p(y | .) = -1/2 [N log(2 pi sigma^2) + log|A|
                         + (r'r - ||L^{-1} Lambda' Z' r||^2) / sigma^2] + log_jac,

where ``log_jac`` is ``-sum(log y)`` for the LogNormal likelihood (the
model is Normal on ``log y``) and zero otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lmmjax.linalg import Structure, lambda_zt, logdet_and_quad

__all__ = [
    "EigenSystem",
    "KernelData",
    "blocked_loglik",
    "eigen_loglik",
    "eigen_precompute",
    "gram_dense",
    "marginal_loglik",
    "normal_loglik",
    "residual",
    "tzt",
]

_LOG_2PI = float(np.log(2.0 * np.pi))


class EigenSystem(NamedTuple):
    """Precomputed eigendecomposition ``T' Z' Z T = Q diag(lam) Q'`` (fast path).

    Attributes
    ----------
    Q : array (D, D)
        Eigenvectors, D the total number of random effects.
    lam : array (D,)
        Eigenvalues (clipped at zero).
    T : tuple of arrays (d_l, d_l)
        Each term's constant covariance factor ``C_l`` (so ``Sigma_l = C_l C_l'``).
    """

    Q: jax.Array
    lam: jax.Array
    T: tuple


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
        Blocked system of the marginalised terms (None when none is marginalised
        or when the eigen fast path is used).
    refs, z : tuples of arrays
        Level index and lhs columns of every term, in model order.
    eig : EigenSystem or None
        Fast-path precomputation.
    """

    y: jax.Array
    X: jax.Array
    log_jac: jax.Array
    struct: Structure | None
    refs: tuple
    z: tuple
    eig: EigenSystem | None


def residual(beta, effects, data: KernelData) -> jax.Array:
    """``y - X beta - sum_l Z_l b_l`` over the terms whose effects are given.

    Parameters
    ----------
    beta : array (p,)
    effects : tuple
        Per term, the (M_l, d_l) effects ``b_l`` or None for a marginalised term.
    data : KernelData

    Returns
    -------
    array (N,)
    """
    r = data.y - data.X @ beta
    for b, refs, z in zip(effects, data.refs, data.z, strict=True):
        if b is not None:
            r = r - jnp.sum(z * b[refs], axis=1)
    return r


def normal_loglik(r, sigma) -> jax.Array:
    """Independent ``N(0, sigma^2)`` log density of the residuals ``r``."""
    n = r.shape[0]
    return -0.5 * (n * (_LOG_2PI + 2.0 * jnp.log(sigma)) + jnp.dot(r, r) / sigma**2)


def blocked_loglik(r, sigma, chols, struct: Structure) -> jax.Array:
    """Gaussian log density of ``r`` with the classes of ``struct`` integrated out.

    Parameters
    ----------
    r : array (N,)
        Residual after the fixed effects and the sampled classes.
    sigma : scalar
        Residual standard deviation.
    chols : tuple of arrays (d_l, d_l)
        Cholesky factors ``C_l`` of the marginalised terms' covariances, in the
        order of ``struct``'s terms.
    struct : Structure
        Blocked system built on the marginalised terms only.

    Returns
    -------
    scalar
        ``log N(r | 0, sigma^2 I + sum_{l in S} Z_l Sigma_l Z_l')``.
    """
    n = r.shape[0]
    lambdas = tuple(c / sigma for c in chols)
    c1, c2 = lambda_zt(struct, lambdas, r)
    logdet_A, woodbury = logdet_and_quad(struct, lambdas, c1, c2)
    quad = jnp.dot(r, r) - woodbury[0, 0]
    return -0.5 * (n * (_LOG_2PI + 2.0 * jnp.log(sigma)) + logdet_A + quad / sigma**2)


def eigen_loglik(r, sigma, data: KernelData, nlevels: tuple[int, ...], scale=1.0) -> jax.Array:
    """Fast path: all classes marginalised, covariances ``scale^2 T_l T_l'`` known.

    Parameters
    ----------
    r : array (N,)
        ``y - X beta``.
    sigma : scalar
    data : KernelData
        With ``eig`` set.
    nlevels : tuple of int
        Levels of each term (static).
    scale : scalar
        Common multiplier of every random-effect standard deviation (1 when
        all are fixed).

    Returns
    -------
    scalar
        Same value as :func:`blocked_loglik` with every class marginalised.
    """
    n = r.shape[0]
    eig = data.eig
    c = eig.Q.T @ tzt(r, data, nlevels)
    s2lam = scale**2 * eig.lam
    s2 = sigma**2
    ld = jnp.sum(jnp.log1p(s2lam / s2))
    quad = jnp.dot(r, r) - scale**2 * jnp.sum(c**2 / (s2 + s2lam))
    return -0.5 * (n * (_LOG_2PI + jnp.log(s2)) + ld + quad / s2)


def tzt(r, data: KernelData, nlevels: tuple[int, ...]) -> jax.Array:
    """``T' Z' r`` stacked term-major and level-major, shape (D,), by segment sums."""
    parts = []
    for refs, z, t, m in zip(data.refs, data.z, data.eig.T, nlevels, strict=True):
        ztr = jax.ops.segment_sum(z * r[:, None], refs, num_segments=m)  # (M, d)
        parts.append((ztr @ t).reshape(-1))  # row m: C' (Z_m' r)
    return jnp.concatenate(parts)


def marginal_loglik(
    beta,
    sigma,
    chols,
    effects,
    data: KernelData,
    marginal: tuple[bool, ...],
    nlevels: tuple[int, ...],
    fast: bool = False,
    scale=1.0,
) -> jax.Array:
    """Log-likelihood of the data with the classes flagged in ``marginal`` integrated out.

    Parameters
    ----------
    beta : array (p,)
        Fixed effects.
    sigma : scalar
        Residual standard deviation (on the modelling scale).
    chols : tuple of arrays (d_l, d_l)
        Every term's covariance Cholesky factor ``C_l``.
    effects : tuple
        Per term, its (M_l, d_l) effects ``b_l`` when sampled, None when marginalised.
    data : KernelData
    marginal : tuple of bool (static)
        Which terms are integrated out.
    nlevels : tuple of int (static)
        Number of levels of each term.
    fast : bool (static)
        Use the eigendecomposition fast path (requires ``data.eig``).
    scale : scalar
        Common multiplier of the fast path's fixed covariance factors.

    Returns
    -------
    scalar
        ``log p(y | beta, sigma, Sigma, b_sampled)`` including the response Jacobian.
    """
    r = residual(beta, effects, data)
    if fast:
        ll = eigen_loglik(r, sigma, data, nlevels, scale)
    elif any(marginal):
        sub = tuple(c for c, m in zip(chols, marginal, strict=True) if m)
        ll = blocked_loglik(r, sigma, sub, data.struct)
    else:
        ll = normal_loglik(r, sigma)
    return ll + data.log_jac


# ---------------------------------------------------------------------------------
# fast-path precomputation (NumPy, once per model)
# ---------------------------------------------------------------------------------


def gram_dense(terms) -> np.ndarray:
    """Dense ``Z' Z`` (D x D, term-major, level-major) by bincounts over the rows.

    O(N (sum_l d_l)^2) time and O(D^2) memory; never forms Z.
    """
    offsets = np.cumsum([0] + [t.q for t in terms])
    D = int(offsets[-1])
    cols = []  # (global index per row, value per row) for each term column
    for t, off in zip(terms, offsets[:-1], strict=False):
        for c in range(t.d):
            cols.append((off + t.refs.astype(np.int64) * t.d + c, t.z[:, c]))
    G = np.zeros(D * D)
    for ia, va in cols:
        for ib, vb in cols:
            G += np.bincount(ia * D + ib, weights=va * vb, minlength=D * D)
    return G.reshape(D, D)


def eigen_precompute(terms, fixed_chols, dtype=np.float64) -> EigenSystem:
    """Eigendecompose ``T' Z' Z T`` once, ``T = blockdiag_l (I_{M_l} kron C_l)``.

    Parameters
    ----------
    terms : sequence of Term
        All terms of the model, in model order.
    fixed_chols : sequence of arrays (d_l, d_l)
        Each term's constant covariance factor.
    dtype : numpy dtype

    Returns
    -------
    EigenSystem
    """
    G = gram_dense(terms)
    T = scipy.linalg.block_diag(
        *[
            np.kron(np.eye(t.nlevels), np.asarray(c))
            for t, c in zip(terms, fixed_chols, strict=True)
        ]
    )
    lam, Q = np.linalg.eigh(T.T @ G @ T)
    lam = np.clip(lam, 0.0, None)
    return EigenSystem(
        jnp.asarray(Q, dtype=dtype),
        jnp.asarray(lam, dtype=dtype),
        tuple(jnp.asarray(np.asarray(c), dtype=dtype) for c in fixed_chols),
    )

"""The eigendecomposition fast path, for covariances known up to one common scale.

When every random-effect class is integrated out and every covariance is
``s^2 T_l T_l'`` with constant ``T_l`` (the seed paper's setting, with ``s``
fixed at 1 or sampled), ``T' Z' Z T = Q diag(lam) Q'`` is decomposed once
(O(q^3), NumPy) and with ``rho = s / sigma``

    A = I + rho^2 T' Z' Z T = Q diag(1 + rho^2 lam) Q',

so ``log|V|``, ``M' V^{-1} M`` and the conditional of the effects cost
O(N + q^2) per evaluation. ``T`` is ``blockdiag_l (I_{M_l} kron T_l)`` in the
blocked order of the :class:`~lmmjax.linalg.structure.Structure`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lmmjax.linalg.blocked import Moments, effects, lambda_t, to_blocked
from lmmjax.linalg.products import CrossProducts
from lmmjax.linalg.structure import Structure, dense_gram


class EigenSystem(NamedTuple):
    """Precomputed ``T' Z' Z T = Q diag(lam) Q'`` (a JAX pytree).

    Attributes
    ----------
    Q : array (q, q)
        Eigenvectors.
    lam : array (q,)
        Eigenvalues (clipped at zero).
    T : tuple of arrays (d_l, d_l)
        Each term's constant covariance factor.
    """

    Q: jax.Array
    lam: jax.Array
    T: tuple


def eigen_precompute(struct: Structure, factors) -> EigenSystem:
    """Eigendecompose ``T' Z' Z T`` once.

    Parameters
    ----------
    struct : Structure
        Built on every term of the model.
    factors : sequence of arrays (d_l, d_l)
        Each term's constant covariance factor ``T_l``, in the structure's order.
    """
    G = dense_gram(struct)
    T = scipy.linalg.block_diag(
        *[
            np.kron(np.eye(t.nlevels), np.asarray(f))
            for t, f in zip(struct.layout.terms, factors, strict=True)
        ]
    )
    lam, Q = np.linalg.eigh(T.T @ G @ T)
    dtype = struct.dtype
    return EigenSystem(
        jnp.asarray(Q, dtype=dtype),
        jnp.asarray(np.clip(lam, 0.0, None), dtype=dtype),
        tuple(jnp.asarray(np.asarray(f), dtype=dtype) for f in factors),
    )


def _rotated(struct: Structure, eig: EigenSystem, xp: CrossProducts) -> jax.Array:
    """``Q' T' Z' M``, shape (q, k)."""
    c1, c2 = lambda_t(struct, eig.T, xp)
    return eig.Q.T @ jnp.concatenate([c1.reshape(-1, c1.shape[-1]), c2], axis=0)


def eigen_gls_gram(struct: Structure, eig: EigenSystem, rho, xp: CrossProducts):
    """``log|V|`` and ``M' V^{-1} M`` for ``V = I + rho^2 Z T T' Z'``.

    Same values as :func:`lmmjax.linalg.gls_gram` with ``Lambda_l = rho T_l``.
    """
    c = _rotated(struct, eig, xp)
    s = rho**2 * eig.lam
    quad = rho**2 * (c.T / (1.0 + s)) @ c
    return jnp.sum(jnp.log1p(s)), xp.gram - quad


def eigen_moments(struct: Structure, eig: EigenSystem, rho, xp: CrossProducts, sigma, *,
                  key: jax.Array | None = None) -> Moments:  # fmt: skip
    """Conditional mean (and a draw) of the effects, as :func:`lmmjax.linalg.conditional_moments`.

    ``u | y ~ N(rho A^{-1} T' Z' r, sigma^2 A^{-1})`` in O(q^2) through ``Q``.
    """
    c = _rotated(struct, eig, xp)[:, 0]
    s = 1.0 + rho**2 * eig.lam
    lambdas = tuple(rho * t for t in eig.T)

    def to_b(v):
        return effects(struct, lambdas, *to_blocked(struct, (eig.Q @ v)[:, None]))

    mean_v = rho * c / s
    draw = None
    if key is not None:
        e = jax.random.normal(key, c.shape, c.dtype)
        draw = to_b(mean_v + sigma * e / jnp.sqrt(s))
    return Moments(to_b(mean_v), None, draw)

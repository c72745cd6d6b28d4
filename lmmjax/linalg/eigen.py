"""The eigendecomposition fast path, for covariances known up to one common scale.

When every random-effect class is integrated out and every covariance is
``s^2 T_l T_l'`` with constant ``T_l`` (the seed paper's setting, with ``s``
fixed at 1 or sampled), ``T' Z' Z T = Q diag(lam) Q'`` is decomposed once
(O(q^3), LAPACK) and with ``rho = s / sigma``

    A = I + rho^2 T' Z' Z T = Q diag(1 + rho^2 lam) Q'.

The residual is ``y - X beta``, so its rotated cross products
``Q' T' Z' r = R [-beta; 1]`` follow from ``R = Q' T' Z' [X y]``, computed
once as well: ``log|V|`` and ``r' V^{-1} r`` then cost O(q p) per evaluation,
independent of N, and an exact draw of the effects one pass over ``Q``.
``T`` is ``blockdiag_l (I_{M_l} kron T_l)`` in the blocked order of the
:class:`~lmmjax.linalg.structure.Structure`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmmjax.linalg.blocked import Moments, effects, lambda_t, to_blocked
from lmmjax.linalg.products import CrossProducts, DenseProducts
from lmmjax.linalg.structure import Structure, dense_gram, device_array


class EigenSystem(NamedTuple):
    """Precomputed ``T' Z' Z T = Q diag(lam) Q'`` and the rotated ``[X y]`` (a JAX pytree).

    Attributes
    ----------
    Qt : array (q, q)
        Eigenvectors as rows (``Q'``, stored so that both ``Q' v`` and ``Q u``
        read it in memory order).
    lam : array (q,)
        Eigenvalues (clipped at zero).
    T : tuple of arrays (d_l, d_l)
        Each term's constant covariance factor.
    products : DenseProducts
        Of the columns ``M`` given to :func:`eigen_precompute`, rotated: ``zt``
        holds ``Q' T' Z' M``.
    """

    Qt: jax.Array
    lam: jax.Array
    T: tuple
    products: DenseProducts


def _t_sandwich(G: np.ndarray, struct: Structure, factors) -> np.ndarray:
    """``T' G T`` for the block-diagonal ``T`` in O(q^2 d) (never forms T)."""
    out = np.array(G, dtype=float)
    offsets = np.cumsum([0] + [t.q for t in struct.layout.terms])
    for axis in (0, 1):
        pieces = []
        for t, f, lo, hi in zip(struct.layout.terms, factors, offsets[:-1], offsets[1:],
                                strict=True):  # fmt: skip
            blk = np.take(out, np.arange(lo, hi), axis=axis)
            blk = np.moveaxis(blk, axis, 0).reshape(t.nlevels, t.d, -1)
            blk = np.einsum("ca,mcx->max", np.asarray(f, dtype=float), blk).reshape(t.q, -1)
            pieces.append(np.moveaxis(blk, 0, axis))
        out = np.concatenate(pieces, axis=axis)
    return out


def eigen_precompute(struct: Structure, factors, xp: CrossProducts) -> EigenSystem:
    """Eigendecompose ``T' Z' Z T`` once and rotate the cross products ``xp``.

    Parameters
    ----------
    struct : Structure
        Built on every term of the model.
    factors : sequence of arrays (d_l, d_l)
        Each term's constant covariance factor ``T_l``, in the structure's order.
    xp : CrossProducts
        Of ``M = [X y]`` (or any columns whose combinations will be needed).
    """
    lam, Q = np.linalg.eigh(_t_sandwich(dense_gram(struct), struct, factors))
    dtype = struct.dtype
    T = tuple(device_array(f, dtype) for f in factors)
    c1, c2 = lambda_t(struct, T, xp)
    tz = np.concatenate([np.asarray(c1).reshape(-1, c1.shape[-1]), np.asarray(c2)], axis=0)
    Qt = np.ascontiguousarray(Q.T)
    return EigenSystem(
        device_array(Qt, dtype),
        device_array(np.clip(lam, 0.0, None), dtype),
        T,
        DenseProducts(device_array(Qt @ tz, dtype), device_array(xp.gram, dtype)),
    )


def eigen_gls_gram(eig: EigenSystem, rho, rot: DenseProducts):
    """``log|V|`` and ``M' V^{-1} M`` for ``V = I + rho^2 Z T T' Z'``, in O(q k^2).

    Same values as :func:`lmmjax.linalg.gls_gram` with ``Lambda_l = rho T_l``.
    """
    s = rho**2 * eig.lam
    quad = rho**2 * (rot.zt.T / (1.0 + s)) @ rot.zt
    return jnp.sum(jnp.log1p(s)), rot.gram - quad


def eigen_moments(struct: Structure, eig: EigenSystem, rho, rot: DenseProducts, sigma, *,
                  key: jax.Array | None = None) -> Moments:  # fmt: skip
    """Conditional mean (and a draw) of the effects, as :func:`lmmjax.linalg.conditional_moments`.

    ``u | y ~ N(rho A^{-1} T' Z' r, sigma^2 A^{-1})``: one pass over ``Q`` each.
    """
    c = rot.zt[:, 0]
    s = 1.0 + rho**2 * eig.lam
    lambdas = tuple(rho * t for t in eig.T)

    def to_b(v):
        return effects(struct, lambdas, *to_blocked(struct, (v @ eig.Qt)[:, None]))

    mean_v = rho * c / s
    draw = None
    if key is not None:
        e = jax.random.normal(key, c.shape, c.dtype)
        draw = to_b(mean_v + sigma * e / jnp.sqrt(s))
    return Moments(to_b(mean_v), None, draw)

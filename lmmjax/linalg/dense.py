"""The dense Schur block's log-determinant and quadratic form, with a cheap gradient.

Everything the profiled objective needs from the dense block ``A22`` is
``log|A22|`` and ``R' A22^{-1} R`` for a few columns ``R``. Their gradient is
``d log|A| = A^{-1}`` and ``d (R' A^{-1} R) = -A^{-1} R (.) R' A^{-1}``, so the
backward pass needs ``A^{-1}`` once. Reverse-mode through ``cholesky`` instead
builds it from several triangular solves and a dense matmul; on a 2-core CPU
this rule's backward pass is about twice as fast for InstEval's 1156 x 1156
block (``benchmarks/reml_speed.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def tri_solve(L: jax.Array, B: jax.Array, *, transpose: bool = False) -> jax.Array:
    """Solve ``L X = B`` (or ``L' X = B``) for lower-triangular, possibly batched, ``L``."""
    return lax.linalg.triangular_solve(L, B, left_side=True, lower=True, transpose_a=transpose)


def _forward(A, R):
    L = jnp.linalg.cholesky(A)
    W = tri_solve(L, R)
    return (2.0 * jnp.sum(jnp.log(jnp.diagonal(L))), W.T @ W), (L, W)


@jax.custom_vjp
def logdet_quad(A: jax.Array, R: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log|A|`` and ``R' A^{-1} R`` for symmetric positive definite ``A``.

    Parameters
    ----------
    A : array (q, q)
    R : array (q, k)

    Returns
    -------
    logdet : scalar
    Q : array (k, k)
    """
    return _forward(A, R)[0]


def _backward(res, cotangents):
    L, W = res
    ld_bar, Q_bar = cotangents
    eye = jnp.eye(L.shape[0], dtype=L.dtype)
    A_inv = tri_solve(L, tri_solve(L, eye), transpose=True)
    A_inv_R = tri_solve(L, W, transpose=True)
    Q_sym = 0.5 * (Q_bar + Q_bar.T)
    A_bar = ld_bar * A_inv - A_inv_R @ Q_sym @ A_inv_R.T
    return A_bar, 2.0 * A_inv_R @ Q_sym


logdet_quad.defvjp(_forward, _backward)

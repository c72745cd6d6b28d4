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

import contextlib
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from lmmjax.lapack import spd_inverse

# Matrices up to this size are factored and solved by unrolled elementwise code. Larger
# blocks compile too slowly once differentiated: the third derivatives that the MAP
# method's Laplace search takes of a 4 x 4 block compiled 5x slower than through LAPACK.
SMALL = 2
_UNROLL = [True]  # the innermost lapack_blocks() context turns unrolling off while tracing


@contextlib.contextmanager
def _pushed(stack: list, value: bool):
    """Make ``value`` the innermost setting of ``stack`` while the context lasts."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def lapack_blocks():
    """Trace kernels with LAPACK for every block, unrolling none (:func:`cholesky`).

    For kernels differentiated more than once, whose unrolled derivatives are
    many tiny operations, and for searches whose path is sensitive to
    rounding: the MAP method's empirical-Bayes search took another path with
    unrolled blocks (a p = 500 fit of the EM issue's experiment 4 in 6.9 s
    against 3.2 s through LAPACK), so :func:`lmmjax.em.fit_map` traces
    everything inside this context. Only tracing reads the switch, so wrap
    the call that compiles.
    """
    return _pushed(_UNROLL, False)


def cholesky(A: jax.Array) -> jax.Array:
    """Lower Cholesky factor of symmetric positive definite, possibly batched, ``A``.

    Up to :data:`SMALL` x :data:`SMALL` (the per-level blocks of an intercept
    and a slope), the factor is written out entry by entry, so a batch of
    blocks is a few elementwise operations over the batch instead of one
    LAPACK call per block, and its derivative is elementwise too. On this
    2-core CPU, for 18,000 2 x 2 blocks (a vmapped bootstrap of sleepstudy):
    0.5 ms against 1.9 ms, and the gradient 0.33 ms against 3.8 ms. Reads the
    lower triangle only, as LAPACK does; a matrix that is not positive
    definite gives NaN.
    """
    d = A.shape[-1]
    if d > SMALL or not _UNROLL[-1] or d == 0:
        return jnp.linalg.cholesky(A)
    L = [[None] * d for _ in range(d)]
    for j in range(d):
        s = A[..., j, j] - sum((L[j][k] ** 2 for k in range(j)), jnp.zeros_like(A[..., j, j]))
        L[j][j] = jnp.sqrt(s)
        for i in range(j + 1, d):
            s = A[..., i, j] - sum((L[i][k] * L[j][k] for k in range(j)), jnp.zeros_like(s))
            L[i][j] = s / L[j][j]
    zero = jnp.zeros_like(A[..., 0, 0])
    rows = [jnp.stack([L[i][j] if j <= i else zero for j in range(d)], axis=-1) for i in range(d)]
    return jnp.stack(rows, axis=-2)


def tri_solve(L: jax.Array, B: jax.Array, *, transpose: bool = False) -> jax.Array:
    """Solve ``L X = B`` (or ``L' X = B``) for lower-triangular, possibly batched, ``L``.

    ``B`` is ``(..., d, k)``. Up to :data:`SMALL` rows, by unrolled substitution
    (elementwise over the batch and the ``k`` columns, see :func:`cholesky`).
    """
    d = L.shape[-1]
    if d == 0:  # nothing to solve (a model without fixed effects)
        return B
    if d > SMALL or not _UNROLL[-1]:
        return lax.linalg.triangular_solve(L, B, left_side=True, lower=True, transpose_a=transpose)
    lij = (lambda i, j: L[..., j, i, None]) if transpose else (lambda i, j: L[..., i, j, None])
    order = range(d - 1, -1, -1) if transpose else range(d)
    x = [None] * d
    for i in order:
        known = [j for j in range(d) if x[j] is not None]
        s = B[..., i, :] - sum((lij(i, j) * x[j] for j in known), jnp.zeros_like(B[..., i, :]))
        x[i] = s / lij(i, i)
    return jnp.stack(jnp.broadcast_arrays(*x), axis=-2)


def logdet_quad(A: jax.Array, R: jax.Array, *, lower: bool = False) -> tuple[jax.Array, jax.Array]:
    """``log|A|`` and ``R' A^{-1} R`` for symmetric positive definite ``A``.

    Parameters
    ----------
    A : array (q, q)
    R : array (q, k)
    lower : bool
        Read only ``A``'s lower triangle (the upper one may hold anything):
        no pass over ``A`` symmetrises it, and ``A``'s gradient is in the same
        form, lower triangle only, each off-diagonal entry counted twice.

    Returns
    -------
    logdet : scalar
    Q : array (k, k)
    """
    # The switches are arguments of the custom rule, not globals read inside it: JAX keeps
    # the traces of a custom_vjp's rules, and would reuse one traced under another setting
    return _logdet_quad(A, R, _UNROLL[-1], lower)


def _forward(A, R, unroll, lower):
    with _pushed(_UNROLL, unroll):
        if lower and (A.shape[0] > SMALL or not unroll):
            L = _lower_cholesky(A)
        else:  # the unrolled factor reads the lower triangle only anyway
            L = cholesky(A)
        W = tri_solve(L, R)
    return (2.0 * jnp.sum(jnp.log(jnp.diagonal(L))), W.T @ W), (L, W)


@jax.custom_jvp
def _lower_cholesky(A):
    """LAPACK's Cholesky factor of ``A`` from its lower triangle, without symmetrising ``A``.

    Its derivative reads the tangent's lower triangle only, as the factor
    does ``A``: JAX's rule takes the whole tangent, whose upper triangle is
    not ``A``'s derivative when only the lower one was assembled (the
    Hessians of Satterthwaite and Kenward-Roger differentiate through it).
    """
    return lax.linalg.cholesky(A, symmetrize_input=False)


@_lower_cholesky.defjvp
def _lower_cholesky_jvp(primals, tangents):
    """``dL = L Phi(L^{-1} dA L^{-T})``, ``Phi`` the lower triangle with half the diagonal.

    Written with the factor itself, so that derivatives of every order go
    through this rule and read lower triangles only.
    """
    (A,), (dA,) = primals, tangents
    L = _lower_cholesky(A)
    sym = jnp.tril(dA) + jnp.swapaxes(jnp.tril(dA, -1), -1, -2)
    inner = lax.linalg.triangular_solve(L, sym, left_side=True, lower=True)
    inner = lax.linalg.triangular_solve(L, inner, left_side=False, lower=True, transpose_a=True)
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return L, L @ (jnp.tril(inner) - 0.5 * inner * eye)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logdet_quad(A, R, unroll, lower):
    return _forward(A, R, unroll, lower)[0]


def _backward(unroll, lower, res, cotangents):
    L, W = res
    ld_bar, Q_bar = cotangents
    with _pushed(_UNROLL, unroll):
        if L.shape[0] > SMALL or not _UNROLL[-1]:  # LAPACK (spd_inverse), not unrolled
            A_inv = spd_inverse(L)
        else:
            A_inv = tri_solve(L, tri_solve(L, jnp.eye(L.shape[0], dtype=L.dtype)), transpose=True)
        A_inv_R = tri_solve(L, W, transpose=True)
    Q_sym = 0.5 * (Q_bar + Q_bar.T)
    A_bar = ld_bar * A_inv - A_inv_R @ Q_sym @ A_inv_R.T
    if lower:  # d f / d A_ab for a > b, where A_ab stands for A_ba too
        rows = lax.broadcasted_iota(jnp.int32, A_bar.shape, 0)
        cols = lax.broadcasted_iota(jnp.int32, A_bar.shape, 1)
        A_bar = jnp.where(rows > cols, 2.0 * A_bar, jnp.where(rows == cols, A_bar, 0.0))
    return A_bar, 2.0 * A_inv_R @ Q_sym


_logdet_quad.defvjp(_forward, _backward)

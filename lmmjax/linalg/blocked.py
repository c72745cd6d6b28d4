"""The blocked Cholesky factorisation of ``A(theta) = Lambda' Z' Z Lambda + I``.

Pure ``jax.numpy``; every function is jit-compatible and differentiable.
Vectors and matrices in the random-effect space are carried in blocked form
``(x1, x2)``: ``x1`` of shape (M1, d1, k) for the first term (level-major) and
``x2`` of shape (q_rest, k) for the stacked remaining terms.

With ``L11`` the batched Cholesky factor of the block-diagonal first block,
the off-diagonal factor ``L21 = Lambda_r' B Lambda_1 L11^{-T}`` (``B = Z_r' Z_1``)
is never formed: it is applied through the sparse pattern of ``B``. The
Schur complement ``Lambda_r' (C - B W B') Lambda_r + I`` with
``W_j = Lambda_1 A11_j^{-1} Lambda_1'`` is assembled from precomputed pairs
and factored densely as ``L22``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmmjax.linalg.dense import logdet_quad
from lmmjax.linalg.structure import Layout, Structure


class Factor(NamedTuple):
    """Cholesky factor ``L`` of ``A(theta)`` in blocked form."""

    lambdas: tuple  # per term (d, d) lower-triangular relative covariance factors
    L11: jax.Array  # (M1, d1, d1)
    L22: jax.Array  # (q_rest, q_rest)


def make_lambdas(theta: jax.Array, layout: Layout) -> tuple[jax.Array, ...]:
    """Split theta into each term's lower-triangular factor Lambda_l (lme4 order)."""
    out, k = [], 0
    for t in layout.terms:
        lam = jnp.zeros((t.d, t.d), dtype=theta.dtype)
        lam = lam.at[t.theta_rows, t.theta_cols].set(theta[k : k + t.ntheta])
        out.append(lam)
        k += t.ntheta
    return tuple(out)


def _tri_solve(a, b, *, transpose=False):
    """Solve ``a x = b`` (or ``a' x = b``) for lower-triangular (batched) ``a``."""
    return lax.linalg.triangular_solve(a, b, left_side=True, lower=True, transpose_a=transpose)


def rest_left(mat: jax.Array, lambdas, layout: Layout, *, transpose: bool = True) -> jax.Array:
    """Multiply the rest block's rows by ``Lambda_r'`` (or ``Lambda_r``).

    ``mat`` has shape (q_rest, k); ``Lambda_r`` is block diagonal over terms and
    levels, so this is a small einsum per term.
    """
    if all(t.d == 1 for t in layout.rest):  # Lambda_r is diagonal: scale rows
        scale = jnp.concatenate(
            [
                jnp.broadcast_to(lam[0, 0], (t.q,))
                for t, lam in zip(layout.rest, lambdas[1:], strict=True)
            ]
        )
        return scale[:, None] * mat
    pieces = []
    for t, lam in zip(layout.rest, lambdas[1:], strict=True):
        blk = mat[t.offset : t.offset + t.q].reshape(t.nlevels, t.d, -1)
        spec = "ca,mck->mak" if transpose else "ac,mck->mak"
        pieces.append(jnp.einsum(spec, lam, blk).reshape(t.q, -1))
    return jnp.concatenate(pieces, axis=0)


def first_left(x1: jax.Array, lam1: jax.Array, *, transpose: bool = True) -> jax.Array:
    """Multiply each level's block (M1, d1, k) by ``Lambda_1'`` (or ``Lambda_1``)."""
    spec = "ca,mck->mak" if transpose else "ac,mck->mak"
    return jnp.einsum(spec, lam1, x1)


def _b_times(struct: Structure, x1: jax.Array) -> jax.Array:
    """``B x1`` with ``B = Z_r' Z_1``: (M1, d1, k) -> (q_rest, k)."""
    contrib = jnp.einsum("nd,ndk->nk", struct.b_val, x1[struct.b_lev])
    return jax.ops.segment_sum(contrib, struct.b_row, struct.layout.q_rest)


def _bt_times(struct: Structure, x2: jax.Array) -> jax.Array:
    """``B' x2``: (q_rest, k) -> (M1, d1, k)."""
    contrib = struct.b_val[:, :, None] * x2[struct.b_row][:, None, :]
    return jax.ops.segment_sum(
        contrib, struct.b_lev, struct.layout.first.nlevels, indices_are_sorted=True
    )


def schur_weights(struct: Structure, lam1: jax.Array) -> jax.Array:
    """``W_g = Lambda_1 (Lambda_1' G_g Lambda_1 + I)^{-1} Lambda_1'`` per Gram group."""
    d1 = lam1.shape[0]
    Aw = first_left(first_left(struct.Gw, lam1).transpose(0, 2, 1), lam1) + jnp.eye(
        d1, dtype=lam1.dtype
    )
    Lw = jnp.linalg.cholesky(Aw)
    Y = _tri_solve(Lw, jnp.broadcast_to(lam1.T, Aw.shape))
    return jnp.einsum("gka,gkb->gab", Y, Y)


def schur_blocks(struct: Structure, lambdas: tuple) -> tuple[jax.Array, jax.Array]:
    """``L11`` (batched Cholesky of the first block) and the dense Schur complement ``A22``.

    ``A22 = Lambda_r' (C - B W B') Lambda_r + I`` is returned unfactored, shape
    (q_rest, q_rest); it is empty when the model has one term.
    """
    layout = struct.layout
    lam1 = lambdas[0]
    d1 = layout.first.d
    A11 = first_left(first_left(struct.G1, lam1).transpose(0, 2, 1), lam1) + jnp.eye(
        d1, dtype=lam1.dtype
    )
    L11 = jnp.linalg.cholesky(A11)
    if not layout.has_rest:
        return L11, jnp.zeros((0, 0), dtype=L11.dtype)
    q = layout.q_rest
    W = schur_weights(struct, lam1)
    vals = jnp.einsum("pab,pab->p", struct.pair_val, W[struct.pair_group])
    S = jax.ops.segment_sum(vals, struct.pair_entry, q * q, indices_are_sorted=True)
    S = S.reshape(q, q)
    S = S + S.T - jnp.diag(jnp.diag(S))
    M = struct.C - S
    A22 = rest_left(rest_left(M, lambdas, layout).T, lambdas, layout) + jnp.eye(q, dtype=M.dtype)
    return L11, A22


def factorize(struct: Structure, lambdas: tuple) -> Factor:
    """Blocked Cholesky factor of ``A = Lambda' Z' Z Lambda + I``.

    Parameters
    ----------
    struct : Structure
        Output of :func:`lmmjax.linalg.build_structure`.
    lambdas : tuple of arrays
        Each term's (d, d) lower-triangular factor, in term order.

    Returns
    -------
    Factor
    """
    L11, A22 = schur_blocks(struct, lambdas)
    L22 = jnp.linalg.cholesky(A22) if struct.layout.has_rest else A22
    return Factor(lambdas, L11, L22)


def l21_times(struct: Structure, L11: jax.Array, lambdas: tuple, w1: jax.Array) -> jax.Array:
    """``L21 w1 = Lambda_r' B Lambda_1 L11^{-T} w1`` without forming ``L21``."""
    t1 = first_left(_tri_solve(L11, w1, transpose=True), lambdas[0], transpose=False)
    return rest_left(_b_times(struct, t1), lambdas, struct.layout)


def logdet_and_quad(struct: Structure, lambdas: tuple, c1: jax.Array, c2: jax.Array):
    """``log|A|`` and ``c' A^{-1} c`` (a k x k matrix) for blocked ``c``, differentiably.

    The work shared by the profiled REML/ML objective and the NUTS marginal
    likelihood. Equal to ``logdet(F)`` and ``w'w`` with ``w = L^{-1} c`` from
    :func:`factorize` and :func:`solve_lower`, but the dense Schur block goes
    through :func:`lmmjax.linalg.dense.logdet_quad`, whose gradient needs one
    inverse instead of reverse mode through its Cholesky factor.

    Parameters
    ----------
    struct : Structure
    lambdas : tuple of (d, d) arrays
    c1, c2 : arrays (M1, d1, k) and (q_rest, k)

    Returns
    -------
    logdet_A : scalar
    quad : array (k, k)
    """
    L11, A22 = schur_blocks(struct, lambdas)
    w1 = _tri_solve(L11, c1)
    logdet_A = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L11, axis1=1, axis2=2)))
    quad = jnp.einsum("mak,mal->kl", w1, w1)
    if struct.layout.has_rest:
        R2 = c2 - l21_times(struct, L11, lambdas, w1)
        logdet_22, quad_22 = logdet_quad(A22, R2)
        logdet_A, quad = logdet_A + logdet_22, quad + quad_22
    return logdet_A, quad


def logdet(factor: Factor) -> jax.Array:
    """``log|A| = 2 sum log diag L``."""
    d11 = jnp.diagonal(factor.L11, axis1=1, axis2=2)
    return 2.0 * (jnp.sum(jnp.log(d11)) + jnp.sum(jnp.log(jnp.diagonal(factor.L22))))


def solve_lower(struct: Structure, factor: Factor, c1: jax.Array, c2: jax.Array):
    """Solve ``L w = c`` for ``c`` in blocked form (M1, d1, k), (q_rest, k)."""
    w1 = _tri_solve(factor.L11, c1)
    if not struct.layout.has_rest:
        return w1, c2
    return w1, _tri_solve(factor.L22, c2 - l21_times(struct, factor.L11, factor.lambdas, w1))


def solve_upper(struct: Structure, factor: Factor, w1: jax.Array, w2: jax.Array):
    """Solve ``L' u = w`` for ``w`` in blocked form."""
    if not struct.layout.has_rest:
        return _tri_solve(factor.L11, w1, transpose=True), w2
    u2 = _tri_solve(factor.L22, w2, transpose=True)
    y = _bt_times(struct, rest_left(u2, factor.lambdas, struct.layout, transpose=False))
    l21tu = _tri_solve(factor.L11, first_left(y, factor.lambdas[0]))
    return _tri_solve(factor.L11, w1 - l21tu, transpose=True), u2


def lambda_zt(struct: Structure, lambdas: tuple, r: jax.Array):
    """``Lambda' Z' r`` in blocked form for ``r`` of shape (N,) or (N, k).

    O(N sum d_l) through segment sums over each term's rows.
    """
    r2 = r[:, None] if r.ndim == 1 else r
    layout = struct.layout
    parts = []
    for t, refs, z in zip(layout.terms, struct.refs, struct.z, strict=True):
        parts.append(jax.ops.segment_sum(z[:, :, None] * r2[:, None, :], refs, t.nlevels))
    c1 = first_left(parts[0], lambdas[0])
    if not layout.has_rest:
        return c1, jnp.zeros((0, r2.shape[1]), dtype=r2.dtype)
    flat = jnp.concatenate([p.reshape(-1, r2.shape[1]) for p in parts[1:]], axis=0)
    return c1, rest_left(flat, lambdas, layout)


def z_lambda(struct: Structure, lambdas: tuple, u1: jax.Array, u2: jax.Array) -> jax.Array:
    """``Z Lambda u`` for spherical effects ``u`` in blocked form, shape (N, k)."""
    layout = struct.layout
    b = [first_left(u1, lambdas[0], transpose=False)]
    if layout.has_rest:
        br = rest_left(u2, lambdas, layout, transpose=False)
        b += [br[t.offset : t.offset + t.q].reshape(t.nlevels, t.d, -1) for t in layout.rest]
    out = 0.0
    for bl, refs, z in zip(b, struct.refs, struct.z, strict=True):
        out = out + jnp.einsum("nd,ndk->nk", z, bl[refs])
    return out


def blocked_to_terms(struct: Structure, x1: jax.Array, x2: jax.Array) -> list[jax.Array]:
    """Split a blocked vector into per-term arrays of shape (M_l, d_l, k)."""
    out = [x1]
    for t in struct.layout.rest:
        out.append(x2[t.offset : t.offset + t.q].reshape(t.nlevels, t.d, -1))
    return out


def inverse_diag_blocks(struct: Structure, factor: Factor, chunk: int = 128) -> list[jax.Array]:
    """Diagonal blocks of ``A^{-1}``, one (M_l, d_l, d_l) array per term.

    ``A^{-1} = L^{-T} L^{-1}``, so a level's block is the Gram matrix of the
    matching columns of ``L^{-1}``; they are solved ``chunk`` levels at a time
    with :func:`lax.map`, never holding more than q x (chunk d) numbers.
    """
    layout = struct.layout
    q1, q_total = layout.first.q, layout.first.q + layout.q_rest
    dtype = factor.L11.dtype
    offsets = [0, *np.cumsum([t.q for t in layout.terms])]
    out = []
    for t, offset in zip(layout.terms, offsets, strict=False):

        def solve_chunk(start, t=t, offset=offset):
            levels = start + jnp.arange(chunk)
            cols = (offset + levels[:, None] * t.d + jnp.arange(t.d)[None, :]).reshape(-1)
            valid = jnp.repeat(levels < t.nlevels, t.d)
            e = ((jnp.arange(q_total)[:, None] == cols[None, :]) & valid[None, :]).astype(dtype)
            e1 = e[:q1].reshape(layout.first.nlevels, layout.first.d, -1)
            w1, w2 = solve_lower(struct, factor, e1, e[q1:])
            w = jnp.concatenate([w1.reshape(q1, -1), w2], axis=0).reshape(q_total, chunk, t.d)
            return jnp.einsum("kma,kmb->mab", w, w)

        starts = jnp.arange(0, t.nlevels, chunk)
        blocks = lax.map(solve_chunk, starts).reshape(-1, t.d, t.d)
        out.append(blocks[: t.nlevels])
    return out

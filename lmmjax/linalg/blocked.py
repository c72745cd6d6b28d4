"""The blocked Cholesky factorisation of ``A(theta) = Lambda' Z' Z Lambda + I``.

Pure ``jax.numpy``; every function is jit-compatible and differentiable.
Vectors and matrices in the random-effect space are carried in blocked form
``(x1, x2)``: ``x1`` of shape (M1, d1, k) for the first term (level-major) and
``x2`` of shape (q_rest, k) for the stacked remaining terms. That form never
leaves this package: callers pass :class:`~lmmjax.linalg.products.CrossProducts`
and get per-term arrays back.

With ``L11`` the batched Cholesky factor of the block-diagonal first block,
the off-diagonal factor ``L21 = Lambda_r' B Lambda_1 L11^{-T}`` (``B = Z_r' Z_1``)
is never formed: it is applied through the sparse pattern of ``B``. The
Schur complement ``Lambda_r' (C - B W B') Lambda_r + I`` with
``W_j = Lambda_1 A11_j^{-1} Lambda_1'`` is assembled from precomputed pairs
and factored densely as ``L22``.

With ``V = I + Z Lambda Lambda' Z'`` (the marginal covariance of the response
over ``sigma^2``), Woodbury's identity and the determinant lemma give

    M' V^{-1} M = M' M - (L^{-1} Lambda' Z' M)' (L^{-1} Lambda' Z' M),
    log|V| = log|A|,

which is all the profiled likelihood and the NUTS potential need
(:func:`gls_gram`), and the conditional distribution of the spherical effects
``u | y ~ N(A^{-1} Lambda' Z' r, sigma^2 A^{-1})`` (:func:`conditional_moments`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmmjax.linalg.dense import cholesky, logdet_quad, tri_solve
from lmmjax.linalg.products import CrossProducts
from lmmjax.linalg.small import (
    SmallSystem,
    small_cov,
    small_gls_gram,
    small_lambda,
    small_mean,
)
from lmmjax.linalg.structure import Layout, Structure, packed_index


class Factor(NamedTuple):
    """Cholesky factor ``L`` of ``A(theta)`` in blocked form."""

    lambdas: tuple  # per term (d, d) lower-triangular relative covariance factors
    L11: jax.Array  # (M1, d1, d1)
    L22: jax.Array  # (q_rest, q_rest)


def make_lambdas(theta: jax.Array, struct: Structure) -> tuple[jax.Array, ...]:
    """Split theta into each term's lower-triangular factor Lambda_l (lme4 order).

    For a :class:`~lmmjax.linalg.small.SmallSystem`, the one dense padded
    ``Lambda`` instead (theta padded to the system's length).
    """
    if isinstance(struct, SmallSystem):
        return small_lambda(theta, struct)
    out, k = [], 0
    for t in struct.layout.terms:
        lam = jnp.zeros((t.d, t.d), dtype=theta.dtype)
        lam = lam.at[t.theta_rows, t.theta_cols].set(theta[k : k + t.ntheta])
        out.append(lam)
        k += t.ntheta
    return tuple(out)


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
        pieces.append(lambda_left(lam, blk, transpose=transpose).reshape(t.q, -1))
    return jnp.concatenate(pieces, axis=0)


def first_left(x1: jax.Array, lam1: jax.Array, *, transpose: bool = True) -> jax.Array:
    """Multiply each level's block (M1, d1, k) by ``Lambda_1'`` (or ``Lambda_1``)."""
    return lambda_left(lam1, x1, transpose=transpose)


SMALL_D = 4  # Lambda's order up to which products with it are written as broadcasts


def lambda_left(lam: jax.Array, x: jax.Array, *, transpose: bool = True) -> jax.Array:
    """``Lambda' x_m`` (or ``Lambda x_m``) for every block ``x_m`` of ``x`` (..., d, k).

    Up to order :data:`SMALL_D` the product is ``d`` broadcast multiply-adds,
    which XLA fuses into one loop over ``x``: as a matrix product with an inner
    dimension of 2, each (levels * k, 2) x (2, 2) product ran at about 0.6
    GFLOP/s on a CPU (dillonE1's potential spent about 40% of a gradient in
    them and in the transposes around them).
    """
    m = lam.T if transpose else lam  # the result is m @ x_m
    d = lam.shape[0]
    if d > SMALL_D:
        return jnp.einsum("ac,...ck->...ak", m, x)
    return sum(m[:, c, None] * x[..., c, None, :] for c in range(d))


B_CHUNK = 1 << 22  # B's entries per step of a product with B, where it has over twice as many


def _over_entries(step, struct: Structure, init: jax.Array) -> jax.Array:
    """``init + sum_c step(row_c, lev_c, val_c)`` over B's entries, chunk by chunk.

    A product with ``B`` gathers one (k,) row per entry: held at once, that is
    an (entries, k) temporary, and its gradient another (2 GB for the 6e7
    entries of 1e5 x 1e3 crossed levels and k = 4). In chunks of ``B_CHUNK``
    entries under :func:`jax.checkpoint` (nothing stored per chunk) the
    temporaries are chunk-sized, the gradient and Hessian (forward over
    reverse) stay exact, and it also runs several times faster on a CPU.
    """
    arrays = (struct.b_row, struct.b_lev, struct.b_val)
    n = arrays[0].shape[0] // B_CHUNK

    @jax.checkpoint
    def body(acc, i):
        part = [lax.dynamic_slice_in_dim(a, i * B_CHUNK, B_CHUNK) for a in arrays]
        return acc + step(*part), None

    acc, _ = lax.scan(body, init, jnp.arange(n))
    return acc + step(*(a[n * B_CHUNK :] for a in arrays))


def _b_times(struct: Structure, x1: jax.Array) -> jax.Array:
    """``B x1`` with ``B = Z_r' Z_1``: (M1, d1, k) -> (q_rest, k)."""
    if struct.layout.dense_b:
        return jnp.einsum("rmd,mdk->rk", struct.B, x1)
    q = struct.layout.q_rest

    def step(row, lev, val):
        return jax.ops.segment_sum(jnp.einsum("nd,ndk->nk", val, x1[lev]), row, q)

    if struct.b_val.shape[0] > 2 * B_CHUNK:
        return _over_entries(step, struct, jnp.zeros((q, x1.shape[-1]), x1.dtype))
    return step(struct.b_row, struct.b_lev, struct.b_val)


def _bt_times(struct: Structure, x2: jax.Array) -> jax.Array:
    """``B' x2``: (q_rest, k) -> (M1, d1, k)."""
    if struct.layout.dense_b:
        return jnp.einsum("rmd,rk->mdk", struct.B, x2)
    m1, d1 = struct.layout.first.nlevels, struct.layout.first.d

    def step(row, lev, val):
        contrib = val[:, :, None] * x2[row][:, None, :]
        return jax.ops.segment_sum(contrib, lev, m1, indices_are_sorted=True)

    if struct.b_val.shape[0] > 2 * B_CHUNK:
        return _over_entries(step, struct, jnp.zeros((m1, d1, x2.shape[-1]), x2.dtype))
    return step(struct.b_row, struct.b_lev, struct.b_val)


def schur_weights(struct: Structure, lam1: jax.Array) -> jax.Array:
    """``W_g = Lambda_1 (Lambda_1' G_g Lambda_1 + I)^{-1} Lambda_1'`` per Gram group."""
    d1 = lam1.shape[0]
    Aw = first_left(first_left(struct.Gw, lam1).transpose(0, 2, 1), lam1) + jnp.eye(
        d1, dtype=lam1.dtype
    )
    Lw = cholesky(Aw)
    Y = tri_solve(Lw, jnp.broadcast_to(lam1.T, Aw.shape))
    return jnp.einsum("gka,gkb->gab", Y, Y)


def schur_blocks(
    struct: Structure, lambdas: tuple, *, lower: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``L11`` (batched Cholesky of the first block) and the dense Schur complement ``A22``.

    ``A22 = Lambda_r' (C - B W B') Lambda_r + I`` is returned unfactored, shape
    (q_rest, q_rest); it is empty when the model has one term. With ``lower``
    only its lower triangle is meant (for ``logdet_quad(..., lower=True)``):
    where ``B W B'`` comes from the pairs and every other term is scalar,
    ``A22`` is then assembled without a transpose of a (q_rest, q_rest) array
    (InstEval's 1156 x 1156 block: value and gradient 88 -> 82 ms in one A/B run).
    """
    layout = struct.layout
    lam1 = lambdas[0]
    d1 = layout.first.d
    A11 = first_left(first_left(struct.G1, lam1).transpose(0, 2, 1), lam1) + jnp.eye(
        d1, dtype=lam1.dtype
    )
    L11 = cholesky(A11)
    if not layout.has_rest:
        return L11, jnp.zeros((0, 0), dtype=L11.dtype)
    q = layout.q_rest
    W = schur_weights(struct, lam1)
    if layout.dense_b:  # S = B W B' by two dense products
        Wb = W[struct.wgroup]  # (levels, d1, d1); B W per level as broadcasts (lambda_left)
        if d1 > SMALL_D:
            BW = jnp.einsum("rma,mab->rmb", struct.B, Wb)
        else:
            BW = sum(struct.B[..., a, None] * Wb[:, a, :] for a in range(d1))
        S = BW.reshape(q, -1) @ struct.B.reshape(q, -1).T
    elif layout.dense_pairs:  # S = sum_g <W_g, B_g B_g'> over the Gram groups, held dense
        tri = struct.pair_val.reshape(struct.pair_val.shape[0], -1) @ W.reshape(-1)
        S = tri[packed_index(q)]
    else:  # S from the aggregated pairs of B rows that share a level (lower triangle)
        vals = jnp.einsum("pab,pab->p", struct.pair_val, W[struct.pair_group])
        S = jax.ops.segment_sum(vals, struct.pair_entry, q * q, indices_are_sorted=True)
        S = S.reshape(q, q)
        if lower and all(t.d == 1 for t in layout.rest):  # Lambda_r diagonal: no transposes
            scale = rest_left(jnp.ones((q, 1), S.dtype), lambdas, layout)
            return L11, scale * (struct.C - S) * scale.T + jnp.eye(q, dtype=S.dtype)
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
    L22 = cholesky(A22) if struct.layout.has_rest else A22
    return Factor(lambdas, L11, L22)


def l21_times(struct: Structure, L11: jax.Array, lambdas: tuple, w1: jax.Array) -> jax.Array:
    """``L21 w1 = Lambda_r' B Lambda_1 L11^{-T} w1`` without forming ``L21``."""
    t1 = first_left(tri_solve(L11, w1, transpose=True), lambdas[0], transpose=False)
    return rest_left(_b_times(struct, t1), lambdas, struct.layout)


def lambda_t(struct: Structure, lambdas: tuple, xp: CrossProducts):
    """``Lambda' Z' M`` in blocked form from the cross products."""
    c2 = rest_left(xp.rest, lambdas, struct.layout) if struct.layout.has_rest else xp.rest
    return first_left(xp.first, lambdas[0]), c2


def logdet_and_quad(struct: Structure, lambdas: tuple, xp: CrossProducts):
    """``log|A|`` and ``c' A^{-1} c`` (k x k) for ``c = Lambda' Z' M``, differentiably.

    Equal to ``logdet(F)`` and ``w'w`` with ``w = L^{-1} c`` from
    :func:`factorize`, but the dense Schur block goes through
    :func:`lmmjax.linalg.dense.logdet_quad`, whose gradient needs one
    inverse instead of reverse mode through its Cholesky factor.

    Parameters
    ----------
    struct : Structure
    lambdas : tuple of (d, d) arrays
    xp : CrossProducts
        Of the k columns ``M``.

    Returns
    -------
    logdet_A : scalar
    quad : array (k, k)
    """
    c1, c2 = lambda_t(struct, lambdas, xp)
    L11, A22 = schur_blocks(struct, lambdas, lower=True)
    w1 = tri_solve(L11, c1)
    logdet_A = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L11, axis1=1, axis2=2)))
    quad = jnp.einsum("mak,mal->kl", w1, w1)
    if struct.layout.has_rest:
        R2 = c2 - l21_times(struct, L11, lambdas, w1)
        logdet_22, quad_22 = logdet_quad(A22, R2, lower=True)
        logdet_A, quad = logdet_A + logdet_22, quad + quad_22
    return logdet_A, quad


def gls_gram(struct: Structure, lambdas: tuple, xp: CrossProducts):
    """``log|V|`` and ``M' V^{-1} M`` for ``V = I + Z Lambda Lambda' Z'``.

    The work shared by the profiled REML/ML objective (``M = [X y]``) and the
    NUTS marginal likelihood (``M`` the residual). O(q) for the first term
    plus a dense (q_rest x q_rest) Cholesky; never touches the N rows.

    Returns
    -------
    logdet_V : scalar
    gram : array (k, k)
    """
    if isinstance(struct, SmallSystem):  # dense and padded (lmmjax.linalg.small)
        return small_gls_gram(struct, lambdas, xp)
    logdet_A, quad = logdet_and_quad(struct, lambdas, xp)
    return logdet_A, xp.gram - quad


def logdet(factor: Factor) -> jax.Array:
    """``log|A| = 2 sum log diag L``."""
    d11 = jnp.diagonal(factor.L11, axis1=1, axis2=2)
    return 2.0 * (jnp.sum(jnp.log(d11)) + jnp.sum(jnp.log(jnp.diagonal(factor.L22))))


def _solve_lower(struct: Structure, factor: Factor, c1: jax.Array, c2: jax.Array):
    """Solve ``L w = c`` for ``c`` in blocked form (M1, d1, k), (q_rest, k)."""
    w1 = tri_solve(factor.L11, c1)
    if not struct.layout.has_rest:
        return w1, c2
    return w1, tri_solve(factor.L22, c2 - l21_times(struct, factor.L11, factor.lambdas, w1))


def _solve_upper(struct: Structure, factor: Factor, w1: jax.Array, w2: jax.Array):
    """Solve ``L' u = w`` for ``w`` in blocked form."""
    if not struct.layout.has_rest:
        return tri_solve(factor.L11, w1, transpose=True), w2
    u2 = tri_solve(factor.L22, w2, transpose=True)
    y = _bt_times(struct, rest_left(u2, factor.lambdas, struct.layout, transpose=False))
    l21tu = tri_solve(factor.L11, first_left(y, factor.lambdas[0]))
    return tri_solve(factor.L11, w1 - l21tu, transpose=True), u2


def to_terms(struct: Structure, x1: jax.Array, x2: jax.Array) -> list[jax.Array]:
    """Split a blocked array into per-term arrays of shape (M_l, d_l, k)."""
    out = [x1]
    for t in struct.layout.rest:
        out.append(x2[t.offset : t.offset + t.q].reshape(t.nlevels, t.d, -1))
    return out


def level_sums(struct: Structure, xp: CrossProducts) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each term's ``Z_l' M`` (M_l, d_l, k) and ``diag(Z_l' Z_l)`` (M_l, d_l), in NumPy.

    Per level and lhs column: the sums over the level's rows of ``z_c M`` and
    of ``z_c^2``, from the products a fit holds (for starting values).
    """
    first, rest = np.asarray(xp.first), np.asarray(xp.rest)
    out = [(first, np.diagonal(np.asarray(struct.G1), axis1=1, axis2=2))]
    if struct.layout.has_rest:  # C's diagonal only leaves an accelerator
        C = struct.C
        diag = (
            np.diagonal(np.asarray(C))
            if jax.default_backend() == "cpu"
            else np.asarray(C.diagonal())
        )
        for t in struct.layout.rest:
            rows = slice(t.offset, t.offset + t.q)
            out.append((rest[rows].reshape(t.nlevels, t.d, -1), diag[rows].reshape(t.nlevels, t.d)))
    return out


def to_blocked(struct: Structure, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A (q, k) array in the blocked order -> blocked form."""
    lay = struct.layout
    return flat[: lay.first.q].reshape(lay.first.nlevels, lay.first.d, -1), flat[lay.first.q :]


def effects(struct: Structure, lambdas: tuple, u1: jax.Array, u2: jax.Array) -> tuple:
    """Per-term effects ``b_l = Lambda_l u_l`` (M_l, d_l) of one blocked spherical vector."""
    us = to_terms(struct, u1, u2)
    return tuple(jnp.einsum("ac,mck->ma", lam, u) for lam, u in zip(lambdas, us, strict=True))


class Moments(NamedTuple):
    """The conditional distribution of the random effects ``b_l = Lambda_l u_l`` given y.

    Attributes
    ----------
    mean : tuple of arrays (M_l, d_l)
        ``E[b_l | y]``: lme4's conditional modes.
    cov : tuple of arrays (M_l, d_l, d_l) or None
        The diagonal blocks of ``Cov[b_l | y]``, one per level (lme4's ``condVar``),
        when asked for.
    draw : tuple of arrays (M_l, d_l) or None
        One exact draw from the conditional, when a key was given.
    """

    mean: tuple
    cov: tuple | None
    draw: tuple | None


def conditional_moments(
    struct: Structure,
    lambdas: tuple,
    xp: CrossProducts,
    sigma: jax.Array,
    *,
    cov: bool = False,
    key: jax.Array | None = None,
    chunk: int = 128,
) -> Moments:
    """Conditional mean, covariance blocks and a draw of the random effects given y.

    With ``r`` the residual after the fixed effects (and any terms not in
    ``struct``), ``u | y ~ N(A^{-1} Lambda' Z' r, sigma^2 A^{-1})`` and
    ``b_l = Lambda_l u_l``. The one routine behind REML's conditional modes and
    variances and the exact recovery of marginalised effects in NUTS.

    Parameters
    ----------
    struct : Structure
    lambdas : tuple of (d, d) arrays
        Relative covariance factors ``Lambda_l`` (covariance ``sigma^2 Lambda Lambda'``).
    xp : CrossProducts
        Of the single column ``r`` (see :meth:`CrossProducts.combine`).
    sigma : scalar
        Residual standard deviation.
    cov : bool (static)
        Also compute the diagonal blocks of the conditional covariance
        (``chunk`` levels at a time with :func:`jax.lax.map`).
    key : jax.random key, optional
        Draw once from the conditional: ``u = L^{-T} (L^{-1} c + sigma e)``.
    chunk : int (static)

    Returns
    -------
    Moments
        For a :class:`~lmmjax.linalg.small.SmallSystem`, the mean as one flat
        padded vector (``SmallLayout.unpack`` splits it by term) and the whole
        padded (Q, Q) covariance (``SmallLayout.blocks`` takes each level's block).
    """
    if isinstance(struct, SmallSystem):
        if key is not None:
            raise NotImplementedError("a SmallSystem gives conditional means and covariances")
        blocks = (sigma**2 * small_cov(struct, lambdas),) if cov else None
        return Moments((small_mean(struct, lambdas, xp),), blocks, None)
    factor = factorize(struct, lambdas)
    w1, w2 = _solve_lower(struct, factor, *lambda_t(struct, lambdas, xp))

    mean = effects(struct, lambdas, *_solve_upper(struct, factor, w1, w2))
    draw = None
    if key is not None:
        k1, k2 = jax.random.split(key)
        e1 = jax.random.normal(k1, w1.shape, w1.dtype)
        e2 = jax.random.normal(k2, w2.shape, w2.dtype)
        u1, u2 = _solve_upper(struct, factor, w1 + sigma * e1, w2 + sigma * e2)
        draw = effects(struct, lambdas, u1, u2)
    blocks = None
    if cov:
        blocks = tuple(
            sigma**2 * jnp.einsum("ac,mcd,bd->mab", lam, blk, lam)
            for lam, blk in zip(lambdas, _inverse_diag_blocks(struct, factor, chunk), strict=True)
        )
    return Moments(mean, blocks, draw)


def _inverse_diag_blocks(struct: Structure, factor: Factor, chunk: int) -> list[jax.Array]:
    """Diagonal blocks of ``A^{-1}``, one (M_l, d_l, d_l) array per term.

    ``A^{-1} = L^{-T} L^{-1}``, so a level's block is the Gram matrix of the
    matching columns of ``L^{-1}``; they are solved ``chunk`` levels at a time
    with :func:`lax.map`, never holding more than q x (chunk d) numbers.
    """
    layout = struct.layout
    q_total = layout.q
    dtype = factor.L11.dtype
    offsets = [0, *np.cumsum([t.q for t in layout.terms])]
    out = []
    for t, offset in zip(layout.terms, offsets, strict=False):

        def solve_chunk(start, t=t, offset=offset):
            levels = start + jnp.arange(chunk)
            cols = (offset + levels[:, None] * t.d + jnp.arange(t.d)[None, :]).reshape(-1)
            valid = jnp.repeat(levels < t.nlevels, t.d)
            e = ((jnp.arange(q_total)[:, None] == cols[None, :]) & valid[None, :]).astype(dtype)
            w1, w2 = _solve_lower(struct, factor, *to_blocked(struct, e))
            w = jnp.concatenate([w1.reshape(layout.first.q, -1), w2], axis=0)
            w = w.reshape(q_total, chunk, t.d)
            return jnp.einsum("kma,kmb->mab", w, w)

        starts = jnp.arange(0, t.nlevels, chunk)
        blocks = lax.map(solve_chunk, starts).reshape(-1, t.d, t.d)
        out.append(blocks[: t.nlevels])
    return out


def factor_entries(struct: Structure) -> int:
    """Numbers held by one factorisation's dense block (for sizing batches)."""
    return struct.layout.q_rest**2

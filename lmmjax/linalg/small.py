"""Small problems as dense level-sized matrices, padded so that one program serves many models.

A model with few random effects (``q <= MAX_Q``) is held as ``Z'Z`` (q x q),
``Z'M`` and ``M'M``, formed once in NumPy from a sparse Z (no dense N x q
design), and ``Lambda(theta)`` is scattered from theta by index arrays that
are data, not program constants. Nothing in the compiled program then depends
on N, on the number of terms, their widths or their levels: only on

* ``Q``, q rounded up to a bucket (rows and columns beyond q are zero in
  ``Z'Z``, ``Z'M`` and ``Lambda``, so ``A = Lambda' Z'Z Lambda + I`` is the
  identity there and adds nothing to ``log|A|`` or ``M' V^{-1} M``);
* ``T``, the length of theta rounded up (the padded entries are never read);
* ``K``, the number of nonzeros of ``Lambda`` rounded up (padded entries add
  zero);
* ``P``, the number of columns of ``M = [X y]`` rounded up, with
  ``pad_fixed``: padded fixed-effect columns sit between ``X`` and ``y``,
  orthogonal to everything with unit norm, so their rows of the Cholesky
  factor of ``M' V^{-1} M`` are those of the identity (log 1 = 0) and their
  coefficients are 0. The true ``p`` is data (``SmallSystem.p``), for the
  REML count ``n - p``.

So one compiled REML program serves Dyestuff, Penicillin, Pastes and
sleepstudy alike, and the persistent compile cache serves it across
processes. Compiling a model's own blocked program costs 0.5-1 s on a 2-core
CPU, which dominates a small fit; the dense program's evaluations cost tens
of microseconds at these sizes (issue 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from lmmjax.linalg.dense import cholesky, logdet_quad, tri_solve
from lmmjax.linalg.products import DenseProducts
from lmmjax.linalg.structure import device_array

__all__ = [
    "MAX_Q",
    "SmallDerivatives",
    "SmallLayout",
    "SmallSystem",
    "closed_form_fits",
    "small_derivatives",
    "small_gls_gram",
    "small_cov",
    "small_lambda",
    "small_mean",
    "small_system",
]

MAX_Q = 256  # random effects up to which a model takes the dense path
_LEAST = {"Q": 64, "T": 4, "K": 64, "P": 4}  # smallest bucket of each padded size


def bucket(n: int, least: int) -> int:
    """``n`` rounded up to a power of two, at least ``least``."""
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


class SmallSystem(NamedTuple):
    """The Z-only part of a small model (a JAX pytree of arrays only).

    Attributes
    ----------
    ZtZ : array (Q, Q)
    lam_pos : int array (K,)
        Flat index ``row * Q + col`` of each nonzero of ``Lambda``.
    lam_theta : int array (K,)
        Which theta entry it holds; ``T`` (one past the end) for padding.
    n : array ()
        Number of observations, as data, so that N is not a program constant.
    p : array ()
        Number of fixed effects (without the padding), as data.
    """

    ZtZ: jax.Array
    lam_pos: jax.Array
    lam_theta: jax.Array
    n: jax.Array
    p: jax.Array

    @property
    def nobs(self) -> jax.Array:
        return self.n

    @property
    def dtype(self):
        return self.ZtZ.dtype

    @property
    def q(self) -> int:
        """The padded number of random effects ``Q`` (static)."""
        return self.ZtZ.shape[0]


@dataclass(frozen=True)
class SmallLayout:
    """Host-side bookkeeping: theta's padding and where each term's effects lie.

    Attributes
    ----------
    ntheta : int
        Length of the model's theta.
    size : int
        ``T``, the padded length the program takes.
    terms : tuple of (offset, nlevels, d)
        Each term's block of the (level-major) random effects, in model order.
    nfixed : int
        The true number of fixed effects ``p`` (the padded ones follow them).
    """

    ntheta: int
    size: int
    terms: tuple[tuple[int, int, int], ...]
    nfixed: int

    def pad(self, theta) -> np.ndarray:
        """Theta padded with zeros to the program's length."""
        out = np.zeros(self.size)
        out[: self.ntheta] = np.asarray(theta, dtype=float)
        return out

    def fixed(self, beta, vcov) -> tuple[np.ndarray, np.ndarray]:
        """The true fixed effects and their covariance, without the padding."""
        p = self.nfixed
        return np.asarray(beta)[..., :p], np.asarray(vcov)[..., :p, :p]

    def blocks(self, cov) -> tuple[np.ndarray, ...]:
        """Each term's per-level (M_l, d_l, d_l) diagonal blocks of a padded (Q, Q) matrix."""
        cov = np.asarray(cov, dtype=float)
        out = []
        for o, m, d in self.terms:
            idx = o + np.arange(m)[:, None] * d + np.arange(d)  # (M, d)
            out.append(cov[idx[:, :, None], idx[:, None, :]])
        return tuple(out)

    def unpack(self, flat) -> tuple[np.ndarray, ...]:
        """Each term's (M_l, d_l) effects from the padded flat vector."""
        flat = np.asarray(flat, dtype=float).reshape(-1)
        return tuple(flat[o : o + m * d].reshape(m, d) for o, m, d in self.terms)


def sparse_design(terms, nobs: int) -> scipy.sparse.csc_matrix:
    """The random-effect design Z (N x q, level-major within each term) as a sparse matrix."""
    rows, cols, vals, offset = [], [], [], 0
    for t in terms:
        for c in range(t.d):
            rows.append(np.arange(nobs))
            cols.append(offset + np.asarray(t.refs, dtype=np.int64) * t.d + c)
            vals.append(np.asarray(t.z[:, c], dtype=float))
        offset += t.q
    return scipy.sparse.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nobs, offset)
    )


def small_system(terms, M: np.ndarray, dtype, *, pad_fixed: bool = False):
    """The padded dense system of the terms and dense columns ``M`` (N, k); O(N sum d_l).

    None when the terms have more than :data:`MAX_Q` random effects.

    Parameters
    ----------
    terms : sequence of Term
        Random-effect terms, in the model's order (theta's order).
    M : array (N, k)
        Dense columns: ``[X y]``, already weighted where the model has prior
        weights, for the profiled likelihood.
    dtype
        Floating-point type of the arrays.
    pad_fixed : bool
        ``M`` is ``[X y]``: pad X's columns to a bucket size (see the module's
        notes); otherwise the columns are kept as they are.

    Returns
    -------
    (SmallSystem, DenseProducts, SmallLayout) or None
    """
    if sum(t.q for t in terms) > MAX_Q:
        return None
    M = np.asarray(M, dtype=float)
    Z = sparse_design(terms, M.shape[0])
    q = Z.shape[1]
    Q = bucket(q, _LEAST["Q"])
    ZtZ = np.zeros((Q, Q))
    ZtZ[:q, :q] = (Z.T @ Z).toarray()
    k = M.shape[1]
    P = bucket(k, _LEAST["P"]) if pad_fixed else k
    cols = np.r_[np.arange(k - 1), P - 1]  # X's columns first, y last, padding between
    ZtM = np.zeros((Q, P))
    ZtM[:q, cols] = Z.T @ M
    MtM = np.eye(P)
    MtM[np.ix_(cols, cols)] = M.T @ M
    pos, which, spans, offset, nth = [], [], [], 0, 0
    for t in terms:
        r, c = t.theta_index()
        base = offset + np.arange(t.nlevels)[:, None] * t.d  # (M, 1): each level's first row
        pos.append((((base + r) * Q) + base + c).reshape(-1))
        which.append(np.tile(nth + np.arange(t.ntheta), t.nlevels))
        spans.append((offset, t.nlevels, t.d))
        offset, nth = offset + t.q, nth + t.ntheta
    T = bucket(nth, _LEAST["T"])
    pos, which = np.concatenate(pos), np.concatenate(which)
    K = bucket(pos.size, _LEAST["K"])
    pad = K - pos.size
    system = SmallSystem(
        device_array(ZtZ, dtype),
        device_array(np.concatenate([pos, np.zeros(pad, np.int64)]), np.int32),
        device_array(np.concatenate([which, np.full(pad, T, np.int64)]), np.int32),
        device_array(float(M.shape[0]), dtype),
        device_array(float(k - 1), dtype),
    )
    products = DenseProducts(device_array(ZtM, dtype), device_array(MtM, dtype))
    return system, products, SmallLayout(nth, T, tuple(spans), k - 1)


def small_lambda(theta: jax.Array, system: SmallSystem) -> jax.Array:
    """The dense (Q, Q) ``Lambda(theta)``, from theta padded to length ``T``."""
    values = jnp.append(theta, jnp.zeros(1, theta.dtype))[system.lam_theta]
    Q = system.q
    return jnp.zeros(Q * Q, theta.dtype).at[system.lam_pos].add(values).reshape(Q, Q)


def _a_matrix(system: SmallSystem, lam: jax.Array) -> jax.Array:
    return lam.T @ system.ZtZ @ lam + jnp.eye(system.q, dtype=lam.dtype)


def small_gls_gram(system: SmallSystem, lam: jax.Array, xp: DenseProducts):
    """``log|V|`` and ``M' V^{-1} M`` with ``V = I + Z Lambda Lambda' Z'``.

    Through ``A = Lambda' Z'Z Lambda + I``: ``log|V| = log|A|`` and
    ``M' V^{-1} M = M'M - (Lambda' Z'M)' A^{-1} (Lambda' Z'M)``.
    """
    logdet_a, quad = logdet_quad(_a_matrix(system, lam), lam.T @ xp.zt)
    return logdet_a, xp.gram - quad


def small_cov(system: SmallSystem, lam: jax.Array) -> jax.Array:
    """``Lambda A^{-1} Lambda'`` (Q, Q): the conditional covariance of b over ``sigma^2``."""
    L = cholesky(_a_matrix(system, lam))
    W = tri_solve(L, lam.T)  # L^{-1} Lambda'
    return W.T @ W


def small_mean(system: SmallSystem, lam: jax.Array, xp: DenseProducts) -> jax.Array:
    """Conditional mean ``Lambda A^{-1} Lambda' Z' r`` (Q,) of the single column ``r`` of ``xp``."""
    L = cholesky(_a_matrix(system, lam))
    u = tri_solve(L, tri_solve(L, lam.T @ xp.zt), transpose=True)
    return (lam @ u)[:, 0]


class SmallDerivatives(NamedTuple):
    """First and second derivatives in theta of a small system's log-determinants.

    ``Omega(theta) = D' G D + diag(I, 0)`` with ``D = diag(Lambda, I)`` and
    ``G = [Z M]' [Z M]`` is the augmented system. Its leading blocks have the
    log-determinants ``log|A|`` (the first ``Q`` rows), ``log|A| + log|X'
    V^-1 X|`` (all but the last) and that plus ``log r^2`` (all); the three
    pieces ``log|A|``, ``log|X' V^-1 X|`` and ``log r^2`` are differentiated
    each on its own, with no difference of the cumulative ones (in float32,
    ``r^2``'s derivatives as such a difference lost ``N eps`` relative). The
    padded columns of ``X`` add nothing.

    Attributes
    ----------
    grad : array (3, T)
        Derivatives of ``log|A|``, ``log|X' V^-1 X|`` and ``log r^2``.
    hess : array (3, T, T)
        Their second derivatives.
    r2 : array ()
        The penalised residual sum of squares ``r^2``.
    fixed_inv : array (P - 1, P - 1)
        ``(X' V^-1 X)^-1`` (the identity in the padded rows and columns).
    fixed_inv_jac : array (T, P - 1, P - 1)
        Its derivatives (zero in the padded rows and columns).
    """

    grad: jax.Array
    hess: jax.Array
    r2: jax.Array
    fixed_inv: jax.Array
    fixed_inv_jac: jax.Array


# closed form up to these sizes: its (K, K) pairs of Lambda's nonzeros and (T, m, m)
# products outgrow reverse-over-reverse autodiff's memory and time beyond them (a review:
# 16 correlated effects on 16 levels, K = 4096, first coef_table 4.7 s and 1.8 GB
# against 3.4 s and 1.3 GB; at K = 2048, T = 64 it was 0.69 s against 0.91 s)
MAX_PAIRS = 2048
MAX_PRODUCTS = 1 << 23


def closed_form_fits(theta_size: int, system: SmallSystem, xp: DenseProducts) -> bool:
    """Whether :func:`small_derivatives` is within its sizes, theta of ``theta_size`` (static)."""
    m = system.q + xp.zt.shape[1]
    return system.lam_pos.shape[0] <= MAX_PAIRS and theta_size * m * m <= MAX_PRODUCTS


def small_derivatives(theta: jax.Array, system: SmallSystem, xp: DenseProducts):
    """:class:`SmallDerivatives` at ``theta``, in closed form from one Cholesky factor.

    With ``L`` the factor of ``Omega`` and ``Y_i = L^-1 (dOmega / dtheta_i) L^-T``,
    a leading block ``B`` has ``d log|Omega_B| = tr_B(Y_i)`` and
    ``d2 log|Omega_B| = tr(Omega_B^-1 Omega_ij) - sum_B Y_i (.) Y_j``, because
    the leading block of ``Y_i`` is ``L_B^-1 (dOmega_i)_B L_B^-T``. Each
    piece's are the sums over the rows (and the pairs of rows) that its block
    adds to the one before. ``Omega`` is quadratic in theta, so ``Omega_ij``
    pairs the nonzeros of ``Lambda``'s patterns through ``Z'Z``. For
    sleepstudy's Satterthwaite pieces
    (:func:`lmmjax.reml.objective.small_vcov_pieces`), alone in a program
    compiled quickly: trace, lowering and compile 0.18-0.20 s and a run
    1.6-1.9 ms, against 0.71-0.81 s and 5.7-6.4 ms by reverse-over-reverse
    autodiff (:func:`lmmjax.reml.objective.vcov_pieces`).
    """
    Q, P = xp.zt.shape
    m, T, dtype = Q + P, theta.shape[0], theta.dtype
    lam = small_lambda(theta, system)
    lzm = lam.T @ xp.zt
    L = cholesky(jnp.block([[_a_matrix(system, lam), lzm], [lzm.T, xp.gram]]))
    rows, cols = system.lam_pos // Q, system.lam_pos % Q
    # dOmega_i = S_i + S_i' with S_i = E_i' (G D)[:Q], E_i theta_i's 0/1 pattern in Lambda
    gd = jnp.concatenate([system.ZtZ @ lam, xp.zt], axis=1)  # (Q, m)
    S = jnp.zeros((T + 1, m, m), dtype).at[system.lam_theta, cols].add(gd[rows])[:T]
    dOmega = S + jnp.swapaxes(S, 1, 2)
    half = tri_solve(L, jnp.moveaxis(dOmega, 0, 1).reshape(m, T * m))  # L^-1 dOmega_i
    half = jnp.moveaxis(half.reshape(m, T, m), 1, 0)
    # Y_i = L^-1 (L^-1 dOmega_i)': the rows of the second solve are half_i's columns
    Y = tri_solve(L, jnp.transpose(half, (2, 1, 0)).reshape(m, m * T))
    Y = jnp.moveaxis(Y.reshape(m, m, T), 2, 0)
    piece = jnp.searchsorted(jnp.array([Q, m - 1]), jnp.arange(m), side="right")  # row's piece
    own = (piece == jnp.arange(3)[:, None]).astype(dtype)  # (3, m): the rows each adds
    grad = own @ jnp.diagonal(Y, axis1=1, axis2=2).T
    region = jnp.maximum(piece[:, None], piece[None, :]) == jnp.arange(3)[:, None, None]
    second = jnp.einsum("bixy,jxy->bij", region.astype(dtype)[:, None] * Y, Y)
    # tr(Omega_B^-1 Omega_ij) = 2 sum over nonzeros s of theta_i, t of theta_j of
    # (Z'Z)[row_s, row_t] (Omega_B^-1)[col_s, col_t]; Omega_B^-1's first Q columns from L^-1
    W = tri_solve(L, jnp.eye(m, Q, dtype=dtype))[:, cols]  # (m, K)
    inv_pairs = jnp.einsum("bxs,xt->bst", own[:, :, None] * W, W)
    which = (system.lam_theta[:, None] == jnp.arange(T)).astype(dtype)  # (K, T)
    pairs = system.ZtZ[rows[:, None], rows[None, :]] * inv_pairs
    first = 2.0 * jnp.einsum("si,bst,tj->bij", which, pairs, which)
    Rinv = tri_solve(L[Q:-1, Q:-1], jnp.eye(P - 1, dtype=dtype))
    jac = -jnp.einsum("xa,ixy,yb->iab", Rinv, Y[:, Q:-1, Q:-1], Rinv)
    return SmallDerivatives(grad, first - second, L[-1, -1] ** 2, Rinv.T @ Rinv, jac)

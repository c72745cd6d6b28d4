"""Products with the random-effect design Z, which is never formed.

``Z b`` is a gather per term and ``Z' M`` a segment sum per term, both O(N d).
On an accelerator, a term of few levels gathers and sums by comparing each
row's level with every level instead (:func:`take_levels`, :func:`sum_levels`).
Cross products of Z with dense columns ``M`` (``[X y]`` for the profiled
likelihood, a residual for the NUTS potential) are kept apart from the
Z-only :class:`~lmmjax.linalg.structure.Structure` as a
:class:`CrossProducts` pytree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmmjax.linalg.structure import Structure


class CrossProducts(NamedTuple):
    """``Z' M`` in blocked form and ``M' M`` for dense columns ``M`` (N, k).

    Attributes
    ----------
    first : array (M1, d1, k)
        ``Z_1' M`` per level of the first term.
    rest : array (q_rest, k)
        ``Z_rest' M`` for the stacked other terms.
    gram : array (k, k)
        ``M' M``.
    """

    first: jax.Array
    rest: jax.Array
    gram: jax.Array

    def combine(self, coef: jax.Array) -> CrossProducts:
        """The cross products of the single column ``M coef``."""
        c = coef[:, None]
        return CrossProducts(self.first @ c, self.rest @ c, c.T @ self.gram @ c)

    def residual(self, beta: jax.Array) -> CrossProducts:
        """For ``M = [X y]``: the cross products of the residual ``y - X beta``."""
        return self.combine(residual_coef(beta))


class DenseProducts(NamedTuple):
    """``Z' M`` held as one dense (q, k) array (or a rotation of it) and ``M' M`` (k, k).

    The cross products of a small model's padded dense system
    (:mod:`lmmjax.linalg.small`) and the rotated ones of the eigen fast path
    (:mod:`lmmjax.linalg.eigen`), where :class:`CrossProducts` holds them blocked.
    """

    zt: jax.Array
    gram: jax.Array

    def combine(self, coef: jax.Array) -> DenseProducts:
        """The products of the single column ``M coef``."""
        c = coef[:, None]
        return DenseProducts(self.zt @ c, c.T @ self.gram @ c)

    def residual(self, beta: jax.Array) -> DenseProducts:
        """For ``M = [X y]``: the products of the residual ``y - X beta``."""
        return self.combine(residual_coef(beta))


def residual_coef(beta: jax.Array) -> jax.Array:
    """``[-beta; 1]``, so that ``[X y] @ coef = y - X beta``."""
    beta = jnp.asarray(beta)
    return jnp.concatenate([-beta, jnp.ones(1, dtype=beta.dtype)])


# On a GPU, a scatter-add of every row into a few levels serialises on those levels'
# atomic additions: InstEval's 14 departments made one gradient of the unmarginalised
# potential cost 42 ms on an H100 (the paper's code and a written-out NumPyro model too),
# against 0.8 ms with that term marginalised. Up to this many levels, a term is gathered
# and summed there by comparing each row's level with all of them, an (N, levels)
# select-and-reduce that XLA fuses into one pass and that is never materialised (its
# transpose is the same kind of pass). The CPU keeps its gather and scatter. In isolation
# (1-D effects) the two forms cost the same at 32 levels and the comparison 1.35x the
# scatter at 64; the threshold errs towards the comparison, whose worst case there is that,
# against 40x for the scatter at InstEval's 14 levels of 2-D effects.
SMALL_LEVELS = 64


def take_levels(b: jax.Array, refs: jax.Array) -> jax.Array:
    """``b[refs]``: each row's level's row of ``b`` (M, ...) for level indices ``refs`` (N,).

    Indices out of range give zero on an accelerator's small-level path; callers
    pass valid ones (or mask them).
    """
    if b.shape[0] > SMALL_LEVELS:
        return _gather(b, refs)
    return lax.platform_dependent(b, refs, cpu=_gather, default=gather_by_compare)


def _gather(b, refs):
    return b[refs]


def sum_levels(values: jax.Array, refs: jax.Array, nlevels: int) -> jax.Array:
    """Sums of the rows of ``values`` (N, ...) per level in ``refs`` (N,): (nlevels, ...).

    Rows with an index outside ``[0, nlevels)`` are left out, as
    :func:`jax.ops.segment_sum` leaves them.
    """

    def scatter(v, r):
        return jax.ops.segment_sum(v, r, nlevels)

    if nlevels > SMALL_LEVELS:
        return scatter(values, refs)
    return lax.platform_dependent(
        values, refs, cpu=scatter, default=lambda v, r: sum_by_compare(v, r, nlevels)
    )


def _hits(refs: jax.Array, nlevels: int, ndim: int) -> jax.Array:
    hit = refs[:, None] == jnp.arange(nlevels, dtype=refs.dtype)
    return hit.reshape(hit.shape + (1,) * (ndim - 1))


def gather_by_compare(b: jax.Array, refs: jax.Array) -> jax.Array:
    """:func:`take_levels` as a select-and-reduce over the levels (its accelerator path)."""
    zero = jnp.zeros((), b.dtype)  # the dtype of b[refs], integers and booleans too
    return jnp.sum(jnp.where(_hits(refs, b.shape[0], b.ndim), b[None], zero), axis=1, dtype=b.dtype)


def sum_by_compare(values: jax.Array, refs: jax.Array, nlevels: int) -> jax.Array:
    """:func:`sum_levels` as a select-and-reduce over the rows (its accelerator path)."""
    zero = jnp.zeros((), values.dtype)
    hit = _hits(refs, nlevels, values.ndim)
    return jnp.sum(jnp.where(hit, values[:, None], zero), axis=0, dtype=values.dtype)


def zt_times(struct: Structure, M: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``Z' M`` in blocked form for ``M`` of shape (N,) or (N, k)."""
    return zt_parts(struct.layout.terms, struct.refs, struct.z, M)


def zt_parts(layouts, refs, z, M: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``Z' M`` in blocked form from the terms' layouts, level indices and lhs columns."""
    M2 = M[:, None] if M.ndim == 1 else M
    parts = [
        sum_levels(zl[:, :, None] * M2[:, None, :], r, t.nlevels)
        for t, r, zl in zip(layouts, refs, z, strict=True)
    ]
    if len(parts) == 1:
        return parts[0], jnp.zeros((0, M2.shape[1]), dtype=M2.dtype)
    return parts[0], jnp.concatenate([p.reshape(-1, M2.shape[1]) for p in parts[1:]], axis=0)


@jax.jit
def cross_products(struct: Structure, M: jax.Array) -> CrossProducts:
    """``Z' M`` and ``M' M`` for dense columns ``M`` (N,) or (N, k); O(N k (d + k)).

    One compiled program (called on host data, its operations one by one
    compiled a small program each: 0.2 s on dillonE1).
    """
    M2 = jnp.asarray(M, dtype=struct.dtype)
    M2 = M2[:, None] if M2.ndim == 1 else M2
    first, rest = zt_times(struct, M2)
    return CrossProducts(first, rest, M2.T @ M2)


def z_times(refs, z, effects, *, unseen: bool = False) -> jax.Array:
    """``sum_l Z_l b_l`` over the terms whose effects are given.

    Parameters
    ----------
    refs, z : sequences of arrays
        Each term's level index per row (int, shape (N,)) and lhs columns (N, d).
    effects : sequence
        Each term's (M_l, d_l) effects, or None to leave the term out.
    unseen : bool (static)
        Some level indices may be negative (levels unseen in the fit, as in
        predictions for new data); those rows get zero from that term. Off in
        likelihoods, whose rows all have a level, where the masks would cost
        two more passes over the rows (and their gradients).

    Returns
    -------
    array (N,)
        A NumPy array, computed by NumPy without compiling anything, when every
        input is one (for results such as fitted values and predictions).
    """
    given = (*refs, *z, *(b for b in effects if b is not None))
    host = all(isinstance(a, np.ndarray) for a in given)
    xnp, take = (np, _gather) if host else (jnp, take_levels)
    total = 0.0
    for r, zl, b in zip(refs, z, effects, strict=True):
        if b is None:
            continue
        if not unseen:  # gathers of scalars where d = 1: cheaper than of width-1 rows
            if b.shape[1] == 1:
                term = zl[:, 0] * take(b[:, 0], r)
            else:
                term = xnp.sum(zl * take(b, r), axis=1)
            total = total + term
            continue
        valid = r >= 0
        contrib = xnp.sum(zl * take(b, xnp.where(valid, r, 0)), axis=1)
        total = total + xnp.where(valid, contrib, 0.0)
    return total


@jax.tree_util.register_static
@dataclass(frozen=True)
class ColumnMap:
    """Where each column of ``X`` and of every term's ``z`` lives among the distinct columns.

    Index ``-1`` is the constant column of ones (an intercept), which needs no
    multiplication; other indices point into the (N, K) array of distinct
    columns built by :func:`column_map`. A static pytree node: it can sit in a
    data pytree passed to compiled functions.
    """

    fixef: tuple[int, ...]
    terms: tuple[tuple[int, ...], ...]


def column_map(X: np.ndarray, zs) -> tuple[np.ndarray, ColumnMap]:
    """The distinct non-constant columns of ``X`` and the terms' ``z``, and where each one is.

    Parameters
    ----------
    X : array (N, p)
    zs : sequence of arrays (N, d_l)

    Returns
    -------
    cols : numpy.ndarray (N, K)
    cmap : ColumnMap
    """
    distinct: list[np.ndarray] = []

    def index(col: np.ndarray) -> int:
        if np.all(col == 1.0):
            return -1
        for k, other in enumerate(distinct):
            if np.array_equal(col, other):
                return k
        distinct.append(col)
        return len(distinct) - 1

    X = np.asarray(X, dtype=float)
    fixef = tuple(index(X[:, j]) for j in range(X.shape[1]))
    terms = tuple(tuple(index(np.asarray(z, float)[:, c]) for c in range(z.shape[1])) for z in zs)
    cols = np.stack(distinct, axis=1) if distinct else np.zeros((X.shape[0], 0))
    return cols, ColumnMap(fixef, terms)


def linear_predictor(cols, cmap: ColumnMap, beta, refs, effects) -> jax.Array:
    """``X beta + sum_l Z_l b_l`` with each distinct column multiplied once.

    The coefficients that meet the same column (a slope's fixed effect and
    every term's random slope on it; every intercept) are gathered and summed
    first, then scaled by their column: for eeg's ``n400 ~ cloze + (cloze | subj)
    + (cloze | item)`` that is one multiplication per row instead of five, and
    half the cost of value and gradient. Every level index must be valid.

    Parameters
    ----------
    cols : array (N, K)
        From :func:`column_map`.
    cmap : ColumnMap (static)
    beta : array (p,)
    refs : sequence of int arrays (N,)
    effects : sequence
        Each term's (M_l, d_l) effects, or None to leave the term out.

    Returns
    -------
    array (N,)
    """
    acc: dict[int, jax.Array] = {}

    def add(k, v):
        acc[k] = acc[k] + v if k in acc else v

    for j, k in enumerate(cmap.fixef):
        add(k, beta[j])
    for r, b, ks in zip(refs, effects, cmap.terms, strict=True):
        if b is None:
            continue
        g = take_levels(b, r)
        for c, k in enumerate(ks):
            add(k, g[:, c])
    eta = acc.pop(-1, 0.0)
    for k, v in acc.items():
        eta = eta + cols[:, k] * v
    return jnp.broadcast_to(eta, (cols.shape[0],))

"""Products with the random-effect design Z, which is never formed.

``Z b`` is a gather per term and ``Z' M`` a segment sum per term, both O(N d).
Cross products of Z with dense columns ``M`` (``[X y]`` for the profiled
likelihood, a residual for the NUTS potential) are kept apart from the
Z-only :class:`~lmmjax.linalg.structure.Structure` as a
:class:`CrossProducts` pytree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def residual_coef(beta: jax.Array) -> jax.Array:
    """``[-beta; 1]``, so that ``[X y] @ coef = y - X beta``."""
    beta = jnp.asarray(beta)
    return jnp.concatenate([-beta, jnp.ones(1, dtype=beta.dtype)])


def zt_times(struct: Structure, M: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``Z' M`` in blocked form for ``M`` of shape (N,) or (N, k)."""
    M2 = M[:, None] if M.ndim == 1 else M
    lay = struct.layout
    parts = [
        jax.ops.segment_sum(z[:, :, None] * M2[:, None, :], refs, t.nlevels)
        for t, refs, z in zip(lay.terms, struct.refs, struct.z, strict=True)
    ]
    if not lay.has_rest:
        return parts[0], jnp.zeros((0, M2.shape[1]), dtype=M2.dtype)
    return parts[0], jnp.concatenate([p.reshape(-1, M2.shape[1]) for p in parts[1:]], axis=0)


def cross_products(struct: Structure, M: jax.Array) -> CrossProducts:
    """``Z' M`` and ``M' M`` for dense columns ``M`` (N,) or (N, k); O(N k (d + k))."""
    M2 = jnp.asarray(M, dtype=struct.dtype)
    M2 = M2[:, None] if M2.ndim == 1 else M2
    first, rest = zt_times(struct, M2)
    return CrossProducts(first, rest, M2.T @ M2)


def z_times(refs, z, effects) -> jax.Array:
    """``sum_l Z_l b_l`` over the terms whose effects are given.

    Parameters
    ----------
    refs, z : sequences of arrays
        Each term's level index per row (int, shape (N,)) and lhs columns (N, d).
        A negative level index (a level unseen in the fit) contributes zero.
    effects : sequence
        Each term's (M_l, d_l) effects, or None to leave the term out.

    Returns
    -------
    array (N,)
    """
    total = 0.0
    for r, zl, b in zip(refs, z, effects, strict=True):
        if b is None:
            continue
        valid = r >= 0
        contrib = jnp.sum(zl * b[jnp.where(valid, r, 0)], axis=1)
        total = total + jnp.where(valid, contrib, 0.0)
    return total

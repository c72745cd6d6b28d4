"""The precompute as sums over row batches, for data streamed or split across devices.

Everything the likelihoods read after the theta-free precompute is a sum over
rows: the first term's per-level Grams ``G1``, ``B = Z_rest' Z_1``,
``C = Z_rest' Z_rest``, and the cross products ``Z' M`` and ``M' M`` of the
dense columns ``M = [X y]``. :func:`row_sums` computes the dense ones for one
batch as segment sums (pure JAX, so the rows of a batch can be sharded across
devices and the partial sums reduced); :class:`BEntries` accumulates the sparse
``B`` on the host, merging equal entries; :func:`assemble_from_sums` turns the totals into
the :class:`~lmmjax.linalg.structure.Structure` and
:class:`~lmmjax.linalg.products.CrossProducts` that :func:`build_structure` and
:func:`cross_products` would give for all rows at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from lmmjax.linalg.products import CrossProducts, zt_parts
from lmmjax.linalg.structure import (
    Structure,
    TermLayout,
    assemble_structure,
    b_entries,
    device_array,
    gram_sums,
)


class RowSums(NamedTuple):
    """Dense sums over rows; two of them add up entry by entry.

    Attributes
    ----------
    G1 : array (M1, d1, d1)
        Per-level Grams of the first term.
    C : array (q_rest, q_rest)
        ``Z_rest' Z_rest``.
    first, rest : arrays (M1, d1, k), (q_rest, k)
        ``Z' M`` in blocked form.
    gram : array (k, k)
        ``M' M``.
    total : array (k,), optional
        ``1' M``, the column sums of ``M`` (with ``gram``, the means and
        variances of the columns that default priors read).
    zsq : tuple of arrays (d_l,)
        Per term, the sums of squares of its lhs columns.
    """

    G1: jax.Array
    C: jax.Array
    first: jax.Array
    rest: jax.Array
    gram: jax.Array
    total: jax.Array | None = None
    zsq: tuple = ()


def row_sums(refs, z, M: jax.Array, *, layouts: tuple[TermLayout, ...]) -> RowSums:
    """The dense sums of one batch of rows (jit-compatible; rows of zeros add nothing).

    Parameters
    ----------
    refs, z : tuples of arrays
        Every term's level index (n,) and lhs columns (n, d_l), in term order.
    M : array (n, k)
    layouts : tuple of TermLayout (static)
        From :func:`lmmjax.linalg.structure.term_layouts`.

    Returns
    -------
    RowSums
    """
    G1, C = gram_sums(layouts, refs, z)
    first, rest = zt_parts(layouts, refs, z, M)
    zsq = tuple(jax.numpy.sum(zl * zl, axis=0) for zl in z)
    return RowSums(G1, C, first, rest, M.T @ M, jax.numpy.sum(M, axis=0), zsq)


class BEntries:
    """The entries of ``B = Z_rest' Z_1`` summed over row batches, on the host.

    Held as sorted distinct keys, merged whenever the batches waiting to merge
    are as many as those held (memory of order the distinct (level, rest row)
    pairs seen), until the distinct entries reach a tenth of the dense
    (q_rest M1, d1) array (a merge needs about 80 bytes per entry); from then
    on, when that has at most ``dense_limit`` numbers, as that dense array
    (800 MB for 1e5 x 1e3 levels, whatever N).

    Parameters
    ----------
    layouts : tuple of TermLayout
    dense_limit : float
    """

    def __init__(self, layouts: tuple[TermLayout, ...], dense_limit: float = 1.5e8):
        self.layouts = layouts
        self.d1 = layouts[0].d
        self.size = sum(t.q for t in layouts[1:]) * layouts[0].nlevels
        self.dense_limit = dense_limit
        self.dense: np.ndarray | None = None
        self.key = np.zeros(0, np.int64)
        self.val = np.zeros((0, self.d1))
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, refs, z) -> None:
        """Add one batch of rows (every term's level indices and lhs columns, NumPy)."""
        if len(self.layouts) < 2:
            return
        key, val = b_entries(refs, z, self.layouts)
        self.add_entries(key, val)

    def add_entries(self, key: np.ndarray, val: np.ndarray) -> None:
        """Add entries given as distinct keys and values (another accumulator's)."""
        if self.dense is not None:
            self.dense[key] += val  # keys are distinct: no lost updates
            return
        self._pending.append((key, val))
        if sum(k.size for k, _ in self._pending) >= max(self.key.size, 1 << 22):
            self._merge()

    def _dense_pays(self) -> bool:
        return 10 * self.key.size >= self.size and self.size * self.d1 <= self.dense_limit

    def _merge(self) -> None:
        if self._pending:
            keys = np.concatenate([self.key, *(k for k, _ in self._pending)])
            vals = np.concatenate([self.val, *(v for _, v in self._pending)])
            self._pending = []
            self.key, inv = np.unique(keys, return_inverse=True)
            self.val = np.zeros((self.key.size, self.d1))
            for c in range(self.d1):
                self.val[:, c] = np.bincount(inv, weights=vals[:, c], minlength=self.key.size)
        if self._dense_pays():
            self.dense = np.zeros((self.size, self.d1))
            self.dense[self.key] = self.val
            self.key, self.val = np.zeros(0, np.int64), np.zeros((0, self.d1))

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """The sorted distinct keys (``level_1 * q_rest + rest_row``) and their values."""
        if self.dense is None:
            self._merge()
        if self.dense is not None:
            key = np.flatnonzero(np.any(self.dense != 0.0, axis=1))
            return key, self.dense[key]
        return self.key, self.val

    def take(self, dtype=np.float64) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The entries as JAX arrays (rest row, level, value), letting go of what is held.

        The accumulator is then empty; each host copy is dropped as soon as its
        JAX array exists, so that ``B`` is held about twice at most (1 GB per
        copy for 6e7 entries).
        """
        key, val = self.entries()
        self.dense, self.key, self.val = None, np.zeros(0, np.int64), np.zeros((0, self.d1))
        q_rest = max(1, sum(t.q for t in self.layouts[1:]))
        row = jax.numpy.asarray((key % q_rest).astype(np.int32))
        lev = jax.numpy.asarray((key // q_rest).astype(np.int32))
        del key
        return row, lev, device_array(val, dtype)


def assemble_from_sums(
    layouts: tuple[TermLayout, ...],
    sums: RowSums,
    b: BEntries,
    nobs: int,
    *,
    dtype=np.float64,
    schur: str = "auto",
) -> tuple[Structure, CrossProducts]:
    """The structure and the cross products of ``M`` from the totals over all rows.

    The structure holds no rows (``Structure.nobs`` is ``nobs``): the profiled
    likelihoods and the conditional modes run on it as on one built in memory;
    products with ``Z`` (fitted values, residuals) need the rows again.
    """
    host = jax.tree.map(np.asarray, sums)
    b_row, b_lev, b_val = b.take(dtype)
    struct = assemble_structure(
        layouts, host.G1, b_row, b_lev, b_val, host.C, nobs=nobs, dtype=dtype, schur=schur
    )
    f = lambda a: device_array(a, dtype)  # noqa: E731
    return struct, CrossProducts(f(host.first), f(host.rest), f(host.gram))

"""Theta-free precomputation for the blocked factorisation.

Everything here depends on Z alone and is computed once per model with NumPy,
in O(N) time and memory plus the dense Schur block. Cross products of Z with
dense columns (``[X y]``, a residual) are a separate pytree
(:func:`lmmjax.linalg.products.cross_products`), so one structure serves the
profiled likelihood, the NUTS potential and any number of candidate columns.

Block layout (terms sorted by decreasing number of levels):

* block 1 is the first term: ``M1`` diagonal blocks of size ``d1``;
* block 2 ("rest") stacks the other terms, level-major within each term,
  ``q_rest = sum_l M_l d_l`` rows, factored densely.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from lmmjax.terms import Term, unique_inverse


def device_array(a, dtype) -> jax.Array:
    """``a`` as a device array of ``dtype``, converted on the host.

    ``jnp.asarray(a, dtype)`` converts on the device where the dtypes differ
    or ``a`` is a Python number: an eager one-operation program, compiled on
    its first use in every process (15-75 ms each on the 2-core CPU), and
    never kept by the persistent cache, which skips programs that fast to
    compile.
    """
    if isinstance(a, jax.Array):
        return a if a.dtype == dtype else a.astype(dtype)
    # a copy: on a CPU the device array may share the NumPy array's memory otherwise
    return jax.device_put(np.array(a, dtype=dtype))


@dataclass(frozen=True)
class TermLayout:
    """Static shape information of one term."""

    nlevels: int
    d: int
    offset: int  # first row of the term inside its block ("rest" block for l >= 2)
    theta_rows: tuple[int, ...]
    theta_cols: tuple[int, ...]

    @property
    def q(self) -> int:
        return self.nlevels * self.d

    @property
    def ntheta(self) -> int:
        return len(self.theta_rows)


@dataclass(frozen=True)
class Layout:
    """Static (hashable) description of the blocked system."""

    terms: tuple[TermLayout, ...]
    q_rest: int
    n_wgroups: int
    dense_b: bool = False  # B = Z_rest' Z_1 held dense (q_rest, M1, d1) instead of as pairs
    nobs: int = -1  # N where the rows are not held (a streamed structure); -1: from refs
    dense_pairs: bool = False  # pair_val: each Gram group's B_g B_g', packed lower triangles

    @property
    def first(self) -> TermLayout:
        return self.terms[0]

    @property
    def rest(self) -> tuple[TermLayout, ...]:
        return self.terms[1:]

    @property
    def has_rest(self) -> bool:
        return len(self.terms) > 1

    @property
    def ntheta(self) -> int:
        return sum(t.ntheta for t in self.terms)

    @property
    def q(self) -> int:
        """Total number of random effects."""
        return self.first.q + self.q_rest


@jax.tree_util.register_pytree_node_class
@dataclass
class Structure:
    """Arrays of the blocked system (a JAX pytree) plus its static layout.

    Attributes
    ----------
    G1 : array (M1, d1, d1)
        Per-level Gram matrices ``Z_1j' Z_1j`` of the first term.
    Gw : array (n_wgroups, d1, d1)
        Distinct values of ``G1``; ``wgroup[j]`` says which one level j has.
    wgroup : int array (M1,)
    b_row, b_lev : int arrays (K,)
        COO pattern of ``B = Z_rest' Z_1`` (row in the rest block, level of term 1),
        sorted by level.
    b_val : array (K, d1)
    pair_entry : int array (P,)
        Flat index ``a * q_rest + b`` (a >= b) in the rest block of each aggregated
        pair of B rows sharing a level of term 1, sorted.
    pair_group : int array (P,)
        Which ``Gw`` group the pair's level belongs to.
    pair_val : array (P, d1, d1)
        Summed outer products ``v_a v_b'`` over the levels of that group; when
        ``layout.dense_pairs``, the (q_rest (q_rest + 1) / 2, n_wgroups, d1, d1)
        array of every group's ``sum_j b_j b_j'``, lower triangles packed
        (then ``pair_entry`` and ``pair_group`` are empty).
    B : array (q_rest, M1, d1)
        ``B`` held dense, when ``layout.dense_b`` (then the pair arrays are
        empty); empty otherwise. See :func:`build_structure` for the choice.
    C : array (q_rest, q_rest)
        Dense ``Z_rest' Z_rest``.
    refs, z : tuples of arrays
        The terms' level indices and lhs columns, for O(N) products with Z.
    """

    G1: jax.Array
    Gw: jax.Array
    wgroup: jax.Array
    b_row: jax.Array
    b_lev: jax.Array
    b_val: jax.Array
    pair_entry: jax.Array
    pair_group: jax.Array
    pair_val: jax.Array
    B: jax.Array
    C: jax.Array
    refs: tuple
    z: tuple
    layout: Layout

    _FIELDS = (
        "G1", "Gw", "wgroup", "b_row", "b_lev", "b_val", "pair_entry", "pair_group",
        "pair_val", "B", "C", "refs", "z",
    )  # fmt: skip

    @property
    def nobs(self) -> int:
        """Number of observations N (static)."""
        return self.layout.nobs if self.layout.nobs >= 0 else self.refs[0].shape[0]

    @property
    def dtype(self):
        """Floating-point type of the arrays."""
        return self.C.dtype

    @property
    def q(self) -> int:
        """Total number of random effects (static), for sizing decisions outside linalg."""
        return self.layout.q

    def tree_flatten(self):
        return tuple(getattr(self, f) for f in self._FIELDS), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(*children, layout=layout)


def term_layouts(terms) -> tuple[TermLayout, ...]:
    """The static layout of each term (its levels, width, offset and theta pattern)."""
    out, offset = [], 0
    for k, t in enumerate(terms):
        rows, cols = t.theta_index()
        out.append(TermLayout(t.nlevels, t.d, offset, tuple(map(int, rows)), tuple(map(int, cols))))
        if k > 0:
            offset += t.q
    return tuple(out)


def _segment_outer(refs: np.ndarray, a: np.ndarray, b: np.ndarray, m: int) -> np.ndarray:
    """``out[j] = sum_{i: refs_i = j} a_i b_i'`` for (N, da) and (N, db)."""
    out = np.zeros((m, a.shape[1], b.shape[1]))
    for r in range(a.shape[1]):
        for c in range(b.shape[1]):
            out[:, r, c] = np.bincount(refs, weights=a[:, r] * b[:, c], minlength=m)
    return out


def _rest_rows(refs, z, layouts: tuple[TermLayout, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For each row i and each rest column (l, c): rest-block index and z value.

    ``refs`` and ``z`` are every term's level indices and lhs columns (the first
    term's are not used). Returns ``(idx, val)`` of shape (N, sum_{l>=2} d_l).
    """
    idx, val = [], []
    for r, zl, lay in zip(refs[1:], z[1:], layouts[1:], strict=True):
        for c in range(lay.d):
            idx.append(lay.offset + np.asarray(r, dtype=np.int64) * lay.d + c)
            val.append(zl[:, c])
    return np.stack(idx, axis=1), np.stack(val, axis=1)


def b_entries(refs, z, layouts: tuple[TermLayout, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero entries of ``B = Z_rest' Z_1`` summed over the given rows.

    Parameters
    ----------
    refs, z : sequences of arrays
        Every term's level indices (N,) and lhs columns (N, d_l), in term order.
    layouts : tuple of TermLayout

    Returns
    -------
    key : int64 array (K,)
        ``level_1 * q_rest + rest_row``, sorted and distinct; sums over row
        batches add up by merging equal keys.
    val : array (K, d1)
    """
    q_rest = sum(t.q for t in layouts[1:])
    ridx, rval = _rest_rows(refs, z, layouts)
    k = ridx.shape[1]
    key = np.repeat(np.asarray(refs[0], dtype=np.int64), k) * q_rest + ridx.reshape(-1)
    uniq, inv = unique_inverse(key)
    inv = inv.reshape(-1)
    z1, zz = np.asarray(z[0]), rval.reshape(-1)
    val = np.zeros((uniq.size, layouts[0].d))
    for c in range(layouts[0].d):
        val[:, c] = np.bincount(inv, weights=zz * np.repeat(z1[:, c], k), minlength=uniq.size)
    return uniq, val


def _pairs(b_row, b_lev, b_val, wgroup, n_wgroups, q_rest):
    """All pairs of B rows that share a level of term 1, aggregated by (entry, group).

    Written to hold few pair-sized temporaries (InstEval: 1.8e6 pairs, each
    array 15 MB): in a fresh process every new array's pages are faulted in,
    and the keys took 145 ms the first time against 19 ms after.
    """
    counts = np.bincount(b_lev, minlength=wgroup.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(b_row.size) - starts[b_lev]  # position within the level's block
    k1 = np.repeat(np.arange(b_row.size), pos + 1)
    k2 = np.arange(k1.size) - np.repeat(np.cumsum(pos + 1) - (pos + 1), pos + 1)
    lev = b_lev[k1]
    k2 += starts[lev]
    rows = np.asarray(b_row, np.int64)  # keys reach q_rest^2 * groups: past int32
    ra, rb = rows[k1], rows[k2]
    swap = ra < rb  # orient each pair so that its first vector has the larger row index
    key = np.maximum(ra, rb)
    key *= q_rest
    key += np.minimum(ra, rb, out=ra)  # the entry (hi, lo) of the block
    key *= n_wgroups
    key += wgroup[lev]
    del ra, rb, lev
    uniq, inv = unique_inverse(key)
    del key
    va, vb = b_val[k1], b_val[k2]
    va[swap], vb[swap] = vb[swap], va[swap]
    d1 = b_val.shape[1]
    val = np.zeros((uniq.size, d1, d1))
    for r in range(d1):
        for c in range(d1):
            val[:, r, c] = np.bincount(inv, weights=va[:, r] * vb[:, c], minlength=uniq.size)
    return uniq // n_wgroups, uniq % n_wgroups, val


def _group_products(b_row, b_lev, b_val, wgroup, n_wgroups, q_rest, dtype, chunk_entries=2e7):
    """Each Gram group's ``P_g = sum_{j in g} b_j b_j'``, lower triangles packed, dense.

    ``b_j`` is the (q_rest, d1) block of ``B`` at level j of the first term.
    Each ``P_g`` is one matrix product of the group's columns of B, built dense
    ``chunk_entries`` numbers at a time (or as a sparse product where fewer than
    ``SPARSE_CHUNK_DENSITY`` of the chunk's cells are seen); its lower triangle (rest rows
    ``a >= b`` in ``numpy.tril_indices`` order) is written into the result in
    place (a donated buffer: the result is never held twice). Where every level
    meets many rest rows (two crossed factors, each subject seeing most items)
    this costs ``q_rest^2 M1 d1^2`` multiply-adds in BLAS where the pairs of
    :func:`_pairs` would be enumerated one by one (``sum_j k_j (k_j + 1) / 2``:
    4.6e8 for 1e5 x 1e3 levels and 1e7 rows), and holds no indices. The loop is
    over groups and level chunks, each a vectorised product.

    Returns
    -------
    array (q_rest (q_rest + 1) / 2, G, d1, d1)
        Groups next to the innermost axes, so that the Schur complement is one
        matrix-vector product that XLA does not transpose.
    """
    d1, m1 = b_val.shape[1], wgroup.size
    counts = np.bincount(b_lev, minlength=m1)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # B's entries are sorted by level
    by_group = np.argsort(wgroup, kind="stable")  # levels ordered by group
    grp_start = np.concatenate([[0], np.cumsum(np.bincount(wgroup, minlength=n_wgroups))])
    width = max(1, int(chunk_entries // (q_rest * d1)))
    lower_a, lower_b = np.tril_indices(q_rest)
    put = jax.jit(lambda out, x, g: out.at[:, g].set(x), donate_argnums=0)
    out = jnp.zeros((lower_a.size, n_wgroups, d1, d1), dtype)
    for g in range(n_wgroups):
        P = np.zeros((q_rest * d1, q_rest * d1))
        for s in range(grp_start[g], grp_start[g + 1], width):
            levels = by_group[s : min(s + width, grp_start[g + 1])]
            k = counts[levels]
            col = np.repeat(np.arange(levels.size), k)  # each entry's column in the chunk
            idx = np.repeat(first[levels] - np.cumsum(k) + k, k) + np.arange(k.sum())
            if idx.size < SPARSE_CHUNK_DENSITY * q_rest * levels.size:  # few cells seen
                rows = (b_row[idx][:, None] * d1 + np.arange(d1)).reshape(-1)
                Bs = scipy.sparse.csr_matrix(
                    (b_val[idx].reshape(-1), (rows, np.repeat(col, d1))),
                    shape=(q_rest * d1, levels.size),
                )
                P += (Bs @ Bs.T).toarray()
                continue
            Bc = np.zeros((q_rest, d1, levels.size))
            Bc[b_row[idx], :, col] = b_val[idx]
            Bc = Bc.reshape(q_rest * d1, levels.size)
            P += Bc @ Bc.T
        out = put(out, P.reshape(q_rest, d1, q_rest, d1)[lower_a, :, lower_b, :], g)
    return out


def packed_index(q: int) -> jax.Array:
    """(q, q) positions of ``S[a, b]`` in a packed lower triangle (``numpy.tril_indices``)."""
    i = jnp.arange(q)
    hi, lo = jnp.maximum(i[:, None], i[None, :]), jnp.minimum(i[:, None], i[None, :])
    return hi * (hi + 1) // 2 + lo


def schur_form(counts: np.ndarray, q_rest: int, d1: int, n_groups: int, schur: str) -> str:
    """How ``B W B'`` is assembled: ``"dense_b"``, ``"pairs"`` or ``"dense_pairs"``.

    ``schur`` ("auto", "sparse", "dense" or "grouped") forces a form unless
    "auto". ``dense_b`` by :func:`dense_b_pays`. Otherwise the
    aggregated pairs, unless enumerating them would give a quarter as many
    numbers as every group's ``B_g B_g'`` held dense (a pair costs two indices
    and about 100 bytes while it is built), or more than ``ENUMERATE_MAX_PAIRS``,
    while that dense array has at most ``DENSE_PAIRS_MAX`` numbers: then
    ``dense_pairs`` (:func:`_group_products`).
    """
    if schur == "dense" or (schur == "auto" and dense_b_pays(counts, q_rest, d1)):
        return "dense_b"
    if schur != "auto":
        return "dense_pairs" if schur == "grouped" else "pairs"
    enumerated = float(np.sum(counts * (counts + 1) / 2.0)) * d1 * d1
    dense = float(n_groups) * q_rest * (q_rest + 1) / 2.0 * d1 * d1
    many = enumerated > ENUMERATE_MAX_PAIRS or 4.0 * enumerated >= dense
    return "dense_pairs" if many and dense <= DENSE_PAIRS_MAX else "pairs"


SPARSE_CHUNK_DENSITY = 0.05  # below this share of nonzeros, a chunk of B multiplies as sparse
ENUMERATE_MAX_PAIRS = 5e6  # pairs of B rows enumerated at most (about 100 bytes each at build)
DENSE_PAIRS_MAX = 3e8  # numbers in the dense per-group products (2.4 GB in float64)


def dense_b_pays(counts: np.ndarray, q_rest: int, d1: int, max_entries: float = 2.5e7) -> bool:
    """Cost model: hold ``B`` dense when its products are cheaper than the pair scatter.

    The sparse form assembles ``B W B'`` by a scatter over every pair of B rows
    that share a level of term 1, ``sum_j k_j (k_j + 1) / 2`` pairs of ``d1 x d1``
    products (``k_j`` rows at level j): cheap when levels are sparse (InstEval:
    each student rated a few lecturers) and ruinous when they are dense (eeg:
    every subject saw every item, 4.3 million pairs). The dense form is one
    (q_rest x q1) by (q1 x q_rest) matrix product. The factor 8 (a scattered
    pair costs about as much as 8 multiply-adds of a dense product) is a rough
    figure: eeg (dense 4 ms per gradient against 420 ms for the pairs, see
    ``benchmarks/gradient_cost.py``) and InstEval (pairs; the dense product
    would be 1142 x 2972 x 1142) fall far on either side of it. Below
    :data:`SMALL_DENSE_B` multiply-adds the dense form is taken whatever the
    pairs. B must also fit in ``max_entries`` numbers.
    """
    q1 = counts.size * d1
    if q_rest * q1 > max_entries:
        return False
    pairs = float(np.sum(counts * (counts + 1) / 2.0))
    dense = q_rest * q1 * (q_rest + d1)
    return dense <= max(8.0 * pairs * d1 * d1, SMALL_DENSE_B)


# Multiply-adds of B W B' below which B is held dense whatever its pairs: a small dense
# product is a few fast matrix products, where the pairs are gathers and a scatter
# (dillonE1 with both classes marginalised, 8e5 multiply-adds against 2,640 pairs of
# 2 x 2 blocks: 0.34 against 0.44 ms per gradient of the NUTS potential)
SMALL_DENSE_B = 1e6


def _check_schur(schur: str) -> None:
    if schur not in ("auto", "sparse", "dense", "grouped"):
        raise ValueError(f"schur must be 'auto', 'sparse', 'dense' or 'grouped', got {schur!r}")


def build_structure(
    terms: list[Term] | tuple[Term, ...], dtype=np.float64, schur: str = "auto"
) -> Structure:
    """Precompute the theta-free parts of the blocked factorisation.

    Parameters
    ----------
    terms : sequence of Term
        Random-effect terms, first term the one with most levels.
    dtype : numpy dtype
        Floating-point type of the arrays.
    schur : {"auto", "sparse", "dense", "grouped"}
        How ``B = Z_rest' Z_1`` enters the Schur complement: as aggregated
        pairs, dense, as every Gram group's ``B_g B_g'`` dense, or chosen by
        :func:`schur_form`.

    Returns
    -------
    Structure
    """
    terms = list(terms)
    if not terms:
        raise ValueError("the blocked factorisation needs at least one random-effect term")
    _check_schur(schur)
    layouts = term_layouts(terms)
    refs, z = [t.refs for t in terms], [t.z for t in terms]
    first = terms[0]
    G1 = _segment_outer(first.refs.astype(np.int64), first.z, first.z, first.nlevels)
    q_rest = sum(t.q for t in terms[1:])
    if q_rest:
        b_key, b_val = b_entries(refs, z, layouts)
        ridx, rval = _rest_rows(refs, z, layouts)
        k = ridx.shape[1]
        ia = np.repeat(ridx, k, axis=1).reshape(-1)
        ib = np.tile(ridx, (1, k)).reshape(-1)
        w = (np.repeat(rval, k, axis=1) * np.tile(rval, (1, k))).reshape(-1)
        C = np.bincount(ia * q_rest + ib, weights=w, minlength=q_rest * q_rest)
        C = C.reshape(q_rest, q_rest)
    else:
        b_key, b_val, C = np.zeros(0, np.int64), np.zeros((0, first.d)), np.zeros((0, 0))
    b_row, b_lev = (b_key % q_rest, b_key // q_rest) if q_rest else (b_key, b_key)
    return assemble_structure(
        layouts, G1, b_row, b_lev, b_val, C, refs=refs, z=z, dtype=dtype, schur=schur
    )


def assemble_structure(
    layouts: tuple[TermLayout, ...],
    G1: np.ndarray,
    b_row,
    b_lev,
    b_val,
    C: np.ndarray,
    *,
    refs=None,
    z=None,
    nobs: int = -1,
    dtype=np.float64,
    schur: str = "auto",
) -> Structure:
    """The structure from its sums over rows (the Gram groups, the Schur form of B).

    The step of :func:`build_structure` after the O(N) sums, shared with a
    streamed precompute, whose sums come from row batches (``refs`` and ``z``
    then None: products with Z need the rows, the likelihoods do not).

    Parameters
    ----------
    layouts : tuple of TermLayout
        From :func:`term_layouts`.
    G1 : array (M1, d1, d1)
        Per-level Grams of the first term.
    b_row, b_lev, b_val : arrays (K,), (K,), (K, d1)
        ``B``'s nonzero entries (rest row, level of the first term, value),
        sorted by level then row, as :func:`b_entries` gives them (NumPy, or
        JAX arrays, which are then not copied).
    C : array (q_rest, q_rest)
        ``Z_rest' Z_rest``.
    refs, z : sequences of arrays, optional
        The rows' level indices and lhs columns, when held.
    nobs : int
        N, when the rows are not held.
    dtype : numpy dtype
    schur : {"auto", "sparse", "dense", "grouped"}

    Returns
    -------
    Structure
    """
    _check_schur(schur)
    m1, d1 = layouts[0].nlevels, layouts[0].d
    q_rest = sum(t.q for t in layouts[1:])
    Gw, wgroup = np.unique(np.asarray(G1).reshape(m1, -1), axis=0, return_inverse=True)
    Gw = Gw.reshape(-1, d1, d1)
    wgroup = wgroup.reshape(-1)
    f = lambda a: device_array(a, dtype)  # noqa: E731
    i = lambda a: device_array(a, np.int32)  # noqa: E731
    b_row_j, b_lev_j, b_val_j = i(b_row), i(b_lev), f(b_val)
    b_row, b_lev, b_val = np.asarray(b_row_j), np.asarray(b_lev_j), np.asarray(b_val_j)
    form = "pairs"
    B = np.zeros((0, m1, d1))
    pair_entry = pair_group = np.zeros(0, np.int64)
    pair_val = np.zeros((0, d1, d1))
    if q_rest:
        counts = np.bincount(b_lev, minlength=m1)
        form = schur_form(counts, q_rest, d1, Gw.shape[0], schur)
        if form == "dense_b":
            B = np.zeros((q_rest, m1, d1))
            B[b_row, b_lev, :] = b_val
        elif form == "dense_pairs":
            pair_val = _group_products(b_row, b_lev, b_val, wgroup, Gw.shape[0], q_rest, dtype)
        else:
            pair_entry, pair_group, pair_val = _pairs(
                b_row, b_lev, b_val, wgroup, Gw.shape[0], q_rest
            )
    if refs is None:
        refs = [np.zeros(0, np.int32) for _ in layouts]
        z = [np.zeros((0, t.d)) for t in layouts]
    else:
        nobs = -1

    return Structure(
        G1=f(G1),
        Gw=f(Gw),
        wgroup=i(wgroup),
        b_row=b_row_j,
        b_lev=b_lev_j,
        b_val=b_val_j,
        pair_entry=i(pair_entry),
        pair_group=i(pair_group),
        pair_val=f(pair_val),
        B=f(B),
        C=f(C),
        refs=tuple(i(r) for r in refs),
        z=tuple(f(zl) for zl in z),
        layout=Layout(
            layouts,
            q_rest,
            int(Gw.shape[0]),
            form == "dense_b",
            int(nobs),
            dense_pairs=form == "dense_pairs",
        ),  # fmt: skip
    )


def rest_index(layouts: tuple[TermLayout, ...], refs) -> jax.Array:
    """Each row's index in the rest block for every rest column, (N, sum_{l>=2} d_l), in JAX."""
    return jnp.stack(
        [t.offset + r * t.d + c
         for t, r in zip(layouts[1:], refs[1:], strict=True) for c in range(t.d)],
        axis=1,
    )  # fmt: skip


def gram_sums(layouts: tuple[TermLayout, ...], refs, z) -> tuple[jax.Array, jax.Array]:
    """The first term's per-level Grams ``G1`` and the dense ``C = Z_rest' Z_rest``, in JAX.

    Segment sums over the rows given, jit-compatible: the per-evaluation sums of
    :func:`scale_rows` and the per-batch sums of a streamed precompute.

    Returns
    -------
    G1 : array (M1, d1, d1)
    C : array (q_rest, q_rest)
    """
    z1 = z[0]
    G1 = jax.ops.segment_sum(z1[:, :, None] * z1[:, None, :], refs[0], layouts[0].nlevels)
    q = sum(t.q for t in layouts[1:])
    if not q:
        return G1, jnp.zeros((0, 0), G1.dtype)
    ridx = rest_index(layouts, refs)
    rval = jnp.concatenate(z[1:], axis=1)
    c_idx = (ridx[:, :, None] * q + ridx[:, None, :]).reshape(-1)
    C = jax.ops.segment_sum((rval[:, :, None] * rval[:, None, :]).reshape(-1), c_idx, q * q)
    return G1, C.reshape(q, q)


def rows_scalable(struct: Structure) -> bool:
    """Whether :func:`scale_rows` applies: one term, or ``B`` held dense."""
    return not struct.layout.has_rest or struct.layout.dense_b


def scale_rows(struct: Structure, s: jax.Array) -> Structure:
    """The structure of ``diag(s) Z``, recomputed from the rows in O(N k^2).

    Row weights that change with the parameters (a residual SD with its own
    linear predictor, ``w_i = 1 / sigma_i^2``, ``s = sqrt(w)``) make every Gram
    ``Z' W Z`` depend on them, so the theta-free precompute cannot hold it.
    This is the per-evaluation version: segment sums over the N rows into the
    first term's per-level Grams, the dense ``B`` and ``C``, jit-compatible and
    differentiable in ``s``. With the result, ``cross_products(out, s * M)``
    gives ``Z' W M`` and ``M' W M``, and :func:`~lmmjax.linalg.gls_gram` the
    weighted ``log|I + Lambda' Z' W Z Lambda|`` and ``M' (W^{-1} + Z Lambda
    Lambda' Z')^{-1} M``.

    The aggregated pairs of the sparse Schur form are per Gram group, which
    weights break up, so a structure with several terms must hold ``B`` dense
    (``build_structure(..., schur="dense")``); see :func:`rows_scalable`.

    Parameters
    ----------
    struct : Structure
    s : array (N,)
        Row scales.

    Returns
    -------
    Structure
        Every level its own Gram group; the COO and pair arrays empty.
    """
    lay = struct.layout
    if not rows_scalable(struct):
        raise ValueError("scale_rows needs one term or a structure built with schur='dense'")
    z = tuple(zl * s[:, None] for zl in struct.z)
    refs1, z1 = struct.refs[0], z[0]
    m1, d1 = lay.first.nlevels, lay.first.d
    G1, C = gram_sums(lay.terms, struct.refs, z)
    dtype, ints = G1.dtype, jnp.int32
    B = struct.B
    if lay.has_rest:
        q = lay.q_rest
        ridx = rest_index(lay.terms, struct.refs)
        rval = jnp.concatenate(z[1:], axis=1)
        b_vals = (rval[:, :, None] * z1[:, None, :]).reshape(-1, d1)
        B = jax.ops.segment_sum(b_vals, (ridx * m1 + refs1[:, None]).reshape(-1), q * m1)
        B = B.reshape(q, m1, d1)
    return Structure(
        G1=G1,
        Gw=G1,
        wgroup=jnp.arange(m1, dtype=ints),
        b_row=jnp.zeros(0, ints),
        b_lev=jnp.zeros(0, ints),
        b_val=jnp.zeros((0, d1), dtype),
        pair_entry=jnp.zeros(0, ints),
        pair_group=jnp.zeros(0, ints),
        pair_val=jnp.zeros((0, d1, d1), dtype),
        B=B,
        C=C,
        refs=struct.refs,
        z=z,
        layout=replace(lay, n_wgroups=m1),
    )


def dense_gram(struct: Structure) -> np.ndarray:
    """Dense ``Z' Z`` (q x q) in the blocked order, from the precomputed parts.

    Rows ``0 .. q1`` are term 1 level-major, then the rest block. O(q^2)
    memory; used only where a dense q x q matrix is needed anyway (the
    eigendecomposition fast path) and in tests.
    """
    lay = struct.layout
    d1, q1 = lay.first.d, lay.first.q
    out = np.zeros((lay.q, lay.q))
    G1 = np.asarray(struct.G1, dtype=float)
    idx = np.arange(q1).reshape(-1, d1)
    out[idx[:, :, None], idx[:, None, :]] = G1
    if lay.q_rest and lay.dense_b:
        out[q1:, :q1] = np.asarray(struct.B, dtype=float).reshape(lay.q_rest, q1)
        out[:q1, q1:] = out[q1:, :q1].T
        out[q1:, q1:] = np.asarray(struct.C, dtype=float)
    elif lay.q_rest:
        rows = q1 + np.asarray(struct.b_row)
        cols = np.asarray(struct.b_lev)[:, None] * d1 + np.arange(d1)[None, :]
        vals = np.asarray(struct.b_val, dtype=float)
        out[rows[:, None], cols] = vals
        out[cols, rows[:, None]] = vals
        out[q1:, q1:] = np.asarray(struct.C, dtype=float)
    return out

"""The quasi-likelihood transform: per-cluster whitening by ``Sigma_a^{-1/2}``, never N x N.

For a constant ``a > 0`` each cluster ``i`` gets the working covariance
``Sigma_a^i = a Z_i Z_i' + I`` (Li, Cai & Li 2022). With the thin SVD
``Z_i = U_i diag(d_i) V_i'``,

``Sigma_a^{-1/2} = I - U_i diag(1 - (1 + a d_i^2)^{-1/2}) U_i'``,
``log |Sigma_a^i| = sum log(1 + a d_i^2)`` and
``tr(Sigma_a^{i,-1}) = m_i - r_i + sum (1 + a d_i^2)^{-1}``,

so one SVD per cluster (taken once, whatever ``a``) serves every ``a``.

Clusters of different sizes are grouped into buckets of equal padded size (the
next power of two of the cluster size), padded with zero rows, and each bucket
is one batched SVD and one batched product: a Python loop runs over the few
buckets at trace time, never over clusters. Zero rows stay zero under the
transform (``U_i`` vanishes on them for every non-zero singular value), so the
padded rows add nothing to any sum of squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ClusterLayout",
    "cluster_layout",
    "logdet",
    "pad_rows",
    "svd_factors",
    "trace_inverse",
    "unpad_rows",
    "whiten",
]


@dataclass(frozen=True)
class ClusterLayout:
    """Rows of the data regrouped into padded buckets of clusters.

    Attributes
    ----------
    gather : numpy.ndarray
        ``int[Npad]``: the data row behind each padded row, ``-1`` for padding.
        Buckets follow each other; inside a bucket, cluster after cluster.
    cluster : numpy.ndarray
        ``int[Npad]``: the cluster of each padded row (padding included).
    shapes : tuple of (int, int)
        ``(clusters, padded size)`` of each bucket (static).
    bucket_clusters : tuple of numpy.ndarray
        The cluster ids of each bucket, in order.
    sizes : numpy.ndarray
        ``int[n_clusters]``: the number of rows of each cluster.
    """

    gather: np.ndarray
    cluster: np.ndarray
    shapes: tuple[tuple[int, int], ...]
    bucket_clusters: tuple[np.ndarray, ...]
    sizes: np.ndarray

    @property
    def n_clusters(self) -> int:
        return int(self.sizes.size)

    @property
    def n_padded(self) -> int:
        return int(self.gather.size)

    @property
    def row_mask(self) -> np.ndarray:
        """``bool[Npad]``: which padded rows hold data."""
        return self.gather >= 0


def cluster_layout(refs: np.ndarray, n_clusters: int | None = None) -> ClusterLayout:
    """Group rows by cluster into buckets of clusters padded to the next power of two.

    Parameters
    ----------
    refs : numpy.ndarray
        ``int[N]``: the cluster of each row, ``0 <= refs < n_clusters``.
    n_clusters : int, optional
        Number of clusters (default ``refs.max() + 1``); empty clusters are ignored.

    Returns
    -------
    ClusterLayout
    """
    refs = np.asarray(refs, dtype=np.int64)
    n_clusters = int(refs.max()) + 1 if n_clusters is None else int(n_clusters)
    sizes = np.bincount(refs, minlength=n_clusters)
    order = np.argsort(refs, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    within = np.arange(refs.size) - starts[refs[order]]  # position of each sorted row
    padded = np.where(sizes > 0, 2 ** np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64), 0)
    gathers, clusters, shapes, members = [], [], [], []
    for m in np.unique(padded[padded > 0]):  # a few buckets, never one per cluster
        ids = np.flatnonzero(padded == m)
        slot = np.full(n_clusters, -1)
        slot[ids] = np.arange(ids.size)
        idx = np.full((ids.size, m), -1, dtype=np.int64)
        rows_in = slot[refs[order]] >= 0
        idx[slot[refs[order]][rows_in], within[rows_in]] = order[rows_in]
        gathers.append(idx.ravel())
        clusters.append(np.repeat(ids, m))
        shapes.append((int(ids.size), int(m)))
        members.append(ids)
    return ClusterLayout(
        gather=np.concatenate(gathers),
        cluster=np.concatenate(clusters),
        shapes=tuple(shapes),
        bucket_clusters=tuple(members),
        sizes=sizes,
    )


def pad_rows(values: jax.Array, gather: jax.Array) -> jax.Array:
    """Rows of ``values`` (N, ...) in padded order, zero on padding rows."""
    taken = jnp.take(values, jnp.maximum(gather, 0), axis=0)
    mask = (gather >= 0).reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.where(mask, taken, 0.0)


def unpad_rows(padded: jax.Array, gather: jax.Array, n: int) -> jax.Array:
    """Scatter padded rows back to the data's row order (``n`` rows)."""
    target = jnp.where(gather >= 0, gather, n)
    out = jnp.zeros((n + 1,) + padded.shape[1:], padded.dtype)
    return out.at[target].set(padded)[:n]


def _split(padded: jax.Array, shapes) -> list[jax.Array]:
    """Cut padded rows (Npad, ...) into the buckets' (clusters, size, ...) blocks."""
    out, start = [], 0
    for nc, m in shapes:
        out.append(padded[start : start + nc * m].reshape((nc, m) + padded.shape[1:]))
        start += nc * m
    return out


def svd_factors(z_padded: jax.Array, shapes) -> tuple[list[jax.Array], list[jax.Array]]:
    """Thin SVD of every cluster's ``Z_i``, one batched SVD per bucket.

    Parameters
    ----------
    z_padded : jax.Array
        ``(Npad, q)``: the random-effect design in padded order.
    shapes : tuple of (int, int)
        :attr:`ClusterLayout.shapes` (static).

    Returns
    -------
    U : list of jax.Array
        Per bucket ``(clusters, size, r)``, ``r = min(size, q)``.
    d : list of jax.Array
        Per bucket ``(clusters, r)``, the singular values.
    """
    us, ds = [], []
    for block in _split(z_padded, shapes):
        u, d, _ = jnp.linalg.svd(block, full_matrices=False)
        us.append(u)
        ds.append(d)
    return us, ds


def whiten(
    values: jax.Array, us: list[jax.Array], ds: list[jax.Array], a: jax.Array, shapes
) -> jax.Array:
    """``Sigma_a^{-1/2}`` applied cluster by cluster to padded rows.

    Parameters
    ----------
    values : jax.Array
        ``(Npad, c)``: columns in padded order.
    us, ds : list of jax.Array
        From :func:`svd_factors`.
    a : scalar
        The working variance ratio ``a > 0``.
    shapes : tuple of (int, int)
        :attr:`ClusterLayout.shapes` (static).

    Returns
    -------
    jax.Array
        ``(Npad, c)``.
    """
    out = []
    for block, u, d in zip(_split(values, shapes), us, ds, strict=True):
        shrink = 1.0 - jax.lax.rsqrt(1.0 + a * d * d)  # (clusters, r)
        proj = jnp.einsum("imr,imc->irc", u, block)
        out.append(block - jnp.einsum("imr,irc->imc", u, shrink[..., None] * proj))
    return jnp.concatenate([o.reshape((-1,) + values.shape[1:]) for o in out], axis=0)


def logdet(ds: list[jax.Array], a: jax.Array, bucket_clusters, n_clusters: int) -> jax.Array:
    """``log |Sigma_a^i|`` of every cluster, ``(n_clusters,)``, in cluster order."""
    out = jnp.zeros(n_clusters, dtype=ds[0].dtype)
    for d, ids in zip(ds, bucket_clusters, strict=True):
        out = out.at[ids].set(jnp.sum(jnp.log1p(a * d * d), axis=-1))
    return out


def trace_inverse(ds: list[jax.Array], a: jax.Array, layout: ClusterLayout) -> jax.Array:
    """``tr(Sigma_a^{i,-1})`` of every cluster, ``(n_clusters,)``, in cluster order."""
    out = jnp.zeros(layout.n_clusters, dtype=ds[0].dtype)
    for d, ids in zip(ds, layout.bucket_clusters, strict=True):
        r = d.shape[-1]
        value = layout.sizes[ids] - r + jnp.sum(1.0 / (1.0 + a * d * d), axis=-1)
        out = out.at[ids].set(value)
    return out

"""Random-effect terms stored as MixedModels.jl-style ``ReMat`` structures.

A term ``(lhs | g)`` is kept as an integer level index per row (``refs``) and
the ``d`` lhs columns per row (``z``); the N x q design matrix it stands for is
never formed; :mod:`lmmjax.linalg` computes ``Z b`` and ``Z' r`` from them by
gathers and segment sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Term:
    """One random-effect term ``(lhs | group)``.

    Attributes
    ----------
    group : str
        Name of the grouping factor as lme4 prints it (``"Subject"``,
        ``"cask:batch"``).
    names : tuple of str
        Names of the ``d`` lhs columns (``"(Intercept)"``, ``"Days"``).
    levels : tuple of str
        Labels of the ``M`` levels of the grouping factor, in level order.
    refs : numpy.ndarray
        ``int32[N]``: the level index of each row.
    z : numpy.ndarray
        ``float[N, d]``: the lhs columns of each row.
    factors : tuple of str
        The data columns whose interaction is the grouping factor.
    lhs_spec : formulaic.ModelSpec, optional
        Rebuilds the lhs columns on new data (for prediction).
    lhs_columns : tuple of int, optional
        Which columns of ``lhs_spec``'s matrix this term keeps (``||`` splits).
    """

    group: str
    names: tuple[str, ...]
    levels: tuple[str, ...]
    refs: np.ndarray
    z: np.ndarray
    factors: tuple[str, ...] = ()
    lhs_spec: object = field(default=None, repr=False)
    lhs_columns: tuple[int, ...] | None = None

    @property
    def nlevels(self) -> int:
        """Number of levels ``M`` of the grouping factor."""
        return len(self.levels)

    @property
    def d(self) -> int:
        """Number of effects per level (lhs columns)."""
        return self.z.shape[1]

    @property
    def q(self) -> int:
        """Number of random effects ``M * d`` of this term."""
        return self.nlevels * self.d

    @property
    def ntheta(self) -> int:
        """Number of covariance parameters (lower triangle of Lambda)."""
        return self.d * (self.d + 1) // 2

    def theta_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of each theta entry in the d x d factor Lambda.

        Theta holds Lambda's lower triangle column by column, as lme4 does.
        """
        rows, cols = [], []
        for j in range(self.d):
            for i in range(j, self.d):
                rows.append(i)
                cols.append(j)
        return np.asarray(rows), np.asarray(cols)

    def theta_init(self) -> np.ndarray:
        """lme4's starting value: Lambda = identity."""
        rows, cols = self.theta_index()
        return (rows == cols).astype(float)

    def dense(self) -> np.ndarray:
        """The dense N x (M d) design, level-major. For tests and debugging only."""
        n = self.z.shape[0]
        out = np.zeros((n, self.nlevels, self.d))
        out[np.arange(n), self.refs, :] = self.z
        return out.reshape(n, self.q)


def unique_group_names(terms) -> list[str]:
    """lme4's VarCorr names: a factor's second term is ``g.1``, its third ``g.2``."""
    seen: dict[str, int] = {}
    out = []
    for t in terms:
        k = seen.get(t.group, 0)
        out.append(t.group if k == 0 else f"{t.group}.{k}")
        seen[t.group] = k + 1
    return out


def covariances_from_theta(terms, theta, sigma) -> list[np.ndarray]:
    """Each term's covariance ``sigma^2 Lambda_l Lambda_l'`` from lme4's theta, in NumPy.

    For results: a few numbers, not worth an XLA program. ``theta`` may have
    leading axes (``(..., ntheta)``, e.g. bootstrap replicates), with
    ``sigma`` a scalar or of those leading axes; each covariance is then
    ``(..., d, d)``.
    """
    theta = np.asarray(theta, dtype=float)
    s2 = np.asarray(sigma, dtype=float)[..., None, None] ** 2
    out, k = [], 0
    for t in terms:
        lam = np.zeros((*theta.shape[:-1], t.d, t.d))
        lam[(..., *t.theta_index())] = theta[..., k : k + t.ntheta]
        out.append(s2 * lam @ np.swapaxes(lam, -1, -2))
        k += t.ntheta
    return out


def unique_inverse(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(key, return_inverse=True)`` for non-negative integer keys, without a
    comparison sort.

    Level indices are made from such keys (a row's combination of factor
    codes, a pair of Schur-block rows), and NumPy's unique sorts them with a
    comparison sort: 155 ms for 1.1e6 keys on the 2-core CPU. Here keys in a
    range not much larger than their number are counted (O(N + range)), and
    others ordered by stable 16-bit radix passes (76 ms for the same keys).
    """
    key = np.asarray(key)
    n = key.size
    top = int(key.max(initial=-1)) + 1
    if top <= 4 * n + (1 << 20):  # a dense range: count
        present = np.bincount(key, minlength=top) > 0
        return np.flatnonzero(present), (np.cumsum(present) - 1)[key]
    order = None
    for shift in range(0, max(top - 1, 1).bit_length(), 16):  # least significant digit first
        digit = ((key >> shift) & 0xFFFF).astype(np.uint16)
        if order is None:
            order = np.argsort(digit, kind="stable")  # NumPy radix-sorts 16-bit keys
        else:
            order = order[np.argsort(digit[order], kind="stable")]
    ordered = key[order]
    first = np.empty(n, bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(n, np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse

"""Sums over rows that stand in for the rows of a model fitted from streamed statistics.

A Bayesian LMM with every class marginalised reads the rows only through the
precomputed :class:`~lmmjax.linalg.Structure` and ``[X y]``'s cross products,
except for three row-level summaries: the default priors (the mean and SD of
``y`` and of each column of ``X``, the RMS of each lhs column), the
least-squares starting point and the first guess of the mass matrix. For a
model streamed from Parquet (:class:`lmmjax.stream.StreamedModel`, which
carries ``sufficient``, ``column_sums`` and ``z_squares``) these come from
:class:`RowMoments`, sums over rows accumulated in the same pass as the
structure, so that nothing here holds an array of length N.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["RowMoments", "row_moments"]


class RowMoments(NamedTuple):
    """First and second moments of ``[X y]`` and the lhs columns, as sums over N rows.

    Attributes
    ----------
    n : int
    xsum : array (p,)
        ``X' 1``.
    ysum : float
        ``y' 1``.
    xtx : array (p, p)
    xty : array (p,)
    yty : float
    zsq : tuple of arrays (d_l,)
        Per term, the sums of squares of its lhs columns.
    """

    n: int
    xsum: np.ndarray
    ysum: float
    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    zsq: tuple

    def means_and_sds(self) -> tuple[float, float, np.ndarray, np.ndarray, list]:
        """``mean(y)``, ``sd(y)``, the columns' means and SDs (``ddof=0``), the lhs RMS."""
        n = float(self.n)
        my = self.ysum / n
        sy = float(np.sqrt(max(self.yty / n - my**2, 0.0)))
        mean_x = self.xsum / n
        var_x = np.diag(self.xtx) / n - mean_x**2
        # a constant column's variance from sums is rounding (relative 1e-16), not zero
        sd_x = np.sqrt(np.where(var_x > 1e-12 * mean_x**2, var_x, 0.0))
        rms = [np.sqrt(np.asarray(z, dtype=float) / n) for z in self.zsq]
        return float(my), sy, mean_x, sd_x, rms

    def least_squares(self) -> tuple[np.ndarray, float, float]:
        """Least-squares coefficients, mean squared residual and residual SD (``ddof=0``)."""
        beta, *_ = np.linalg.lstsq(self.xtx, self.xty, rcond=None)
        n = float(self.n)
        ms = max((self.yty - 2.0 * beta @ self.xty + beta @ self.xtx @ beta) / n, 0.0)
        mean = (self.ysum - self.xsum @ beta) / n
        return beta, float(ms), float(np.sqrt(max(ms - mean**2, 0.0)))

    def centred_squares(self, shift: np.ndarray) -> np.ndarray:
        """``sum_i (x_ik - shift_k)^2`` for every column k."""
        return np.diag(self.xtx) - 2.0 * shift * self.xsum + self.n * shift**2


def row_moments(model) -> RowMoments | None:
    """The :class:`RowMoments` of a model streamed from Parquet; None for rows in memory."""
    if getattr(model, "sufficient", None) is None:
        return None
    gram = np.asarray(model.sufficient[1].gram, dtype=float)
    total = np.asarray(model.column_sums, dtype=float)
    return RowMoments(
        n=int(model.nobs), xsum=total[:-1], ysum=float(total[-1]), xtx=gram[:-1, :-1],
        xty=gram[:-1, -1], yty=float(gram[-1, -1]),
        zsq=tuple(np.asarray(z, dtype=float) for z in model.z_squares),
    )  # fmt: skip

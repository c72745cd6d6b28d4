"""lme4's VarCorr table, built one way for every method.

REML/ML passes one covariance matrix per term; NUTS passes the posterior
draws of each term's covariance and of sigma, and gets posterior means of the
variances, standard deviations, covariances and correlations.
"""

from __future__ import annotations

import numpy as np

from lmmjax.terms import unique_group_names

__all__ = ["sd_and_corr", "varcorr_rows"]


def sd_and_corr(cov) -> tuple[np.ndarray, np.ndarray]:
    """Standard deviations ``(..., d)`` and correlations ``(..., d, d)`` of covariances.

    A correlation with a zero SD is NaN.
    """
    cov = np.asarray(cov, dtype=float)
    sd = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0.0, None))
    denom = sd[..., :, None] * sd[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return sd, np.where(denom > 0, cov / denom, np.nan)


def varcorr_rows(terms, covariances, sigma) -> list[dict]:
    """Rows of lme4's ``as.data.frame(VarCorr(m))``: each term's variances, then correlations.

    Parameters
    ----------
    terms : sequence of Term
        The model's random-effect terms.
    covariances : sequence of arrays (..., d_l, d_l)
        Each term's covariance ``Sigma_l``, with any leading draw axes.
    sigma : float or array (...)
        Residual standard deviation (or its draws, with the same leading axes).

    Returns
    -------
    list of dict
        Keys ``group``, ``var1``, ``var2``, ``variance`` (the covariance on
        correlation rows), ``sd`` and ``corr``; values are averaged over draws.
        The last row is the residual.
    """
    mean = lambda a: float(np.mean(a))  # noqa: E731
    rows = []
    for name, t, cov in zip(unique_group_names(terms), terms, covariances, strict=True):
        cov = np.asarray(cov, dtype=float)
        var = np.diagonal(cov, axis1=-2, axis2=-1)
        sd, corr = sd_and_corr(cov)
        for a in range(t.d):
            rows.append(
                dict(group=name, var1=t.names[a], var2=None, variance=mean(var[..., a]),
                     sd=mean(sd[..., a]), corr=None)
            )  # fmt: skip
        for a in range(t.d):
            for b in range(a + 1, t.d):
                rows.append(
                    dict(group=name, var1=t.names[a], var2=t.names[b],
                         variance=mean(cov[..., b, a]), sd=None, corr=mean(corr[..., b, a]))
                )  # fmt: skip
    sig = np.asarray(sigma, dtype=float)
    rows.append(
        dict(group="Residual", var1=None, var2=None, variance=mean(sig**2), sd=mean(sig),
             corr=None)
    )  # fmt: skip
    return rows

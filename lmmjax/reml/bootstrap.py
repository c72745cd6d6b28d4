"""Simulation from a fitted model and the parametric bootstrap (lme4's ``simulate``, ``bootMer``).

Each bootstrap replicate refits the same model to a simulated response; the
shapes do not change, so every refit runs the program compiled for the fit.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd

from lmmjax.errors import LmmInputError

__all__ = ["bootstrap", "parameter_vector", "simulate"]


def _factor(cov: np.ndarray) -> np.ndarray:
    """A square root of a (possibly singular) covariance: ``F F' = cov``."""
    vals, vecs = np.linalg.eigh(cov)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def simulate(fit, nsim: int = 1, seed: int | None = None) -> np.ndarray:
    """Responses drawn from the fitted model, new random effects included.

    ``y* = offset + X beta + sum_l Z_l b_l* + e*`` with ``b_l* ~ N(0, Sigma_l)``
    at the estimates and ``e_i* ~ N(0, sigma^2 / w_i)``.

    Returns
    -------
    array (nsim, N)
    """
    if not isinstance(nsim, int) or nsim < 1:
        raise LmmInputError(f"nsim must be a positive integer, got {nsim!r}")
    rng = np.random.default_rng(seed)
    m = fit.model
    mu = m.X @ fit.beta + (0.0 if m.offset is None else m.offset)
    y = np.tile(mu, (nsim, 1))
    for t, cov in zip(m.terms, fit.covariances(), strict=True):
        b = rng.standard_normal((nsim, t.nlevels, t.d)) @ _factor(cov).T
        y += np.sum(t.z[None] * b[:, t.refs, :], axis=-1)
    sd = fit.sigma if m.weights is None else fit.sigma / np.sqrt(m.weights)
    return y + sd * rng.standard_normal(y.shape)


def parameter_vector(fit) -> pd.Series:
    """Fixed effects, random-effect SDs and correlations, and sigma, with readable names.

    SDs are ``sd_<effect>|<group>``, correlations ``cor_<effect>.<effect>|<group>``.
    """
    values = dict(zip(fit.model.fixef_names, fit.beta, strict=True))
    for row in fit.varcorr.to_dict("records"):
        if row["group"] == "Residual":
            continue
        if row["var2"] is None or pd.isna(row["var2"]):
            values[f"sd_{row['var1']}|{row['group']}"] = row["sd"]
        else:
            values[f"cor_{row['var1']}.{row['var2']}|{row['group']}"] = row["corr"]
    values["sigma"] = fit.sigma
    return pd.Series(values, dtype=float)


def bootstrap(fit, nsim: int = 200, seed: int | None = None) -> pd.DataFrame:
    """Parametric bootstrap: ``nsim`` refits to :func:`simulate` draws.

    Returns
    -------
    pandas.DataFrame
        One row per replicate, the columns of :func:`parameter_vector`.
    """
    from lmmjax.reml.fit import fit_reml

    rows = []
    with warnings.catch_warnings():  # singular refits are part of the bootstrap distribution
        warnings.simplefilter("ignore")
        for ystar in simulate(fit, nsim, seed):
            refit = fit_reml(replace(fit.model, y=ystar), reml=fit.reml, ddf="none")
            rows.append(parameter_vector(refit))
    return pd.DataFrame(rows).reset_index(drop=True)

"""Simulation from a fitted model and the parametric bootstrap (lme4's ``simulate``, ``bootMer``).

Each bootstrap replicate refits the same model to a simulated response; only
the response's cross products change, so the refits run together as one
vmapped, compiled optimiser.
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd

from lmmjax.cache import compiled
from lmmjax.errors import LmmInputError
from lmmjax.linalg import build_structure, cross_products, device_array
from lmmjax.output import sd_and_corr
from lmmjax.precision import float_dtype
from lmmjax.reml.objective import weighted_problem
from lmmjax.reml.optimize import lbfgs_loop, theta_scale
from lmmjax.terms import covariances_from_theta, unique_group_names

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
    return _parameter_table(fit.model, fit.theta, fit.beta, fit.sigma).iloc[0].rename(None)


def _refit(theta0, struct, M, scale, maxiter, gtol, reml: bool):
    """The compiled L-BFGS loop for one simulated response (vmapped by :func:`_refit_all`)."""
    theta, _, _, _, _, est = lbfgs_loop(
        theta0, struct, cross_products(struct, M), scale, maxiter, gtol, reml
    )
    return theta, est.beta, est.sigma


def _refit_all(theta0, struct, Ms, scale, maxiter, gtol, reml: bool):
    return jax.vmap(lambda M: _refit(theta0, struct, M, scale, maxiter, gtol, reml))(Ms)


def bootstrap(fit, nsim: int = 200, seed: int | None = None, batch: int = 250) -> pd.DataFrame:
    """Parametric bootstrap: ``nsim`` refits to :func:`simulate` draws, vectorised.

    Every replicate shares ``Z`` and ``X``, so only the cross products of the
    simulated response change: the refits run as one ``jax.vmap`` of an optax
    L-BFGS loop over replicates (``batch`` at a time), compiled once, started
    at the fit's estimates.

    Returns
    -------
    pandas.DataFrame
        One row per replicate, the columns of :func:`parameter_vector`.
    """

    m = fit.model
    ys = simulate(fit, nsim, seed)
    terms, M0, _ = weighted_problem(m)
    struct = build_structure(terms, dtype=float_dtype())
    shift = 0.0 if m.offset is None else m.offset
    sw = 1.0 if m.weights is None else np.sqrt(m.weights)
    dtype = struct.dtype
    args = (device_array(fit.theta, dtype), struct)
    scale = device_array(theta_scale(m.terms), dtype)
    rows = []
    for start in range(0, nsim, batch):
        part = ys[start : start + batch]
        Ms = np.concatenate([np.broadcast_to(M0[:, :-1], (len(part), *M0[:, :-1].shape)),
                             ((part - shift) * sw)[:, :, None]], axis=2)  # fmt: skip
        Ms = device_array(Ms, dtype)
        run, _ = compiled(_refit_all, *args, Ms, scale, device_array(500, np.int64),
                          device_array(1e-6, dtype), reml=fit.reml)  # fmt: skip
        thetas, betas, sigmas = (np.asarray(a, dtype=float) for a in run(
            *args, Ms, scale, device_array(500, np.int64), device_array(1e-6, dtype)))  # fmt: skip
        rows.append(_parameter_table(m, thetas, betas, sigmas))
    return pd.concat(rows, ignore_index=True)


def _parameter_table(model, thetas, betas, sigmas) -> pd.DataFrame:
    """:func:`parameter_vector` for many estimates at once, one row each (vectorised).

    ``Lambda Lambda'`` does not change when a column of ``Lambda`` changes
    sign, so the raw thetas serve.
    """
    thetas, betas = np.atleast_2d(thetas), np.atleast_2d(betas)
    sigmas = np.asarray(sigmas, dtype=float).reshape(-1)
    values = dict(zip(model.fixef_names, betas.T, strict=True))
    covs = covariances_from_theta(model.terms, thetas, sigmas)
    for name, t, cov in zip(unique_group_names(model.terms), model.terms, covs, strict=True):
        sd, corr = sd_and_corr(cov)
        for a in range(t.d):
            values[f"sd_{t.names[a]}|{name}"] = sd[:, a]
        for a in range(t.d):
            for b in range(a + 1, t.d):
                values[f"cor_{t.names[a]}.{t.names[b]}|{name}"] = corr[:, b, a]
    values["sigma"] = sigmas
    return pd.DataFrame(values, dtype=float)

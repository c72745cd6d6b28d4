"""Satterthwaite degrees of freedom and p-values for the fixed effects, as lmerTest computes them.

With the variance parameters ``varpar = (theta, sigma)`` and the REML (or ML)
deviance ``d(varpar)`` with the fixed effects profiled out,

    d = log|A| + log|X'V^-1 X| + (n - p) log(2 pi sigma^2) + r^2 / sigma^2   (REML),
    d = log|A| + n log(2 pi sigma^2) + r^2 / sigma^2                          (ML),

the asymptotic covariance of ``varpar`` is ``2 H^-1`` (``H`` the Hessian of
``d`` at the estimate), and for a contrast ``l`` with ``v(varpar) = l' Cov(beta) l``
(``Cov(beta) = sigma^2 (X'V^-1 X)^-1``) the Satterthwaite degrees of freedom
are ``2 v^2 / (g' (2 H^-1) g)`` with ``g`` the gradient of ``v``. lmerTest
gets ``H`` and ``g`` by finite differences; here they are exact (JAX autodiff),
through the same ``gls_gram`` as the fit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.special

from lmmjax.cache import compiled
from lmmjax.linalg import (
    CrossProducts,
    Structure,
    device_array,
    gls_gram,
    make_lambdas,
    tri_solve,
)
from lmmjax.reml.objective import nfixed

__all__ = ["VcovDerivatives", "contrast_df", "satterthwaite", "t_table", "vcov_derivatives"]


def _parts(varpar, struct: Structure, xp: CrossProducts):  # or a SmallSystem and its products
    theta, sigma = varpar[:-1], varpar[-1]
    logdet_a, gram = gls_gram(struct, make_lambdas(theta, struct), xp)
    L = jnp.linalg.cholesky(gram)
    return theta, sigma, logdet_a, L


def deviance(varpar, struct: Structure, xp: CrossProducts, nobs, reml: bool):
    """-2 log-likelihood (REML or ML) at ``varpar = (theta, sigma)``, beta profiled out."""
    _, sigma, logdet_a, L = _parts(varpar, struct, xp)
    p = nfixed(struct, L)
    r2 = L[-1, -1] ** 2
    if reml:  # padded columns of a small system have unit diagonal: log 1 = 0
        ldx = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)[:-1]))
        return logdet_a + ldx + (nobs - p) * jnp.log(2 * jnp.pi * sigma**2) + r2 / sigma**2
    return logdet_a + nobs * jnp.log(2 * jnp.pi * sigma**2) + r2 / sigma**2


def beta_vcov(varpar, struct: Structure, xp: CrossProducts):
    """``sigma^2 (X' V^-1 X)^-1`` at ``varpar``."""
    _, sigma, _, L = _parts(varpar, struct, xp)
    Linv = tri_solve(L[:-1, :-1], jnp.eye(L.shape[0] - 1, dtype=L.dtype))
    return sigma**2 * Linv.T @ Linv


def _pieces(varpar, struct, xp, nobs, reml):
    # reverse over reverse: the Schur block's log-det has a custom VJP, no forward mode
    H = jax.jacrev(jax.grad(deviance))(varpar, struct, xp, nobs, reml)
    C = beta_vcov(varpar, struct, xp)
    J = jax.jacrev(beta_vcov)(varpar, struct, xp)  # (p, p, k)
    return H, C, J


class VcovDerivatives(NamedTuple):
    """``Cov(beta)``, its derivatives in the variance parameters, and their covariance.

    Attributes
    ----------
    vcov : array (p, p)
        ``sigma^2 (X' V^-1 X)^-1``.
    jac : array (p, p, k)
        Its derivative in each of ``varpar = (theta, sigma)``.
    varpar_cov : array (k, k) or None
        ``2 H^-1``, the asymptotic covariance of ``varpar``; None where the
        Hessian ``H`` is singular (a singular fit can make it so).
    """

    vcov: np.ndarray
    jac: np.ndarray
    varpar_cov: np.ndarray | None


def vcov_derivatives(fit) -> VcovDerivatives:
    """:class:`VcovDerivatives` of a REML/ML fit, by JAX autodiff through ``gls_gram``.

    A small model's padded dense system serves when the fit has one (its
    program is shared with other small models); the padded entries of theta
    are cut from the derivatives.
    """
    if fit._small is not None:
        struct, xp, layout = fit._small
        theta, keep = layout.pad(fit.theta), np.r_[np.arange(layout.ntheta), layout.size]
    else:
        (struct, xp), theta, keep = fit._blocked(), fit.theta, None
    varpar = device_array(np.append(theta, fit.sigma), struct.dtype)
    nobs = device_array(float(fit.nobs), struct.dtype)
    quick = struct.q <= 2000  # compile time dominates on small problems
    run, _ = compiled(_pieces, varpar, struct, xp, nobs, quick=quick, reml=fit.reml)
    H, C, J = (np.asarray(a, dtype=float) for a in run(varpar, struct, xp, nobs))
    if keep is not None:
        p = layout.nfixed
        H, C, J = H[np.ix_(keep, keep)], C[:p, :p], J[:p, :p, keep]
    try:
        A = 2.0 * np.linalg.solve(H, np.eye(H.shape[0]))
    except np.linalg.LinAlgError:
        A = None
    return VcovDerivatives(C, J, A)


def contrast_df(L: np.ndarray, parts: VcovDerivatives) -> np.ndarray:
    """Satterthwaite's degrees of freedom of each row ``l`` of ``L``: ``2 v^2 / (g' A g)``.

    ``v = l' Cov(beta) l``, ``g`` its gradient in the variance parameters and
    ``A`` their covariance; NaN where ``A`` is unavailable.
    """
    L = np.atleast_2d(L)
    if parts.varpar_cov is None:
        return np.full(L.shape[0], np.nan)
    v = np.einsum("ri,ij,rj->r", L, parts.vcov, L)
    g = np.einsum("ri,ijk,rj->rk", L, parts.jac, L)
    return 2.0 * v**2 / np.einsum("rk,kl,rl->r", g, parts.varpar_cov, g)


def satterthwaite(fit) -> pd.DataFrame:
    """lmerTest's coefficient table: Estimate, Std. Error, df, t value, Pr(>|t|).

    Parameters
    ----------
    fit : lmmjax.reml.LmmFit

    Returns
    -------
    pandas.DataFrame
        One row per fixed effect. ``df`` is NaN where the variance parameters'
        Hessian is singular (a singular fit can make it so).
    """
    parts = vcov_derivatives(fit)
    df = contrast_df(np.eye(parts.vcov.shape[0]), parts)
    se = np.sqrt(np.diagonal(parts.vcov))
    return t_table(fit, se, df)


def t_table(fit, se, df) -> pd.DataFrame:
    """The coefficient table from standard errors and degrees of freedom."""
    t = fit.beta / se
    return pd.DataFrame(
        {"Estimate": fit.beta, "Std. Error": se, "df": df, "t value": t,
         "Pr(>|t|)": 2.0 * scipy.special.stdtr(df, -np.abs(t))},
        index=list(fit.model.fixef_names),
    )  # fmt: skip

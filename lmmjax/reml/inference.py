"""Satterthwaite degrees of freedom and p-values for the fixed effects, as lmerTest computes them.

With the variance parameters ``varpar = (theta, sigma)`` and the REML (or ML)
deviance ``d(varpar)`` with the fixed effects profiled out,

    d = log|A| + log|X'V^-1 X| + (n - p) log(2 pi sigma^2) + r^2 / sigma^2   (REML),
    d = log|A| + n log(2 pi sigma^2) + r^2 / sigma^2                          (ML),

the asymptotic covariance of ``varpar`` is ``2 H^-1`` (``H`` the Hessian of
``d`` at the estimate), and for a contrast ``l`` with ``v(varpar) = l' Cov(beta) l``
(``Cov(beta) = sigma^2 (X'V^-1 X)^-1``) the Satterthwaite degrees of freedom
are ``2 v^2 / (g' (2 H^-1) g)`` with ``g`` the gradient of ``v``. lmerTest
gets ``H`` and ``g`` by finite differences; here they are exact: in closed
form on a small model's padded dense system
(:func:`lmmjax.reml.objective.small_vcov_pieces`), by JAX autodiff through the
same ``gls_gram`` as the fit on the blocked one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.special

from lmmjax.cache import compiled
from lmmjax.linalg import device_array
from lmmjax.reml.objective import vcov_pieces
from lmmjax.reml.optimize import QUICK_MAX_Q, Objective

__all__ = ["VcovDerivatives", "contrast_df", "satterthwaite", "t_table", "vcov_derivatives"]


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
    """:class:`VcovDerivatives` of a REML/ML fit.

    A small model's padded dense system serves when the fit has one: the
    fit's own program holds the closed-form pieces (it is shared with other
    small models), and the padded entries of theta are cut from them. Otherwise
    by JAX autodiff through ``gls_gram``.
    """
    if fit._small is not None:  # the fit's own program holds the pieces
        struct, xp, layout = fit._small
        objective = Objective(struct, xp, fit.reml, padding=layout)
        H, _, J = objective.pieces(fit.theta, fit.sigma)
        keep, p = np.r_[np.arange(layout.ntheta), layout.size], layout.nfixed
        # Cov(beta) as the fit reports it: the same up to rounding, which in a
        # near-singular fit the closed form's larger system magnifies
        H, C, J = H[np.ix_(keep, keep)], fit.vcov_matrix, J[:p, :p, keep]
    else:
        (struct, xp), theta = fit._blocked(), fit.theta
        varpar = device_array(np.append(theta, fit.sigma), struct.dtype)
        nobs = device_array(float(fit.nobs), struct.dtype)
        run, _ = compiled(vcov_pieces, varpar, struct, xp, nobs, quick=struct.q <= QUICK_MAX_Q,
                          reml=fit.reml)  # fmt: skip
        H, C, J = (np.asarray(a, dtype=float) for a in run(varpar, struct, xp, nobs))
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

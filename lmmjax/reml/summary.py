"""The printed summary of a REML/ML fit, in lme4's layout."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmmjax.output.tables import coef_table, residuals_and_groups


def format_summary(fit) -> str:
    """lme4-style summary of an :class:`~lmmjax.reml.LmmFit`."""
    m = fit.model
    kind = "REML" if fit.reml else "maximum likelihood"
    tests = f". t-tests use {fit.ddf}'s method" if fit.ddf != "none" else ""
    out = [f"Linear mixed model fit by {kind}{tests} ['lmmjax']", f"Formula: {m.formula}"]
    if m.n_dropped:
        out.append(f"  ({m.n_dropped} observations deleted due to missingness)")
    out.append("")
    if fit.reml:
        out.append(f"REML criterion at convergence: {fit.objective:.4f}")
    else:
        stats = pd.DataFrame(
            [[fit.aic, fit.bic, fit.loglik, fit.objective, fit.nobs - fit.npar]],
            columns=["AIC", "BIC", "logLik", "deviance", "df.resid"],
        )
        out.append(stats.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    resid = fit.residuals(type="pearson").dropna().to_numpy() / fit.sigma
    out += residuals_and_groups(resid, fit.varcorr, fit.nobs, fit.ngroups)
    table = fit.coef_table()
    extra = {k: table[k] for k in table.columns if k not in ("Estimate", "Std. Error")}
    out += ["", "Fixed effects:", coef_table(fit.fixef, fit.fixef_se, extra)]
    if m.p > 1:
        se = np.sqrt(np.diag(fit.vcov_matrix))
        corr = fit.vcov_matrix / np.outer(se, se)
        short = [n.replace("(Intercept)", "(Intr)")[:6] for n in m.fixef_names]
        frame = pd.DataFrame(corr, index=list(m.fixef_names), columns=short)
        tri = frame.iloc[1:, :-1].copy().astype(object)
        for i in range(tri.shape[0]):
            for j in range(tri.shape[1]):
                tri.iat[i, j] = f"{corr[i + 1, j]:.3f}" if j <= i else ""
        out += ["", "Correlation of Fixed Effects:", tri.to_string()]
    if m.dropped_fixef:
        dropped = ", ".join(m.dropped_fixef)
        out += ["", "fixed-effect model matrix is rank deficient so dropping "
                f"{len(m.dropped_fixef)} columns / coefficients: {dropped}"]  # fmt: skip
    if fit.singular:
        out += ["", "boundary (singular) fit: see help('isSingular')"]
    if not fit.converged:
        grad = fit.log.grad_norm if fit.log is not None else float("nan")
        out += ["", f"Model failed to converge: projected gradient {grad:.3g}"]
    return "\n".join(out)

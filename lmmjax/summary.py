"""Text summaries in lme4's layout."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _coef_table(fit) -> str:
    """Estimates and standard errors to 4 significant digits of the SE, as R's printCoefmat."""
    se = fit.fixef_se.to_numpy()
    smallest = np.min(se[se > 0]) if np.any(se > 0) else 1.0
    decimals = int(max(0, 3 - np.floor(np.log10(smallest))))
    table = pd.DataFrame(
        {
            "Estimate": [f"{v:.{decimals}f}" for v in fit.fixef],
            "Std. Error": [f"{v:.{decimals}f}" for v in se],
            "t value": [f"{v:.3f}" for v in fit.tvalues],
        },
        index=fit.fixef.index,
    )
    return table.to_string()


def _random_effects_table(fit) -> str:
    rows = []
    vc = fit.varcorr
    for group, part in vc.groupby("group", sort=False):
        variances = part[part["var2"].isna()]
        corr = part[part["var2"].notna()]
        names = list(variances["var1"]) if group != "Residual" else [""]
        for k, (_, row) in enumerate(variances.iterrows()):
            cells = [group if k == 0 else "", names[k] or "", f"{row['variance']:.4g}",
                     f"{row['sd']:.4g}"]  # fmt: skip
            for j in range(k):
                c = corr[(corr["var1"] == names[j]) & (corr["var2"] == names[k])]
                cells.append(f"{c['corr'].iloc[0]:.2f}" if len(c) else "")
            rows.append(cells)
    width = max(len(r) for r in rows)
    header = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] if width > 4 else [])
    rows = [r + [""] * (width - len(r)) for r in rows]
    header = header + [""] * (width - len(header))
    cols = list(zip(header, *rows, strict=True))
    widths = [max(len(x) for x in col) for col in cols]
    lines = [" " + " ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    for r in rows:
        lines.append(" " + " ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def format_summary(fit) -> str:
    """lme4-style summary of an :class:`~lmmjax.results.LmmFit`."""
    m = fit.model
    kind = "REML" if fit.reml else "maximum likelihood"
    out = [f"Linear mixed model fit by {kind} ['lmmjax']", f"Formula: {m.formula}"]
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
    resid = fit.residuals() / fit.sigma
    q = np.quantile(resid, [0, 0.25, 0.5, 0.75, 1.0])
    out += ["", "Scaled residuals:",
            pd.DataFrame([q], columns=["Min", "1Q", "Median", "3Q", "Max"]).to_string(
                index=False, float_format=lambda v: f"{v:.4f}"),
            "", "Random effects:", _random_effects_table(fit)]  # fmt: skip
    groups = "; ".join(f"{g}, {n}" for g, n in fit.ngroups.items())
    out.append(f"Number of obs: {fit.nobs}, groups:  {groups}")
    out += ["", "Fixed effects:", _coef_table(fit)]
    if m.p > 1:
        se = np.sqrt(np.diag(fit.vcov))
        corr = fit.vcov / np.outer(se, se)
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

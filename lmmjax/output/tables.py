"""Text tables in lme4's layout, for the methods' printed summaries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas loads with the first result, not with lmmjax
    import pandas as pd

__all__ = ["coef_table", "random_effects_table", "residuals_and_groups"]


def coef_table(estimate: pd.Series, se: pd.Series, extra: dict | None = None) -> str:
    """Estimates and standard errors to 4 significant digits of the SE, as R's printCoefmat.

    ``extra`` adds columns (name -> Series), printed to 3 decimals, p-values
    (``Pr(...)``) to 3 significant digits.
    """
    import pandas as pd

    se = se.to_numpy()
    smallest = np.min(se[se > 0]) if np.any(se > 0) else 1.0
    decimals = int(max(0, 3 - np.floor(np.log10(smallest))))
    table = pd.DataFrame(
        {
            "Estimate": [f"{v:.{decimals}f}" for v in estimate],
            "Std. Error": [f"{v:.{decimals}f}" for v in se],
            **{
                k: [f"{v:.3g}" if k.startswith("Pr(") else f"{v:.3f}" for v in col]
                for k, col in (extra or {}).items()
            },  # fmt: skip
        },
        index=estimate.index,
    )
    return table.to_string()


def random_effects_table(vc: pd.DataFrame) -> str:
    """lme4's printed VarCorr (Groups, Name, Variance, Std.Dev., Corr) from the VarCorr frame."""
    rows = []
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


def residuals_and_groups(scaled_residuals, varcorr: pd.DataFrame, nobs: int,
                         ngroups: dict) -> list[str]:  # fmt: skip
    """lme4's summary lines from "Scaled residuals" to "Number of obs", shared by the methods."""
    import pandas as pd

    scaled = np.asarray(scaled_residuals, dtype=float)
    groups = "; ".join(f"{g}, {n}" for g, n in ngroups.items())
    if scaled.size:
        q = np.quantile(scaled, [0, 0.25, 0.5, 0.75, 1.0])
        table = pd.DataFrame([q], columns=["Min", "1Q", "Median", "3Q", "Max"]).to_string(
            index=False, float_format=lambda v: f"{v:.4f}")  # fmt: skip
    else:  # a fit from streamed sufficient statistics holds no rows
        table = "(not available: the rows were streamed, not held)"
    return [
        "", "Scaled residuals:", table,
        "", "Random effects:", random_effects_table(varcorr),
        f"Number of obs: {nobs}, groups:  {groups}",
    ]  # fmt: skip

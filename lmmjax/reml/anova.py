"""F tests of the fixed-effect terms, as lmerTest's ``anova(m)``.

Each term is tested by a contrast matrix ``L`` (one row per degree of freedom)
against ``L beta = 0``:

* **type III** (the default) uses lmerTest's construction, SAS's: express every
  column of the overparametrised design (each factor with all its levels,
  R's ``model.matrix(~ 0 + term)``) in the coefficients of the treatment-coded
  ``X``, orthogonalise the columns of a term against those of the terms that
  contain it (higher order first), and keep the rows of ``X``'s own columns;
* **type I** (sequential) takes the rows of the unit upper factor of ``X'X``
  (Doolittle), which is also what type III falls back on when the model has a
  single term.

The F statistic is ``(L beta)' (L C L')^-1 (L beta) / q`` with ``C = Cov(beta)``.
Satterthwaite's denominator degrees of freedom follow lmerTest: with the
eigendecomposition ``L C L' = P D P'``, each rotated contrast ``P_m' L`` gets
``nu_m = 2 d_m^2 / (g_m' A g_m)`` (:func:`lmmjax.reml.inference.contrast_df`)
and the F test ``2 E / (E - q)`` with ``E = sum nu_m / (nu_m - 2)``.
Kenward-Roger's uses the adjusted covariance and scaled F of
:mod:`lmmjax.reml.kenward_roger`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.special

from lmmjax.design import fixed_terms
from lmmjax.errors import LmmInputError
from lmmjax.options import ddf_name
from lmmjax.reml.inference import VcovDerivatives, contrast_df, vcov_derivatives

__all__ = ["anova", "contrasts_type1", "contrasts_type3", "f_test", "zapsmall"]

_COLUMNS = ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]


def zapsmall(x: np.ndarray, digits: int = 7) -> np.ndarray:
    """R's ``zapsmall``: round to ``digits`` significant digits of the largest entry."""
    x = np.asarray(x, dtype=float)
    mx = np.max(np.abs(x)) if x.size else 0.0
    keep = max(0, digits - int(np.ceil(np.log10(mx)))) if mx > 0 else digits
    return np.round(x, keep) + 0.0  # no negative zeros


def _term_columns(terms, columns) -> dict[str, list[int]]:
    position = {name: k for k, name in enumerate(columns)}
    return {t.label: [position[c] for c in t.columns if c in position] for t in terms}


def contrasts_type1(X: np.ndarray, term_cols: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Sequential (type I) contrasts: rows of the unit upper factor of ``X'X``.

    ``X'X = R'R`` with ``R`` upper triangular; lmerTest's Doolittle factor
    ``L D L'`` has ``L' = diag(R)^-1 R``, and entries below 1e-6 are zero, as there.
    """
    R = np.linalg.cholesky(X.T @ X).T
    U = R / np.diagonal(R)[:, None]
    U[np.abs(U) < 1e-6] = 0.0
    return {label: U[cols] for label, cols in term_cols.items()}


def _contains(outer, inner) -> bool:
    """lmerTest's containment: ``inner``'s variables a strict subset, same numeric ones."""
    a, b = set(inner.variables), set(outer.variables)
    return a < b and set(inner.numeric) == set(outer.numeric)


def contrasts_type3(X: np.ndarray, terms, columns, intercept: bool) -> dict[str, np.ndarray]:
    """lmerTest's type III contrasts for the treatment-coded ``X``.

    Parameters
    ----------
    X : array (N, p)
        The model's fixed-effect design (full column rank).
    terms : list of lmmjax.formula.fixed.FixedTerm
    columns : sequence of str
        formulaic's names of ``X``'s columns.
    intercept : bool

    Raises
    ------
    LmmInputError
        When a column of ``X`` is not a treatment-coded column of its term.
    """
    full = [np.ones((X.shape[0], 1))] if intercept else []
    names = ["Intercept"] if intercept else []
    for t in terms:
        full.append(t.full)
        names += list(t.full_names)
    rdX = np.concatenate(full, axis=1)
    L = zapsmall(np.linalg.lstsq(X, rdX, rcond=None)[0].T)  # rdX = X L'
    cols = _term_columns(terms, columns)
    order = sorted(range(len(terms)), key=lambda k: -len(terms[k].variables))  # stable
    for k in order:
        inner = terms[k]
        outer = [c for t in terms if _contains(t, inner) for c in cols[t.label]]
        if outer and cols[inner.label]:
            A, B = L[:, outer], L[:, cols[inner.label]]
            L[:, cols[inner.label]] = zapsmall(B - A @ np.linalg.lstsq(A, B, rcond=None)[0])
    row_of = {name: k for k, name in enumerate(names)}
    rows = []
    for c in columns:
        key = c.replace("[T.", "[")
        if key not in row_of:
            raise LmmInputError(f"anova type 3 needs treatment-coded factors; column {c!r} is not")
        rows.append(row_of[key])
    L = L[rows]
    out = {}
    for t in terms:
        Lt = L[:, cols[t.label]].T
        out[t.label] = Lt[np.sum(np.abs(Lt), axis=1) > 1e-8]
    return out


def _ddf_of_f(nu: np.ndarray) -> float:
    """lmerTest's denominator df of an F test from the rotated contrasts' df."""
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < 1e-8):
        return float(np.mean(nu))
    if np.any(nu <= 2):
        return 2.0
    E = np.sum(nu / (nu - 2.0))
    return float(2.0 * E / (E - nu.size))


def f_test(L: np.ndarray, beta: np.ndarray, parts: VcovDerivatives, sigma: float) -> dict:
    """The F test of ``L beta = 0`` with Satterthwaite's df, one anova row (lmerTest's)."""
    if L.shape[0] == 0:
        return _empty()
    d, P = np.linalg.eigh(L @ parts.vcov @ L.T)
    d, P = d[::-1], P[:, ::-1]  # decreasing, as R's eigen
    q = int(np.sum(d > max(np.sqrt(np.finfo(float).eps) * d[0], 0.0)))
    if q == 0:
        return _empty()
    PtL = P[:, :q].T @ L
    F = float(np.sum((PtL @ beta) ** 2 / d[:q]) / q)
    ddf = _ddf_of_f(contrast_df(PtL, parts))
    return _row(F, q, ddf, sigma)


def _empty() -> dict:
    return dict.fromkeys(_COLUMNS, np.nan)


def _row(F: float, q: int, ddf: float, sigma: float, scale: float = 1.0) -> dict:
    """An anova row as lmerTest's: ``Mean Sq = F sigma^2`` before ``F`` is scaled."""
    ms = F * sigma**2
    F = F * scale
    p = scipy.special.fdtrc(q, ddf, F) if np.isfinite(ddf) else np.nan
    return dict(zip(_COLUMNS, [ms * q, ms, q, ddf, F, p], strict=True))


def anova(fit, type: int | str = 3, ddf: str = "Satterthwaite") -> pd.DataFrame:  # noqa: A002
    """lmerTest's ``anova(m, type, ddf)``: one F test per fixed-effect term.

    Parameters
    ----------
    fit : lmmjax.reml.LmmFit
    type : {3, 1, "III", "I"}
        Type III (marginal, SAS's) or type I (sequential) hypotheses.
    ddf : {"Satterthwaite", "Kenward-Roger"}
        Denominator degrees of freedom; Kenward-Roger needs a REML fit.

    Returns
    -------
    pandas.DataFrame
        Columns ``Sum Sq``, ``Mean Sq``, ``NumDF``, ``DenDF``, ``F value``,
        ``Pr(>F)``; one row per term (the intercept is not tested). The
        contrast matrices are in ``attrs["hypotheses"]``.
    """
    kinds = {3: 3, "3": 3, "III": 3, 1: 1, "1": 1, "I": 1}
    if type not in kinds:
        raise LmmInputError(f"anova type must be 3 ('III') or 1 ('I'), got {type!r}")
    method = ddf_name(ddf)
    if method == "none":
        raise LmmInputError("anova needs ddf 'Satterthwaite' or 'Kenward-Roger', got 'none'")
    terms, columns, intercept = fixed_terms(fit.model)
    X = fit.model.X
    if kinds[type] == 1 or X.shape[1] <= 1 or len(terms) <= 1:
        hypotheses = contrasts_type1(X, _term_columns(terms, columns))
    else:
        hypotheses = contrasts_type3(X, terms, columns, intercept)
    if method == "Kenward-Roger":
        from lmmjax.reml.kenward_roger import kr_f_test, kr_parts

        kr = kr_parts(fit)
        rows = []
        for L in hypotheses.values():
            if L.shape[0] == 0:
                rows.append(_empty())
                continue
            F, q, df, scale = kr_f_test(L, fit.beta, kr)
            rows.append(_row(F, q, df, fit.sigma, scale))
    else:
        parts = vcov_derivatives(fit)
        rows = [f_test(L, fit.beta, parts, fit.sigma) for L in hypotheses.values()]
    table = pd.DataFrame(rows, index=list(hypotheses), columns=_COLUMNS)
    heading = "Type III" if kinds[type] == 3 else "Type I"
    table.attrs["heading"] = f"{heading} Analysis of Variance Table with {method}'s method"
    table.attrs["hypotheses"] = hypotheses
    return table

"""A model fitted by sparse selection: the support, the CV curve, and the REML refit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lmmjax.options import SparseOptions
from lmmjax.output import coef_table, random_effects_table, result_dict, varcorr_rows

__all__ = ["SparseFit"]


@dataclass
class SparseFit:
    """Fixed effects selected after the quasi-likelihood transform, optionally refitted by REML.

    Build with :func:`lmmjax.lmm` (``method="sparse"``) or :func:`lmmjax.sparse.fit_sparse`.
    With ``refit`` (the default), ``fixef``, ``fixef_se``, ``sigma``, ``theta``,
    ``varcorr`` and ``ranef()`` are those of the REML fit of the intercept and
    the selected columns (``refit`` holds it). Without it they are those of the
    working model ``y_i ~ N(X_i beta, sigma^2 (a Z_i Z_i' + I))`` at the chosen
    ``a``: whitened least squares on the support, ``Psi = a sigma^2 I`` and no
    standard errors (NaN).

    Attributes
    ----------
    support : tuple of str
        The selected columns (the intercept is not among them; it is always kept).
    columns : tuple of int
        Columns of ``model.X`` kept: the intercept and the support.
    a, k : float, int
        The chosen working variance ratio and support size.
    cv : list of dict
        ``{a, k, loss}``: the cross-validation curve (see :func:`lmmjax.sparse.cv.choose`).
    unstable : int
        Columns of the criterion's own choice left out by the stability rule.
    """

    model: Any
    options: SparseOptions
    support: tuple[str, ...]
    columns: tuple[int, ...]
    a: float
    k: int
    cv: list
    working_beta: np.ndarray
    working_sigma: float
    working_b: np.ndarray | None = field(default=None, repr=False)
    refit: Any = field(default=None, repr=False)
    unstable: int = 0
    converged: bool = True
    seconds: float = float("nan")
    method: str = "sparse"

    def __repr__(self) -> str:
        return (
            f"SparseFit({self.model.formula!r}, k={self.k}, a={self.a:g}, "
            f"support={list(self.support)}, refit={self.refit is not None})"
        )

    # ------------------------------------------------------------ estimates
    @property
    def fixef_names(self) -> list[str]:
        """The intercept (if any) and the selected columns, in the model's order."""
        return [self.model.fixef_names[j] for j in self.columns]

    @property
    def fixef(self) -> pd.Series:
        """Estimates of the intercept and the selected columns (refitted when ``refit``)."""
        if self.refit is not None:
            return self.refit.fixef
        return pd.Series(self.working_beta, index=self.fixef_names, name="Estimate")

    @property
    def fixef_se(self) -> pd.Series:
        """REML standard errors after the refit; NaN without it."""
        if self.refit is not None:
            return self.refit.fixef_se
        return pd.Series(np.full(len(self.columns), np.nan), index=self.fixef_names)

    @property
    def sigma(self) -> float:
        """Residual SD: REML's after the refit, else the working model's."""
        return self.refit.sigma if self.refit is not None else self.working_sigma

    @property
    def theta(self) -> np.ndarray:
        """lme4's theta: REML's after the refit, else ``sqrt(a) I`` per term."""
        if self.refit is not None:
            return self.refit.theta
        out = []
        for t in self.model.terms:
            rows, cols = t.theta_index()
            out.append(np.where(rows == cols, np.sqrt(self.a), 0.0))
        return np.concatenate(out)

    @property
    def nobs(self) -> int:
        return self.model.nobs

    def covariances(self) -> list[np.ndarray]:
        """Each term's random-effect covariance."""
        if self.refit is not None:
            return self.refit.covariances()
        s2a = self.working_sigma**2 * self.a
        return [s2a * np.eye(t.d) for t in self.model.terms]

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(m))`` (REML refit, or the working model)."""
        if self.refit is not None:
            return self.refit.varcorr
        return pd.DataFrame(varcorr_rows(self.model.terms, self.covariances(), self.sigma))

    def ranef(self) -> dict[str, pd.DataFrame]:
        """Conditional means of the random effects per grouping factor."""
        if self.refit is not None:
            return self.refit.ranef(condvar=False)
        t0 = self.model.terms[0]
        names = [n for t in self.model.terms for n in t.names]
        frame = pd.DataFrame(self.working_b, index=pd.Index(t0.levels, name=t0.group),
                             columns=names)  # fmt: skip
        return {t0.group: frame}

    # --------------------------------------------------------------- output
    def cv_table(self) -> pd.DataFrame:
        """The cross-validation curve as a table (columns a, k, loss)."""
        return pd.DataFrame(self.cv, columns=["a", "k", "loss"])

    def summary(self) -> str:
        """The selection, the CV curve and the (refitted) estimates as text."""
        o = self.options
        lines = [
            f"Sparse fixed effects ({o.selector}, quasi-likelihood transform) ['SparseFit']",
            f"Formula: {self.model.formula}",
            f"Candidates: {self.model.p - len(self.columns) + self.k}, selected k = {self.k} "
            f"(criterion {o.criterion}), a = {self.a:g} "
            f"({o.cv_folds}-fold cluster-wise CV)",
            f"Support: {', '.join(self.support) or '(none)'}"
            + (f" ({self.unstable} unstable column(s) left out)" if self.unstable else ""),
            "",
            "Cross-validation (held-out NLL per observation):",
            self.cv_table().to_string(index=False, float_format=lambda v: f"{v:.5g}"),
            "",
        ]
        if self.refit is not None:
            lines += ["REML refit on the intercept and the support:", self.refit.summary()]
        else:
            lines += [
                "Random effects (working model, Psi = a sigma^2 I):",
                random_effects_table(self.varcorr),
                "",
                "Fixed effects (whitened least squares on the support):",
                coef_table(self.fixef, self.fixef_se),
            ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The JSON result: shared keys, then support, a, k and the CV curve."""
        r = self.refit
        return result_dict(
            self,
            objective=None if r is None else r.objective,
            loglik=None if r is None else r.loglik,
            aic=None if r is None else r.aic,
            bic=None if r is None else r.bic,
            singular=None if r is None else r.singular,
            support=list(self.support),
            a=self.a,
            k=self.k,
            cv=self.cv,
            unstable=self.unstable,
            selector=self.options.selector,
            criterion=self.options.criterion,
            refit=r is not None,
        )

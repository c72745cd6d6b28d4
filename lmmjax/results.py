"""Fitted REML/ML models: estimates, random effects, predictions and summaries."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats

from lmmjax.design import Model, conform_newdata, row_labels
from lmmjax.errors import LmmInputError
from lmmjax.likelihood import Estimates
from lmmjax.likelihood import estimates as compute_estimates
from lmmjax.linalg import Structure, factorize, make_lambdas
from lmmjax.linalg.blocked import inverse_diag_blocks
from lmmjax.terms import unique_group_names


@jax.jit
def _inverse_blocks(theta, struct):
    return inverse_diag_blocks(struct, factorize(struct, make_lambdas(theta, struct.layout)))


def varcorr_rows(terms, covariances, sigma: float) -> list[dict]:
    """Rows of lme4's ``as.data.frame(VarCorr(m))``: variances, then correlations."""
    rows = []
    for name, t, cov in zip(unique_group_names(terms), terms, covariances, strict=True):
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        for a in range(t.d):
            rows.append(
                dict(group=name, var1=t.names[a], var2=None, variance=float(cov[a, a]),
                     sd=float(sd[a]), corr=None)
            )  # fmt: skip
        for a in range(t.d):
            for b in range(a + 1, t.d):
                denom = sd[a] * sd[b]
                corr = float(cov[b, a] / denom) if denom > 0 else float("nan")
                rows.append(
                    dict(group=name, var1=t.names[a], var2=t.names[b],
                         variance=float(cov[b, a]), sd=None, corr=corr)
                )  # fmt: skip
    rows.append(
        dict(group="Residual", var1=None, var2=None, variance=sigma**2, sd=sigma, corr=None)
    )
    return rows


@dataclass
class LmmFit:
    """A linear mixed model fitted by REML or ML.

    Build with :func:`lmmjax.fit_lmm` (or :meth:`from_theta`). Attribute names
    follow lme4: ``fixef``, ``vcov``, ``sigma``, ``theta``, ``varcorr``,
    ``objective`` (REML criterion or deviance), ``loglik``, ``aic``, ``bic``.
    """

    model: Model
    reml: bool
    theta: np.ndarray
    beta: np.ndarray
    sigma: float
    vcov: np.ndarray
    objective: float
    b: list = field(repr=False)
    singular: bool = False
    converged: bool = True
    log: object = None
    seconds: float = float("nan")
    _struct: Structure = field(default=None, repr=False)

    def __repr__(self) -> str:
        kind = "REML" if self.reml else "ML"
        return (
            f"LmmFit({self.model.formula!r}, {kind}, objective={self.objective:.4f}, "
            f"nobs={self.nobs}, converged={self.converged}, singular={self.singular})"
        )

    # ----------------------------------------------------------------- build
    @classmethod
    def from_theta(cls, model: Model, struct: Structure, theta, *, reml, log=None,
                   singular=False, estimates: Estimates | None = None):  # fmt: skip
        """Collect every estimate at theta (computing them unless ``estimates`` is given)."""
        from lmmjax.inference.reml import _compiled

        theta = np.asarray(theta, dtype=float)
        if estimates is None:
            th = jnp.asarray(theta, dtype=struct.C.dtype)
            run, _ = _compiled(compute_estimates, th, struct, reml=reml)
            estimates = run(th, struct)
        est = jax.tree.map(np.asarray, estimates)
        return cls(
            model=model, reml=reml, theta=theta, beta=est.beta.astype(float),
            sigma=float(est.sigma), vcov=est.vcov.astype(float), objective=float(est.objective),
            b=[np.asarray(b, dtype=float) for b in est.b], singular=singular,
            converged=True if log is None else log.converged, log=log, _struct=struct,
        )  # fmt: skip

    # ------------------------------------------------------------ estimates
    @property
    def fixef(self) -> pd.Series:
        """Fixed-effect estimates."""
        return pd.Series(self.beta, index=list(self.model.fixef_names), name="Estimate")

    @property
    def fixef_se(self) -> pd.Series:
        """Standard errors of the fixed effects."""
        return pd.Series(np.sqrt(np.diag(self.vcov)), index=list(self.model.fixef_names))

    @property
    def tvalues(self) -> pd.Series:
        """t values ``estimate / SE``."""
        return self.fixef / self.fixef_se

    @property
    def nobs(self) -> int:
        return self.model.nobs

    @property
    def ngroups(self) -> dict[str, int]:
        return self.model.ngroups

    @property
    def npar(self) -> int:
        """Number of parameters: fixed effects, theta and sigma."""
        return self.model.p + self.theta.size + 1

    @property
    def loglik(self) -> float:
        """Log-likelihood (the REML log-likelihood for a REML fit, as lme4)."""
        return -0.5 * self.objective

    @property
    def aic(self) -> float:
        return self.objective + 2 * self.npar

    @property
    def bic(self) -> float:
        return self.objective + self.npar * np.log(self.nobs)

    def covariances(self) -> list[np.ndarray]:
        """Each term's covariance ``sigma^2 Lambda Lambda'``."""
        lambdas = make_lambdas(jnp.asarray(self.theta), self._struct.layout)
        return [self.sigma**2 * np.asarray(lam @ lam.T) for lam in lambdas]

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(m))`` with columns group, var1, var2,
        variance (covariance on correlation rows), sd and corr."""
        return pd.DataFrame(varcorr_rows(self.model.terms, self.covariances(), self.sigma))

    def confint(self, level: float = 0.95) -> pd.DataFrame:
        """Wald confidence intervals for the fixed effects."""
        z = scipy.stats.norm.ppf(0.5 + level / 2)
        lo, hi = f"{100 * (1 - level) / 2:.1f} %", f"{100 * (1 + level) / 2:.1f} %"
        return pd.DataFrame(
            {lo: self.fixef - z * self.fixef_se, hi: self.fixef + z * self.fixef_se}
        )

    # ------------------------------------------------------- random effects
    def _cond_var_blocks(self) -> list[np.ndarray]:
        """Diagonal blocks of ``A^{-1}`` per term and level (compiled chunked solves)."""
        th = jnp.asarray(self.theta, dtype=self._struct.C.dtype)
        return [np.asarray(b, dtype=float) for b in _inverse_blocks(th, self._struct)]

    def ranef(self, condvar: bool = True) -> dict[str, pd.DataFrame]:
        """Conditional modes of the random effects, one DataFrame per grouping factor.

        With ``condvar=True`` each frame's ``attrs["condvar"]`` holds the
        conditional covariance of each level's effects, shape (M, d, d), and
        columns ``se(<effect>)`` give the conditional standard deviations.
        """
        frames: dict[str, list] = {}
        blocks = self._cond_var_blocks() if condvar else [None] * len(self.b)
        lambdas = make_lambdas(jnp.asarray(self.theta), self._struct.layout)
        for t, b, blk, lam in zip(self.model.terms, self.b, blocks, lambdas, strict=True):
            frame = pd.DataFrame(b, index=pd.Index(t.levels, name=t.group), columns=list(t.names))
            cv = None
            if blk is not None:
                lam = np.asarray(lam)
                cv = self.sigma**2 * np.einsum("ac,mcd,bd->mab", lam, blk, lam)
            frames.setdefault(t.group, []).append((frame, cv))
        out = {}
        for group, parts in frames.items():
            frame = pd.concat([f for f, _ in parts], axis=1)
            if condvar:
                for f, cv in parts:
                    for k, name in enumerate(f.columns):
                        frame[f"se({name})"] = np.sqrt(np.clip(cv[:, k, k], 0, None))
                cvs = [cv for _, cv in parts]
                frame.attrs["condvar"] = cvs[0] if len(cvs) == 1 else cvs
            out[group] = frame
        return out

    def coef(self) -> dict[str, pd.DataFrame]:
        """Per-level coefficients: fixed effects plus that level's random effects."""
        out = {}
        for group, frame in self.ranef(condvar=False).items():
            table = pd.DataFrame(
                np.tile(self.beta, (len(frame), 1)), index=frame.index,
                columns=list(self.model.fixef_names),
            )  # fmt: skip
            for name in frame.columns:
                if name in table.columns:
                    table[name] = table[name] + frame[name]
                else:
                    table[name] = frame[name]
            out[group] = table
        return out

    def _random_part(self, terms_z, terms_refs) -> np.ndarray:
        total = 0.0
        for z, refs, b in zip(terms_z, terms_refs, self.b, strict=True):
            valid = refs >= 0
            contrib = np.sum(z * b[np.where(valid, refs, 0)], axis=1)
            total = total + np.where(valid, contrib, 0.0)
        return total

    def fitted(self) -> np.ndarray:
        """Fitted values ``X beta + Z b`` at the conditional modes."""
        m = self.model
        return m.X @ self.beta + self._random_part(
            [t.z for t in m.terms], [t.refs for t in m.terms]
        )

    def residuals(self) -> np.ndarray:
        """Response residuals ``y - fitted``."""
        return self.model.y - self.fitted()

    def predict(self, newdata: pd.DataFrame | None = None, *, allow_new_levels: bool = True,
                re_form: bool = True) -> np.ndarray:  # fmt: skip
        """Predictions for new data.

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Defaults to the data of the fit (then equal to :meth:`fitted`).
        allow_new_levels : bool
            Levels not seen in the fit get random effect zero (the population
            prediction); when False they raise an error.
        re_form : bool
            False for population-level predictions (fixed effects only).
        """
        if newdata is None:
            return self.fitted() if re_form else self.model.X @ self.beta
        m = self.model
        if not isinstance(newdata, pd.DataFrame):
            raise LmmInputError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        needed = m.fixed_variables if not re_form else m.used_variables
        needed = [c for c in needed if c != m.response]
        absent = [c for c in needed if c not in newdata.columns]
        if absent:
            raise LmmInputError(f"newdata lacks column {absent[0]!r} used by the model")
        # rows with a missing value predict NaN, as lme4's predict(na.action = na.pass)
        complete = newdata[needed].notna().all(axis=1).to_numpy()
        out = np.full(len(newdata), np.nan)
        rows = newdata.loc[complete]
        if rows.empty:
            return out
        data = conform_newdata(m, rows)
        try:
            X = np.asarray(m.fixed_spec.get_model_matrix(data, na_action="raise"), dtype=float)
        except Exception as exc:  # formulaic raises several types for bad new data
            raise LmmInputError(f"cannot build fixed effects for newdata: {exc}") from None
        pred = X[:, list(m.fixed_columns)] @ self.beta
        if re_form:
            zs, refs = [], []
            for t in m.terms:
                z = np.asarray(t.lhs_spec.get_model_matrix(data, na_action="raise"), dtype=float)
                zs.append(z[:, list(t.lhs_columns)])
                refs.append(self._level_index(t, rows, allow_new_levels))
            pred = pred + self._random_part(zs, refs)
        out[complete] = pred
        return out

    @staticmethod
    def _level_index(term, data: pd.DataFrame, allow_new_levels: bool) -> np.ndarray:
        missing = [f for f in term.factors if f not in data.columns]
        if missing:
            raise LmmInputError(f"newdata lacks grouping column {missing[0]!r}")
        labels = row_labels(data, term.factors)
        lookup = {lvl: k for k, lvl in enumerate(term.levels)}
        refs = np.array([lookup.get(v, -1) for v in labels], dtype=np.int64)
        if not allow_new_levels and (refs < 0).any():
            new = sorted({str(v) for v in labels[refs < 0]})
            raise LmmInputError(
                f"newdata has levels of {term.group!r} not in the fit: {', '.join(new[:5])}"
            )
        return refs

    # --------------------------------------------------------------- output
    def to_dict(self) -> dict:
        """The JSON result schema shared by every method."""
        return {
            "method": "reml" if self.reml else "ml",
            "formula": self.model.formula,
            "nobs": self.nobs,
            "ngroups": self.ngroups,
            "fixef": self.fixef.to_dict(),
            "fixef_se": self.fixef_se.to_dict(),
            "sigma": self.sigma,
            "theta": self.theta.tolist(),
            "varcorr": varcorr_rows(self.model.terms, self.covariances(), self.sigma),
            "objective": self.objective,
            "loglik": self.loglik,
            "aic": self.aic,
            "bic": self.bic,
            "converged": self.converged,
            "singular": self.singular,
            "seconds": self.seconds,
            "optimizer": None if self.log is None else self.log.to_dict(),
            "n_dropped": self.model.n_dropped,
            "dropped_fixef": list(self.model.dropped_fixef),
        }

    def summary(self) -> str:
        """A printed summary in lme4's order."""
        from lmmjax.summary import format_summary

        return format_summary(self)

    def __str__(self) -> str:
        return self.summary()


def compare(m0: LmmFit, m1: LmmFit) -> pd.DataFrame:
    """Likelihood-ratio test of two nested models, as lme4's ``anova(m0, m1)``.

    REML fits are refitted by ML first, since REML criteria of models with
    different fixed effects are not comparable.
    """
    from lmmjax.inference.reml import fit

    fits = [fit(m.model, reml=False) if m.reml else m for m in (m0, m1)]
    if fits[0].nobs != fits[1].nobs:
        raise LmmInputError("models were fitted to different numbers of observations")
    fits.sort(key=lambda f: f.npar)
    rows = []
    for k, f in enumerate(fits):
        row = {"npar": f.npar, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik,
               "deviance": f.objective}  # fmt: skip
        row.update({"Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan})
        if k == 1:
            chisq = max(fits[0].objective - f.objective, 0.0)
            df = f.npar - fits[0].npar
            row.update({"Chisq": chisq, "Df": df, "Pr(>Chisq)": scipy.stats.chi2.sf(chisq, df)})
        rows.append(row)
    return pd.DataFrame(rows, index=["m0", "m1"])

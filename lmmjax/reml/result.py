"""A model fitted by REML or ML: estimates, random effects, predictions and summaries."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import numpy as np
import pandas as pd
import scipy.special

from lmmjax.cache import compiled
from lmmjax.design import Model
from lmmjax.errors import LmmInputError
from lmmjax.linalg import CrossProducts, Structure, conditional_moments, make_lambdas, z_times
from lmmjax.options import ddf_name
from lmmjax.output import result_dict, varcorr_rows
from lmmjax.reml.objective import Estimates, blocked_problem
from lmmjax.terms import covariances_from_theta

__all__ = ["LmmFit"]


def _condvar(theta, sigma, beta, struct, xp):
    """Conditional covariance blocks of every term at theta (compiled once per shape)."""
    lambdas = make_lambdas(theta, struct)
    return conditional_moments(struct, lambdas, xp.residual(beta), sigma, cov=True).cov


@dataclass
class LmmFit:
    """A linear mixed model fitted by REML or ML.

    Build with :func:`lmmjax.lmm` or :func:`lmmjax.reml.fit_reml`. Attribute names
    follow lme4: ``fixef``, ``vcov``, ``sigma``, ``theta``, ``varcorr``,
    ``objective`` (REML criterion or deviance), ``loglik``, ``aic``, ``bic``.
    """

    model: Model
    reml: bool
    theta: np.ndarray
    beta: np.ndarray
    sigma: float
    vcov_matrix: np.ndarray
    objective: float
    b: list = field(repr=False)
    singular: bool = False
    converged: bool = True
    log: object = None
    seconds: float = float("nan")
    _struct: Structure = field(default=None, repr=False)
    _xp: CrossProducts = field(default=None, repr=False)
    ddf: str = "Satterthwaite"
    _coef: dict | None = field(default=None, repr=False)  # coefficient tables by ddf
    _fitter: object = field(default=None, repr=False)  # fit_reml, for refit / update
    _small: tuple | None = field(default=None, repr=False)  # (SmallSystem, products, layout)

    @property
    def method(self) -> str:
        """``"reml"`` or ``"ml"``."""
        return "reml" if self.reml else "ml"

    def __repr__(self) -> str:
        kind = "REML" if self.reml else "ML"
        return (
            f"LmmFit({self.model.formula!r}, {kind}, objective={self.objective:.4f}, "
            f"nobs={self.nobs}, converged={self.converged}, singular={self.singular})"
        )

    # ----------------------------------------------------------------- build
    @classmethod
    def from_estimates(cls, model: Model, theta, estimates: Estimates, *, reml, log=None,
                       singular=False, blocked=(None, None), small=None):  # fmt: skip
        """Collect a fit from theta and the estimates there.

        ``blocked`` is the model's ``(Structure, CrossProducts)`` when the fit
        built them (they are built on first use otherwise), ``small`` its
        ``(SmallSystem, DenseProducts, SmallLayout)`` when it has one.
        """
        est = jax.tree.map(np.asarray, estimates)
        struct, xp = blocked
        return cls(
            model=model, reml=reml, theta=np.asarray(theta, dtype=float),
            beta=est.beta.astype(float), sigma=float(est.sigma),
            vcov_matrix=est.vcov.astype(float), objective=float(est.objective),
            b=[np.asarray(b, dtype=float) for b in est.b], singular=singular,
            converged=True if log is None else log.converged, log=log, _struct=struct, _xp=xp,
            _small=small,
        )  # fmt: skip

    def _blocked(self) -> tuple[Structure, CrossProducts]:
        """The model's blocked structure and cross products of [X y], built on first use."""
        if self._struct is None:
            self._struct, self._xp, _, _ = blocked_problem(self.model)
        return self._struct, self._xp

    # ------------------------------------------------------------ estimates
    @property
    def fixef(self) -> pd.Series:
        """Fixed-effect estimates."""
        return pd.Series(self.beta, index=list(self.model.fixef_names), name="Estimate")

    @property
    def fixef_se(self) -> pd.Series:
        """Standard errors of the fixed effects."""
        return pd.Series(np.sqrt(np.diag(self.vcov_matrix)), index=list(self.model.fixef_names))

    @property
    def vcov(self) -> pd.DataFrame:
        """Covariance of the fixed-effect estimates, labelled by fixed-effect name."""
        names = list(self.model.fixef_names)
        return pd.DataFrame(self.vcov_matrix, index=names, columns=names)

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
        return covariances_from_theta(self.model.terms, self.theta, self.sigma)

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(m))`` with columns group, var1, var2,
        variance (covariance on correlation rows), sd and corr."""
        return pd.DataFrame(varcorr_rows(self.model.terms, self.covariances(), self.sigma))

    def coef_table(self, ddf: str | None = None) -> pd.DataFrame:
        """Estimate, Std. Error, t value and, with a ``ddf`` method, df and Pr(>|t|).

        Parameters
        ----------
        ddf : {"Satterthwaite", "Kenward-Roger", "none"}, optional
            Defaults to the fit's ``ddf`` option (any case; ``"KR"`` is
            Kenward-Roger). Satterthwaite's degrees of freedom are lmerTest's
            (:mod:`lmmjax.reml.inference`); Kenward-Roger's are pbkrtest's, with
            standard errors from its adjusted covariance
            (:mod:`lmmjax.reml.kenward_roger`, REML fits only).
        """
        ddf = ddf_name(self.ddf if ddf is None else ddf)
        if ddf == "none":
            return pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.fixef_se,
                                 "t value": self.tvalues})  # fmt: skip
        if self._coef is None:
            self._coef = {}
        if ddf not in self._coef:
            from lmmjax.reml.inference import satterthwaite, t_table

            if ddf == "Kenward-Roger":
                from lmmjax.reml.kenward_roger import kr_ddf, kr_parts

                kr = kr_parts(self)
                se = np.sqrt(np.diagonal(kr.vcov_adj))
                self._coef[ddf] = t_table(self, se, kr_ddf(np.eye(se.size), kr))
            else:
                self._coef[ddf] = satterthwaite(self)
        return self._coef[ddf]

    def anova(self, type: int | str = 3, ddf: str | None = None) -> pd.DataFrame:  # noqa: A002
        """F tests of the fixed-effect terms, as lmerTest's ``anova(m)``.

        Parameters
        ----------
        type : {3, 1, "III", "I"}
            Type III (default) or type I (sequential) hypotheses.
        ddf : {"Satterthwaite", "Kenward-Roger"}, optional
            Denominator degrees of freedom; defaults to the fit's ``ddf``
            option (Satterthwaite's when that is ``"none"``).

        Returns
        -------
        pandas.DataFrame
            ``Sum Sq``, ``Mean Sq``, ``NumDF``, ``DenDF``, ``F value``, ``Pr(>F)``
            per term (:func:`lmmjax.reml.anova.anova`).
        """
        from lmmjax.reml.anova import anova

        if ddf is None:
            ddf = "Satterthwaite" if self.ddf == "none" else self.ddf
        return anova(self, type=type, ddf=ddf)

    def confint(self, level: float = 0.95, method: str = "Wald", nsim: int = 200,
                seed: int | None = None) -> pd.DataFrame:  # fmt: skip
        """Confidence intervals, as lme4's ``confint``.

        Parameters
        ----------
        level : float
        method : {"Wald", "profile", "boot"}
            Wald intervals for the fixed effects; profile-likelihood intervals
            (lme4's, on the ML deviance: :mod:`lmmjax.reml.profile`) or
            parametric-bootstrap percentile intervals (``nsim`` refits,
            :meth:`bootstrap`) for every parameter: fixed effects, random-effect
            SDs and correlations, sigma.
        """
        lo, hi = f"{100 * (1 - level) / 2:.1f} %", f"{100 * (1 + level) / 2:.1f} %"
        if not 0 < level < 1:
            raise LmmInputError(f"level must be between 0 and 1, got {level!r}")
        if method == "boot":
            draws = self.bootstrap(nsim, seed)
            q = draws.quantile([(1 - level) / 2, (1 + level) / 2])
            return pd.DataFrame({lo: q.iloc[0], hi: q.iloc[1]})
        if method == "profile":
            from lmmjax.reml.profile import profile_confint

            return profile_confint(self, level)
        if method != "Wald":
            raise LmmInputError(f"method must be 'Wald', 'profile' or 'boot', got {method!r}")
        z = scipy.special.ndtri(0.5 + level / 2)
        return pd.DataFrame(
            {lo: self.fixef - z * self.fixef_se, hi: self.fixef + z * self.fixef_se}
        )

    def refit(self, newresponse) -> LmmFit:
        """The same model fitted to a new response (lme4's ``refit``), e.g. a simulated one."""
        from dataclasses import replace

        y = np.asarray(newresponse, dtype=float)
        if y.shape != self.model.y.shape:
            raise LmmInputError(
                f"newresponse has shape {y.shape}; the model has {self.nobs} observations"
            )
        if not np.all(np.isfinite(y)):
            raise LmmInputError("newresponse has missing or infinite values")
        return self._fitter(replace(self.model, y=y), reml=self.reml, ddf=self.ddf)

    def update(self, formula: str | None = None, data=None, **options) -> LmmFit:
        """Refit with a changed formula, data or options (lme4's ``update``).

        ``formula`` may use R's ``.``: ``". ~ . - Days"`` keeps the response and
        drops ``Days``; ``". ~ . + (1 | g)"`` adds a term. ``reml=False`` refits
        by ML. Weights, offsets, ``categorical`` and ``contrasts`` carry over.
        """
        from lmmjax.design import build_model

        m = self.model
        data = m.source if data is None else data
        new = m.formula if formula is None else _update_formula(m.formula, formula)
        reml = options.pop("reml", self.reml)
        model = build_model(data, new, categorical=m.categorical, weights=m.weights_column,
                            offset=m.offset_column, contrasts=dict(m.contrasts))  # fmt: skip
        keep = reml or self.ddf != "Kenward-Roger"  # Kenward-Roger is for REML only
        options.setdefault("ddf", self.ddf if keep else "Satterthwaite")
        return self._fitter(model, reml=reml, **options)

    def simulate(self, nsim: int = 1, seed: int | None = None) -> np.ndarray:
        """Responses drawn from the fitted model (:func:`lmmjax.reml.bootstrap.simulate`)."""
        from lmmjax.reml.bootstrap import simulate

        return simulate(self, nsim, seed)

    def bootstrap(self, nsim: int = 200, seed: int | None = None) -> pd.DataFrame:
        """Parametric bootstrap replicates of every parameter, as lme4's ``bootMer``."""
        from lmmjax.reml.bootstrap import bootstrap

        return bootstrap(self, nsim, seed)

    # ------------------------------------------------------- random effects
    def _cond_var_blocks(self) -> list[np.ndarray]:
        """Each term's conditional covariance blocks (M_l, d_l, d_l), lme4's ``condVar``.

        On a small model's padded system (one program for every small model)
        when the fit has one, else on the blocked structure.
        """
        if self._small is not None:
            struct, xp, layout = self._small
            theta, beta = layout.pad(self.theta), np.zeros(xp.gram.shape[0] - 1)
            beta[: self.beta.size] = self.beta
        else:
            (struct, xp), theta, beta, layout = self._blocked(), self.theta, self.beta, None
        dtype = struct.dtype
        args = (np.asarray(theta, dtype), np.asarray(self.sigma, dtype), np.asarray(beta, dtype),
                struct, xp)  # fmt: skip
        run, _ = compiled(_condvar, *args)
        cov = run(*args)
        blocks = cov if layout is None else layout.blocks(cov[0])
        return [np.asarray(b, dtype=float) for b in blocks]

    def ranef(self, condvar: bool = True) -> dict[str, pd.DataFrame]:
        """Conditional modes of the random effects, one DataFrame per grouping factor.

        With ``condvar=True`` each frame's ``attrs["condvar"]`` holds the
        conditional covariance of each level's effects, shape (M, d, d), and
        columns ``se(<effect>)`` give the conditional standard deviations.
        """
        frames: dict[str, list] = {}
        blocks = self._cond_var_blocks() if condvar else [None] * len(self.b)
        for t, b, cv in zip(self.model.terms, self.b, blocks, strict=True):
            frame = pd.DataFrame(b, index=pd.Index(t.levels, name=t.group), columns=list(t.names))
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
        refs = [np.asarray(r) for r in terms_refs]
        z = [np.asarray(zl, dtype=float) for zl in terms_z]
        return np.asarray(z_times(refs, z, [np.asarray(b) for b in self.b], unseen=True))

    def _fixed_part(self) -> np.ndarray:
        """``offset + X beta`` on the fit's rows."""
        m = self.model
        return (0.0 if m.offset is None else m.offset) + m.X @ self.beta

    def _fitted_values(self) -> np.ndarray:
        m = self.model
        return self._fixed_part() + self._random_part([t.z for t in m.terms],
                                                      [t.refs for t in m.terms])  # fmt: skip

    def fitted(self) -> pd.Series:
        """Fitted values ``offset + X beta + Z b`` at the conditional modes.

        A Series on the input data's index, NaN on rows removed for missing values.
        """
        return self.model.aligned(self._fitted_values(), "fitted")

    def residuals(self, type: str = "response") -> pd.Series:  # noqa: A002 (lme4's name)
        """Residuals on the input data's index (NaN on removed rows), as lme4's ``residuals``.

        ``type="response"``: ``y - fitted``; ``"pearson"``: times ``sqrt(w)``
        (the same without weights), as lme4; divide by ``sigma`` for its scaled ones.
        """
        if type not in ("response", "pearson"):
            raise LmmInputError(f"type must be 'response' or 'pearson', got {type!r}")
        m = self.model
        r = m.y - self._fitted_values()
        if type == "pearson" and m.weights is not None:
            r = r * np.sqrt(m.weights)
        return m.aligned(r, "residuals")

    def predict(self, newdata: pd.DataFrame | None = None, *, allow_new_levels: bool = True,
                re_form: bool = True) -> np.ndarray:  # fmt: skip
        """Predictions for new data.

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Defaults to the rows of the fit (then equal to :meth:`fitted` on
            them; :meth:`fitted` also places NaN on rows removed for missing values).
        allow_new_levels : bool
            Levels not seen in the fit get random effect zero (the population
            prediction); when False they raise an error.
        re_form : bool
            False for population-level predictions (fixed effects only).
        """
        if newdata is None:  # the fit's rows (those without missing values)
            return self._fitted_values() if re_form else self._fixed_part()
        new = self.model.new_design(newdata, random=re_form, allow_new_levels=allow_new_levels)
        out = np.full(len(new.complete), np.nan)
        if not new.complete.any():
            return out
        pred = new.X @ self.beta + new.offset
        if re_form:
            pred = pred + self._random_part(new.z, new.refs)
        out[new.complete] = pred
        return out

    # --------------------------------------------------------------- output
    def to_dict(self) -> dict:
        """The JSON result schema shared by every method (:func:`lmmjax.output.result_dict`)."""
        table = self.coef_table()
        keys = {"Estimate": "estimate", "Std. Error": "se", "df": "df", "t value": "t",
                "Pr(>|t|)": "p"}  # fmt: skip
        coefficients = {
            name: {keys[k]: float(v) for k, v in row.items()} for name, row in table.iterrows()
        }
        return result_dict(
            self, objective=self.objective, loglik=self.loglik, aic=self.aic, bic=self.bic,
            singular=self.singular, optimizer=None if self.log is None else self.log.to_dict(),
            coefficients=coefficients, ddf=self.ddf,
        )  # fmt: skip

    def summary(self) -> str:
        """A printed summary in lme4's order."""
        from lmmjax.reml.summary import format_summary

        return format_summary(self)

    def __str__(self) -> str:
        return self.summary()


def _update_formula(old: str, change: str) -> str:
    """R's ``update.formula`` for the common cases: ``.`` stands for the old side."""
    old_lhs, _, old_rhs = old.partition("~")
    new_lhs, sep, new_rhs = change.partition("~")
    if not sep:
        raise LmmInputError(f"formula {change!r} has no '~'; write e.g. '. ~ . - x'")
    lhs = new_lhs.strip().replace(".", old_lhs.strip()) if new_lhs.strip() == "." else new_lhs
    rhs = new_rhs.strip()
    if rhs.startswith(".") and not rhs[1:2].isalnum():
        rhs = f"{old_rhs.strip()} {rhs[1:].strip()}"
    return f"{lhs.strip()} ~ {rhs.strip()}"

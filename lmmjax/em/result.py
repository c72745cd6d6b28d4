"""A model fitted by MAP (EM with empirical Bayes): estimates, random effects, summary, JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
import pandas as pd

from lmmjax.cache import compiled
from lmmjax.em.objective import EmData, Hyper, Params, lambdas_of, log_posterior
from lmmjax.linalg import conditional_moments, gls_gram, z_times
from lmmjax.options import MapOptions
from lmmjax.output import coef_table, residuals_and_groups, result_dict, varcorr_rows

__all__ = ["MapFit"]


def _at_map(params: Params, data: EmData, hyper: Hyper):
    """Conditional moments of gamma, the covariance of beta given the variances, log posterior."""
    beta, s2, covs = params
    lambdas = lambdas_of(covs, s2)
    mom = conditional_moments(data.struct, lambdas, data.xp.residual(beta), jnp.sqrt(s2), cov=True)
    _, G = gls_gram(data.struct, lambdas, data.xp)
    p = data.X.shape[1]
    lam = jnp.where(hyper.lam > 0, hyper.lam, 0.0)
    chol = jnp.linalg.cholesky(G[:p, :p] + jnp.diag(lam * data.pen))
    # the covariance itself is the output wanted here, so the identity is solved for
    vcov = s2 * jnp.linalg.solve(chol.T, jnp.linalg.solve(chol, jnp.eye(p, dtype=G.dtype)))
    return mom.mean, mom.cov, vcov, log_posterior(params, data, hyper)


@dataclass
class MapFit:
    """A linear mixed model fitted by MAP with EM; hyperparameters fixed or by empirical Bayes.

    Build with :func:`lmmjax.lmm` (``method="map"``) or :func:`lmmjax.em.fit_map`.
    ``fixef_se`` are posterior standard deviations of beta given the variance
    parameters at their MAP.
    """

    model: object
    beta: np.ndarray
    sigma2: float
    covs: list
    hyper: dict
    auto: dict
    log_posterior: float
    laplace_log_marginal: float | None
    em_iterations: int
    converged: bool
    vcov: np.ndarray
    pen: np.ndarray
    b: list = field(repr=False)
    condvar: list = field(repr=False)
    history: np.ndarray = field(repr=False)
    search: dict = field(default_factory=dict)
    seconds: float = float("nan")
    method: str = "map"

    @classmethod
    def build(cls, model, data: EmData, hyper: Hyper, trace, laplace, *, search: dict,
              options: MapOptions) -> MapFit:  # fmt: skip
        """Collect the estimates at the EM's last iterate."""
        params = trace.params
        run, _ = compiled(_at_map, params, data, hyper)
        means, covs, vcov, logpost = run(params, data, hyper)
        groups = [t.group for t in model.terms]
        n_iter = int(trace.iterations)
        hist = np.asarray(trace.history, dtype=float)[: n_iter + 1]
        return cls(
            model=model, beta=np.asarray(params.beta, dtype=float),
            sigma2=float(params.sigma2), covs=[np.asarray(c, dtype=float) for c in params.covs],
            hyper={
                "lambda": float(hyper.lam),
                "b": dict(zip(groups, map(float, hyper.b), strict=True)),
                "A": {g: np.asarray(a, dtype=float).tolist() for g, a in zip(groups, hyper.A,
                                                                               strict=True)},
            },
            auto={"lambda": options.lam == "auto", "b": options.b, "A": options.A},
            log_posterior=float(logpost), laplace_log_marginal=laplace, em_iterations=n_iter,
            converged=bool(trace.converged), vcov=np.asarray(vcov, dtype=float),
            pen=np.asarray(data.pen, dtype=float),
            b=[np.asarray(m, dtype=float) for m in means],
            condvar=[np.asarray(c, dtype=float) for c in covs], history=hist, search=search,
        )  # fmt: skip

    # ------------------------------------------------------------ estimates
    @property
    def fixef(self) -> pd.Series:
        """Fixed effects at the MAP."""
        return pd.Series(self.beta, index=list(self.model.fixef_names), name="Estimate")

    @property
    def fixef_se(self) -> pd.Series:
        """Posterior SDs of the fixed effects given the variances at their MAP."""
        return pd.Series(np.sqrt(np.diag(self.vcov)), index=list(self.model.fixef_names))

    @property
    def sigma(self) -> float:
        """Residual standard deviation at the MAP."""
        return float(np.sqrt(self.sigma2))

    @property
    def theta(self) -> np.ndarray:
        """lme4's theta: each ``chol(Sigma_l) / sigma``, lower triangle column by column."""
        out = []
        for t, S in zip(self.model.terms, self.covs, strict=True):
            rows, cols = t.theta_index()
            out.append(np.linalg.cholesky(S)[rows, cols] / self.sigma)
        return np.concatenate(out)

    @property
    def nobs(self) -> int:
        return self.model.nobs

    def covariances(self) -> list[np.ndarray]:
        """Each term's random-effect covariance ``Sigma_l`` at the MAP."""
        return list(self.covs)

    def correlations(self) -> list[np.ndarray]:
        """Each term's random-effect correlation matrix."""
        return [S / np.sqrt(np.outer(np.diag(S), np.diag(S))) for S in self.covs]

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(m))`` at the MAP."""
        return pd.DataFrame(varcorr_rows(self.model.terms, self.covs, self.sigma))

    def ranef(self, condvar: bool = True) -> dict[str, pd.DataFrame]:
        """``E[gamma | y]`` at the MAP per grouping factor; ``se(...)`` columns and
        ``attrs["condvar"]`` (M, d, d) hold the conditional covariances."""
        out: dict[str, pd.DataFrame] = {}
        for t, b, cv in zip(self.model.terms, self.b, self.condvar, strict=True):
            frame = pd.DataFrame(b, index=pd.Index(t.levels, name=t.group), columns=list(t.names))
            if condvar:
                for k, name in enumerate(t.names):
                    frame[f"se({name})"] = np.sqrt(np.clip(cv[:, k, k], 0, None))
                frame.attrs["condvar"] = cv
            out[t.group] = frame if t.group not in out else pd.concat([out[t.group], frame], axis=1)
        return out

    def fitted(self) -> np.ndarray:
        """``X beta + Z E[gamma | y]``."""
        m = self.model
        zb = z_times([t.refs for t in m.terms], [t.z for t in m.terms], self.b)
        return m.X @ self.beta + np.asarray(zb)

    def residuals(self) -> np.ndarray:
        return self.model.y - self.fitted()

    # --------------------------------------------------------------- output
    def to_dict(self) -> dict:
        """The shared JSON keys plus ``log_posterior``, ``laplace_log_marginal``,
        ``hyper``, ``em_iterations`` and the empirical-Bayes search."""
        return result_dict(
            self, objective=-2.0 * self.log_posterior, loglik=None, aic=None, bic=None,
            singular=False, log_posterior=self.log_posterior,
            laplace_log_marginal=self.laplace_log_marginal, hyper=self.hyper,
            hyper_auto=self.auto, em_iterations=self.em_iterations, search=self.search,
        )  # fmt: skip

    def _hyper_lines(self) -> list[str]:
        def tag(auto) -> str:
            return " (empirical Bayes)" if auto else " (fixed)"

        def per(value, g) -> bool:
            return (value.get(g, "auto") if isinstance(value, dict) else value) == "auto"

        lines = [f"  lambda = {self.hyper['lambda']:.4g}{tag(self.auto['lambda'])}"]
        for g, b in self.hyper["b"].items():
            a = ", ".join(f"{v:.4g}" for v in self.hyper["A"][g])
            lines.append(f"  {g}: b = {b:.4g}{tag(per(self.auto['b'], g))}, "
                         f"A = diag({a}){tag(per(self.auto['A'], g))}")  # fmt: skip
        return lines

    def summary(self) -> str:
        """A printed summary in lme4's layout, stating the priors and hyperparameters."""
        m = self.model
        pen = [n for n, w in zip(m.fixef_names, self._pen(), strict=True) if w]
        out = ["Linear mixed model fit by MAP (EM, empirical Bayes) ['lmmjax']",
               f"Formula: {m.formula}", "",
               "Priors: beta ~ N(0, sigma^2 / lambda I) on " + (", ".join(pen) or "no column")
               + " (flat on the others); Sigma_g ~ inverse-Wishart with",
               "  Sigma_g = b A + (1 - b) S / m at the update; "
               "p(sigma^2) ∝ exp(-1e-6 Var(y) / sigma^2) (flat, bounded at 0)",
               "Hyperparameters:", *self._hyper_lines(),
               f"log posterior at MAP: {self.log_posterior:.4f}   Laplace log marginal: "
               + ("n/a" if self.laplace_log_marginal is None else
                  f"{self.laplace_log_marginal:.4f}")
               + f"   EM iterations: {self.em_iterations}"]  # fmt: skip
        resid = self.residuals() / self.sigma
        out += residuals_and_groups(resid, self.varcorr, self.nobs, m.ngroups)
        out += ["", "Fixed effects:", coef_table(self.fixef, self.fixef_se)]
        if not self.converged:
            out += ["", f"EM did not converge in {self.em_iterations} iterations"]
        return "\n".join(out)

    def _pen(self) -> list[bool]:
        """Which fixed-effect columns carry the ridge prior."""
        on = self.hyper["lambda"] > 0
        return [bool(on and w > 0) for w in self.pen]

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"MapFit({self.model.formula!r}, log_posterior={self.log_posterior:.4f}, "
            f"nobs={self.nobs}, em_iterations={self.em_iterations}, converged={self.converged})"
        )

"""Posterior output: ArviZ InferenceData, summaries, JSON and netCDF.

Variables of the ``posterior`` group (``g`` a term's safe name):

* ``beta`` (chain, draw, fixef); ``sigma`` (chain, draw);
* ``sd_g`` (chain, draw, g_effect): random-effect SDs (absent when fixed);
* ``corr_g`` (chain, draw, g_pair): correlations, for terms with d > 1;
* ``r_g`` (chain, draw, g_level, g_effect): the random effects, sampled or
  recovered, with the same names and shapes whatever ``marginalize`` is.

With a formula for ``log sigma``: ``beta_sigma`` (chain, draw, fixef_sigma),
``sd_sigma_g``, ``corr_sigma_g`` and ``r_sigma_g`` as above, and ``sigma`` is
derived: ``exp`` of the mean over the rows of ``log sigma_i`` (the residual SD
of a typical row, on the modelling scale), which the VarCorr table and lme4's
theta use.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lmmjax.errors import LmmInputError
from lmmjax.memory import collector_paused
from lmmjax.output import result_dict, varcorr_rows
from lmmjax.terms import unique_group_names

if TYPE_CHECKING:
    import threading

    import arviz as az

__all__ = ["BayesFit", "NutsSummary", "build_inference_data", "import_arviz", "pointwise"]

# ArviZ announces its refactor on import (once a day); the import may run in a thread,
# where catching warnings is not safe, so this one message is filtered for good
warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor",
                        category=FutureWarning)  # fmt: skip


def _arviz():
    """The ``arviz`` module, imported on first use (with the cyclic collector held off)."""
    with collector_paused():
        import arviz

    return arviz


@contextmanager
def _diagnostics():
    """ArviZ for ESS, r_hat and summaries: its NumPy path, warnings silenced.

    With numba installed (bambi brings it), ArviZ computes them through numba,
    whose compiling made a process's first summary of nine parameters take
    0.20-0.29 s against 0.05 s. ArviZ's own setting is restored afterwards.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az = _arviz()
        numba = getattr(az, "Numba", None)
        was_on = bool(getattr(numba, "numba_flag", False))
        if was_on:
            numba.disable_numba()
        try:
            yield az
        finally:
            if was_on and numba.numba_flag is False:  # unless changed meanwhile
                numba.numba_flag = True


def import_arviz() -> threading.Thread | None:
    """Start importing ArviZ in a background thread, unless it is imported already.

    A fit starts it before compiling its sampler: the import (about 1-2 s of
    Python) then runs while XLA compiles, which releases the interpreter lock.
    A failed import is left to the first use, which raises it.
    """
    import sys
    import threading

    if "arviz" in sys.modules:
        return None

    def load():
        try:
            _arviz()
        except Exception:  # noqa: BLE001  (raised again where ArviZ is used)
            pass

    thread = threading.Thread(target=load, name="lmmjax-import-arviz", daemon=True)
    thread.start()
    return thread


HDI_PROB = 0.95


def _corr_pairs(names) -> list[tuple[int, int, str]]:
    return [
        (a, b, f"{names[a]},{names[b]}")
        for a in range(len(names))
        for b in range(a + 1, len(names))
    ]


POINTWISE_MAX = 2e7  # numbers per pointwise group (draws x N) computed by default


def _row_sigma(bm, samples: dict) -> np.ndarray:
    """Per-row residual SD draws (chains, draws, N) of a sigma formula.

    Reads the posterior variables ``beta_sigma`` and ``r_sigma_g``.
    """
    model, spec = bm.model, bm.spec
    built = model.submodels["sigma"]
    eta = np.einsum("np,cdp->cdn", built.X, samples["beta_sigma"])
    _add_effects(eta, built.terms, [samples[f"r_sigma_{n}"] for n in spec.sigma_model.names])
    return np.exp(eta)


def _add_effects(out: np.ndarray, terms, effects) -> None:
    """``out += sum_l Z_l b_l`` per draw, in place.

    ``out`` is (chains, draws, N) and each ``b_l`` (chains, draws, M_l, d_l).

    One (chains, draws, N) gather per column of each term, multiplied in
    place: for dillonE1's 4,000 draws, 0.15 s against 1.7 s for a gather of
    whole (M, d) rows.
    """
    for t, b in zip(terms, effects, strict=True):
        b = np.asarray(b)
        for k in range(t.d):
            column = np.take(b[..., k], t.refs, axis=-1)
            column *= t.z[:, k]
            out += column


def pointwise(bm, samples: dict, effects, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise log-likelihood and posterior-predictive draws, conditional on the effects.

    As brms computes them by default: for each draw, ``y_i ~ N(mu_i, sigma_i)``
    on the modelling scale with ``mu = X beta + sum_l Z_l b_l`` at that draw's
    effects (sampled, or recovered exactly for marginalised classes); the
    LogNormal likelihood adds the Jacobian ``-log y_i`` and exponentiates the
    replicates.

    Returns
    -------
    log_lik, y_rep : arrays (chains, draws, N)
    """
    model, spec = bm.model, bm.spec
    y = np.asarray(model.y, dtype=float)
    y_mod = np.log(y) if spec.likelihood == "lognormal" else y
    mu = np.asarray(samples["beta"]) @ model.X.T
    _add_effects(mu, model.terms, effects)
    if spec.sigma_model is None:
        sigma = np.asarray(samples["sigma"])[..., None]
    else:
        sigma = _row_sigma(bm, samples)
    # in place: each (chains, draws, N) temporary costs its page faults (dillonE1's 4,000
    # draws: 1.0-1.5 s with a new array per operation)
    log_lik = np.subtract(y_mod, mu)
    log_lik /= sigma
    log_lik *= log_lik
    log_lik *= -0.5
    log_lik -= np.log(sigma) + 0.5 * np.log(2.0 * np.pi)
    y_rep = np.random.default_rng(seed).standard_normal(mu.shape)
    y_rep *= sigma
    y_rep += mu
    if spec.likelihood == "lognormal":
        log_lik -= y_mod
        np.exp(y_rep, out=y_rep)
    return log_lik, y_rep


def build_inference_data(bm, draws, effects, options=None) -> az.InferenceData:
    """Assemble the InferenceData of one run.

    Parameters
    ----------
    bm : lmmjax.bayes.model.BayesModel
    draws : lmmjax.bayes.samplers.Draws
    effects : tuple of arrays (chains, draws, M_l, d_l)
        Every term's random effects.
    options : NutsOptions, optional
        ``log_likelihood`` decides the pointwise groups (``log_likelihood``,
        ``posterior_predictive``); ``seed`` seeds the replicates.

    Returns
    -------
    arviz.InferenceData
    """
    spec, model = bm.spec, bm.model
    s = draws.samples
    posterior, dims, coords = {}, {}, {}
    if spec.sigma_model is not None:
        posterior, dims, coords = _sigma_model_posterior(bm, s)
    else:
        posterior["sigma"] = s["sigma"]
    posterior["beta"] = s["beta"]
    dims["beta"] = ["fixef"]
    coords["fixef"] = list(model.fixef_names)
    if spec.shared_scale:
        posterior["sd_shared"] = s["sd_shared"]
    for k, (name, term) in enumerate(zip(spec.names, model.terms, strict=True)):
        coords[f"{name}_level"] = list(term.levels)
        coords[f"{name}_effect"] = list(term.names)
        if spec.fixed_sd[k] is None:
            posterior[f"sd_{name}"] = s[f"sd_{name}"]
            dims[f"sd_{name}"] = [f"{name}_effect"]
        if spec.correlated[k]:
            L = s[f"L_{name}"]
            R = np.einsum("...ik,...jk->...ij", L, L)
            pairs = _corr_pairs(term.names)
            posterior[f"corr_{name}"] = np.stack([R[..., a, b] for a, b, _ in pairs], axis=-1)
            dims[f"corr_{name}"] = [f"{name}_pair"]
            coords[f"{name}_pair"] = [lab for _, _, lab in pairs]
        posterior[f"r_{name}"] = np.asarray(effects[k])
        dims[f"r_{name}"] = [f"{name}_level", f"{name}_effect"]
    sample_stats = dict(draws.stats)
    y = np.asarray(model.y)
    attrs = {
        "inference_library": "lmmjax (numpyro/blackjax NUTS)",
        "formula": model.formula,
        "likelihood": spec.likelihood,
        "marginalize": ",".join(n for n, m in zip(spec.names, spec.marginal, strict=True) if m)
        or "none",
        "eigen_fast_path": int(spec.fast),
    }
    groups = {}
    want = None if options is None else options.log_likelihood
    size = y.size * np.prod(np.shape(s["beta"])[:2])
    observed = {"observed_data": {"y": y}, "coords": {**coords, "obs": np.arange(y.size)},
                "dims": {**dims, "y": ["obs"]}}  # fmt: skip
    if bm.moments is not None:  # streamed: no rows held, no pointwise groups
        observed = {"coords": coords, "dims": dims}
    elif want or (want is None and size <= POINTWISE_MAX):
        seed = 0 if options is None else options.seed
        log_lik, y_rep = pointwise(bm, {**s, **posterior}, effects, seed)
        groups = {"log_likelihood": {"y": log_lik}, "posterior_predictive": {"y": y_rep}}
    elif want is None:
        warnings.warn(
            f"pointwise log-likelihood and posterior predictive not stored: draws x N = "
            f"{size:.3g} numbers each; set nuts option log_likelihood: true to store them",
            UserWarning, stacklevel=3,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = _arviz().from_dict(
            posterior=posterior,
            sample_stats=sample_stats,
            attrs=attrs,
            **observed,
            **groups,
        )
    return idata


def _sigma_model_posterior(bm, s) -> tuple[dict, dict, dict]:
    """Posterior variables of the ``log sigma`` formula, and the derived ``sigma``."""
    sub, built = bm.spec.sigma_model, bm.model.submodels["sigma"]
    nobs = bm.model.nobs
    posterior = {"beta_sigma": s["beta_sigma"]}
    dims = {"beta_sigma": ["fixef_sigma"]}
    coords: dict = {"fixef_sigma": list(built.fixef_names)}
    mean_log = np.einsum("cdp,p->cd", s["beta_sigma"], built.X.mean(axis=0))
    for name, t, corr in zip(sub.names, built.terms, sub.correlated, strict=True):
        g = f"sigma_{name}"
        coords[f"{g}_level"], coords[f"{g}_effect"] = list(t.levels), list(t.names)
        sd = s[f"sd_{g}"]
        posterior[f"sd_{g}"], dims[f"sd_{g}"] = sd, [f"{g}_effect"]
        C = sd[..., :, None] * s[f"L_{g}"] if corr else sd[..., :, None] * np.eye(t.d)
        if corr:
            R = np.einsum("...ik,...jk->...ij", s[f"L_{g}"], s[f"L_{g}"])
            pairs = _corr_pairs(t.names)
            posterior[f"corr_{g}"] = np.stack([R[..., a, b] for a, b, _ in pairs], axis=-1)
            dims[f"corr_{g}"], coords[f"{g}_pair"] = [f"{g}_pair"], [lab for _, _, lab in pairs]
        r = np.einsum("cdmk,cdak->cdma", s[f"z_{g}"], C)
        posterior[f"r_{g}"], dims[f"r_{g}"] = r, [f"{g}_level", f"{g}_effect"]
        colsum = np.zeros((t.nlevels, t.d))
        np.add.at(colsum, t.refs, t.z)  # sum over rows of z_i at each level
        mean_log = mean_log + np.einsum("cdma,ma->cd", r, colsum) / nobs
    posterior["sigma"] = np.exp(mean_log)
    return posterior, dims, coords


class NutsSummary(pd.DataFrame):
    """ArviZ's summary table that prints in full, under a header of run diagnostics."""

    _metadata = ["header"]

    @property
    def _constructor(self):
        return pd.DataFrame  # anything derived from the table is a plain frame

    def __str__(self) -> str:
        header = getattr(self, "header", "")
        return (header + "\n\n" if header else "") + self.to_string()

    __repr__ = __str__


@dataclass
class BayesFit:
    """A Bayesian LMM fitted by NUTS.

    Attributes
    ----------
    bm : lmmjax.bayes.model.BayesModel
        The model that was sampled.
    idata : arviz.InferenceData
        Posterior (fixed effects, scales, correlations, random effects),
        ``sample_stats`` and ``observed_data``.
    options : lmmjax.options.NutsOptions
    seconds : float
        Wall time of the whole fit (compilation, warm-up, sampling, recovery, output).
    warmup_seconds, sampling_seconds, recovery_seconds : float
        Wall time of each phase without compilation.
    compile_seconds : float
        Tracing and compiling of the sampler and the recovery.
    grad_evals : dict
        ``{"warmup": n, "sampling": n}``: gradient evaluations (leapfrog steps)
        summed over chains; :meth:`seconds_per_gradient` turns them into the
        cost of one gradient of one chain.
    concurrent : int
        Gradients evaluated at once while sampling (see ``Draws.concurrent``).
    """

    bm: object
    idata: az.InferenceData
    options: object
    seconds: float = float("nan")
    warmup_seconds: float = float("nan")
    sampling_seconds: float = float("nan")
    recovery_seconds: float = float("nan")
    compile_seconds: float = float("nan")
    grad_evals: dict = field(default_factory=dict)
    concurrent: int = 1
    _table: pd.DataFrame | None = field(default=None, repr=False)

    method = "nuts"

    def __repr__(self) -> str:
        s = self.options
        return (
            f"BayesFit({self.model.formula!r}, NUTS {s.backend}, {s.num_chains} chains x "
            f"{s.num_samples} draws, nobs={self.nobs}, divergences={self.divergences})"
        )

    # ------------------------------------------------------------- helpers
    @property
    def model(self):
        """The structured model (:class:`lmmjax.design.Model`)."""
        return self.bm.model

    @property
    def posterior(self):
        """The posterior group of the InferenceData."""
        return self.idata.posterior

    def _values(self, var: str) -> np.ndarray:
        return np.asarray(self.posterior[var].values)

    def parameter_names(self) -> list[str]:
        """Posterior variables other than the random effects."""
        return [v for v in self.posterior.data_vars if not str(v).startswith("r_")]

    @property
    def nobs(self) -> int:
        """Number of observations."""
        return self.model.nobs

    def summary(self) -> str:
        """A printed summary: model, sampler, diagnostics and the posterior table."""
        return str(self.posterior_summary())

    def posterior_summary(self, var_names=None, ranef: bool = False) -> NutsSummary:
        """ArviZ summary: mean, sd, 95% HDI, MCSE, ess_bulk, ess_tail and r_hat.

        Parameters
        ----------
        var_names : list of str, optional
            Variables to summarise; by default every parameter (and the random
            effects too when ``ranef`` is True).
        ranef : bool
            Include the random effects ``r_*``.

        Returns
        -------
        NutsSummary
            A DataFrame, one row per scalar quantity; printing it shows the
            run's diagnostics above the table.
        """
        if var_names is None and not ranef and self._table is not None:
            self._table.header = self._header(self._table)
            return self._table
        default = var_names is None and not ranef
        if var_names is None:
            var_names = list(self.posterior.data_vars) if ranef else self.parameter_names()
        with _diagnostics() as az:
            table = NutsSummary(az.summary(self.idata, var_names=var_names, hdi_prob=HDI_PROB))
        if default:
            self._table = table
        table.header = self._header(table)
        return table

    # ----------------------------------------------------------- estimates
    @property
    def fixef(self) -> pd.Series:
        """Posterior means of the fixed effects."""
        m = self._values("beta").mean(axis=(0, 1))
        return pd.Series(m, index=list(self.model.fixef_names), name="mean")

    @property
    def fixef_se(self) -> pd.Series:
        """Posterior standard deviations of the fixed effects."""
        sd = self._values("beta").std(axis=(0, 1), ddof=1)
        return pd.Series(sd, index=list(self.model.fixef_names), name="sd")

    @property
    def beta(self) -> np.ndarray:
        """Posterior means of the fixed effects, as an array (``LmmFit.beta``)."""
        return self.fixef.to_numpy()

    @property
    def b(self) -> list[np.ndarray]:
        """Posterior means (M_l, d_l) of every term's random effects (``LmmFit.b``)."""
        return [self._values(f"r_{name}").mean(axis=(0, 1)) for name in self.bm.spec.names]

    @property
    def sigma(self) -> float:
        """Posterior mean of the residual SD (on the modelling scale)."""
        return float(self._values("sigma").mean())

    def sd_draws(self, k: int) -> np.ndarray:
        """Draws (chain, draw, d) of term k's random-effect SDs (constant if fixed)."""
        spec = self.bm.spec
        name = spec.names[k]
        if spec.fixed_sd[k] is None:
            return self._values(f"sd_{name}")
        base = np.asarray(spec.fixed_sd[k])
        if spec.shared_scale:
            return self._values("sd_shared")[..., None] * base
        shape = self._values("sigma").shape
        return np.broadcast_to(base, (*shape, base.size))

    def corr_draws(self, k: int) -> np.ndarray:
        """Draws (chain, draw, d, d) of term k's correlation matrix."""
        spec = self.bm.spec
        d = spec.d[k]
        shape = self._values("sigma").shape
        R = np.broadcast_to(np.eye(d), (*shape, d, d)).copy()
        if spec.correlated[k]:
            pairs = _corr_pairs(self.model.terms[k].names)
            vals = self._values(f"corr_{spec.names[k]}")
            for j, (a, b, _) in enumerate(pairs):
                R[..., a, b] = R[..., b, a] = vals[..., j]
        return R

    def ranef(self) -> dict[str, pd.DataFrame]:
        """Posterior means of the random effects, one frame per term."""
        out = {}
        for name, tname, t in zip(self.bm.spec.names, self.bm.term_names, self.model.terms,
                                  strict=True):  # fmt: skip
            m = self._values(f"r_{name}").mean(axis=(0, 1))
            out[tname] = pd.DataFrame(m, index=pd.Index(t.levels, name=t.group),
                                      columns=list(t.names))  # fmt: skip
        return out

    # ----------------------------------------------------------- prediction
    def linpred_draws(self, newdata=None, *, re: str = "all", allow_new_levels: bool = True,
                      ndraws: int | None = None, seed: int = 0):  # fmt: skip
        """Posterior draws of the linear predictor ``X beta + Z b`` (modelling scale).

        Levels the fit never saw get effects drawn from their term's
        random-effect distribution at each draw, as brms's
        ``sample_new_levels = "gaussian"``.

        Returns
        -------
        mu : array (draws, n_complete)
        complete : bool array (n_rows,)
            Rows of ``newdata`` with every needed column (the others predict NaN).
        index : int array (draws,)
            Which posterior draws (flattened over chains) were used.
        """
        if re not in ("all", "none"):
            raise LmmInputError(f"re must be 'all' or 'none', got {re!r}")
        if newdata is not None and self.bm.spec.sigma_model is not None:
            raise LmmInputError("predictions for newdata with a sigma formula are not built yet")
        m = self.model
        beta = self._values("beta").reshape(-1, m.p)
        total = beta.shape[0]
        index = np.arange(total)
        if ndraws is not None:
            if not isinstance(ndraws, int) or ndraws < 1:
                raise LmmInputError(f"ndraws must be a positive integer, got {ndraws!r}")
            index = np.linspace(0, total - 1, min(ndraws, total)).round().astype(int)
        beta = beta[index]
        if newdata is None:
            if self.bm.moments is not None:
                raise LmmInputError(
                    "the rows of streamed data are not held: lmmjax.stream.write_fitted "
                    "writes their fitted values (posterior means) to Parquet in batches"
                )
            complete = np.ones(m.nobs, dtype=bool)
            X, refs, zs = m.X, [t.refs for t in m.terms], [t.z for t in m.terms]
            labels = [None] * len(m.terms)
        else:
            new = m.new_design(newdata, random=re == "all", allow_new_levels=allow_new_levels)
            complete, X, refs, zs, labels = (new.complete, new.X, new.refs, new.z,
                                             new.new_labels)  # fmt: skip
        mu = beta @ X.T
        if re == "none" or len(X) == 0:
            return mu, complete, index
        rng = np.random.default_rng(seed)
        for k, (name, r, z, lab) in enumerate(zip(self.bm.spec.names, refs, zs, labels,
                                                  strict=True)):  # fmt: skip
            b = self._values(f"r_{name}").reshape(total, *self._values(f"r_{name}").shape[2:])
            b = b[index]
            unseen = r < 0
            eff = b[:, np.where(unseen, 0, r), :]  # (draws, n, d)
            if unseen.any():
                new_levels, which = np.unique(lab[unseen], return_inverse=True)
                cov = self.covariance_draws(k).reshape(total, z.shape[1], z.shape[1])[index]
                chol = np.linalg.cholesky(cov + 1e-12 * np.eye(z.shape[1]))
                e = rng.standard_normal((len(index), len(new_levels), z.shape[1]))
                drawn = np.einsum("sab,slb->sla", chol, e)
                eff[:, unseen, :] = drawn[:, which, :]
            mu = mu + np.sum(z[None] * eff, axis=-1)
        return mu, complete, index

    def _summarise(self, draws, complete, summary: bool):
        if not summary:
            out = np.full((draws.shape[0], len(complete)), np.nan)
            out[:, complete] = draws
            return out
        lo, hi = np.quantile(draws, [0.025, 0.975], axis=0) if draws.size else (draws, draws)
        table = pd.DataFrame(np.nan, index=range(len(complete)),
                             columns=["Estimate", "Est.Error", "Q2.5", "Q97.5"])  # fmt: skip
        table.loc[complete, "Estimate"] = draws.mean(axis=0)
        table.loc[complete, "Est.Error"] = draws.std(axis=0, ddof=1) if len(draws) > 1 else 0.0
        table.loc[complete, "Q2.5"], table.loc[complete, "Q97.5"] = lo, hi
        return table

    def fitted(self, newdata=None, *, re: str = "all", allow_new_levels: bool = True,
               ndraws: int | None = None, summary: bool = True, seed: int = 0):  # fmt: skip
        """Posterior of the expected response ``E[y | draw]`` (brms's ``fitted``).

        ``mu`` for the Normal likelihood, ``exp(mu + sigma^2 / 2)`` for the
        LogNormal. With ``summary`` a frame of Estimate, Est.Error, Q2.5 and
        Q97.5 per row (as brms); otherwise the draws (draws, rows).
        """
        mu, complete, index = self.linpred_draws(newdata, re=re, ndraws=ndraws, seed=seed,
                                                 allow_new_levels=allow_new_levels)  # fmt: skip
        if self.bm.spec.likelihood == "lognormal":
            mu = np.exp(mu + 0.5 * self._residual_sd(index, mu.shape) ** 2)
        return self._summarise(mu, complete, summary)

    def predict(self, newdata=None, *, re: str = "all", allow_new_levels: bool = True,
                ndraws: int | None = None, summary: bool = True, seed: int = 0):  # fmt: skip
        """Posterior predictive draws of new observations (brms's ``predict``).

        The linear predictor's draws (:meth:`linpred_draws`, new levels drawn
        from their distribution) plus residual noise at each draw's sigma.
        """
        mu, complete, index = self.linpred_draws(newdata, re=re, ndraws=ndraws, seed=seed,
                                                 allow_new_levels=allow_new_levels)  # fmt: skip
        rng = np.random.default_rng(seed + 1)
        y = mu + self._residual_sd(index, mu.shape) * rng.standard_normal(mu.shape)
        if self.bm.spec.likelihood == "lognormal":
            y = np.exp(y)
        return self._summarise(y, complete, summary)

    def residuals(self) -> np.ndarray:
        """Observed response minus the posterior mean of the expected response."""
        return self.model.y - self.fitted()["Estimate"].to_numpy()

    def _residual_sd(self, index, shape) -> np.ndarray:
        if self.bm.spec.sigma_model is None:
            return np.broadcast_to(self._values("sigma").reshape(-1)[index][:, None], shape)
        samples = {k: np.asarray(v.values) for k, v in self.posterior.items()}
        return _row_sigma(self.bm, samples).reshape(-1, self.model.nobs)[index]

    def covariance_draws(self, k: int) -> np.ndarray:
        """Draws (chain, draw, d, d) of term k's covariance matrix."""
        sd = self.sd_draws(k)
        return sd[..., :, None] * self.corr_draws(k) * sd[..., None, :]

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's VarCorr table with posterior means (variance, sd, cov, corr)."""
        covs = [self.covariance_draws(k) for k in range(len(self.model.terms))]
        return pd.DataFrame(varcorr_rows(self.model.terms, covs, self._values("sigma")))

    @property
    def theta(self) -> np.ndarray:
        """Posterior mean of lme4's theta (lower triangles of ``chol(Sigma_l) / sigma``)."""
        sig = self._values("sigma")
        out = []
        for k, t in enumerate(self.model.terms):
            C = self.sd_draws(k)[..., :, None] * np.linalg.cholesky(self.corr_draws(k))
            lam = C / sig[..., None, None]
            rows, cols = t.theta_index()
            out.append(lam[..., rows, cols].mean(axis=(0, 1)))
        return np.concatenate(out)

    @property
    def divergences(self) -> int:
        """Number of divergent transitions after warm-up."""
        return int(np.asarray(self.idata.sample_stats["diverging"]).sum())

    def max_rhat(self) -> float:
        """Largest split-R-hat over the parameters (random effects excluded)."""
        r = self.posterior_summary()["r_hat"].to_numpy(dtype=float)
        r = r[np.isfinite(r)]  # NaN with a single chain
        return float(r.max()) if r.size else float("nan")

    @property
    def converged(self) -> bool:
        """Every r_hat <= 1.01 and no divergent transition."""
        return bool(self.max_rhat() <= 1.01 and self.divergences == 0)

    def posterior_table(self) -> dict[str, dict]:
        """Per quantity {mean, sd, hdi_low, hdi_high, ess_bulk, r_hat} (JSON's ``posterior``)."""
        names = self.parameter_names()  # not the effects: unused here
        with _diagnostics() as az:
            ess = az.ess(self.idata, var_names=names, method="bulk")
            rhat = az.rhat(self.idata, var_names=names)
        out: dict[str, dict] = {}

        def add(label, draws, ess_v, rhat_v):
            draws = np.asarray(draws, dtype=float)
            lo, hi = az.hdi(draws.reshape(-1), hdi_prob=HDI_PROB)
            out[label] = dict(mean=float(draws.mean()), sd=float(draws.std(ddof=1)),
                              hdi_low=float(lo), hdi_high=float(hi), ess_bulk=ess_v,
                              r_hat=rhat_v)  # fmt: skip

        def num(x):
            x = float(x)
            return x if np.isfinite(x) else None

        beta = self._values("beta")
        for j, n in enumerate(self.model.fixef_names):
            add(f"fixef[{n}]", beta[..., j], num(ess["beta"].values[j]),
                num(rhat["beta"].values[j]))  # fmt: skip
        add("sigma", self._values("sigma"), num(ess["sigma"].values), num(rhat["sigma"].values))
        spec = self.bm.spec
        if spec.sigma_model is not None:
            self._sigma_model_rows(add, num, ess, rhat)
        for k, (name, gname, t) in enumerate(
            zip(spec.names, self.bm.term_names, self.model.terms, strict=True)
        ):
            sd = self.sd_draws(k)
            for a in range(t.d):
                if spec.fixed_sd[k] is None:
                    e, r = ess[f"sd_{name}"].values[a], rhat[f"sd_{name}"].values[a]
                elif spec.shared_scale:
                    e, r = ess["sd_shared"].values, rhat["sd_shared"].values
                else:
                    e = r = float("nan")
                add(f"sd[{gname}, {t.names[a]}]", sd[..., a], num(e), num(r))
            if spec.correlated[k]:
                for j, (a, b, _) in enumerate(_corr_pairs(t.names)):
                    add(f"corr[{gname}, {t.names[a]}, {t.names[b]}]",
                        self._values(f"corr_{name}")[..., j],
                        num(ess[f"corr_{name}"].values[j]),
                        num(rhat[f"corr_{name}"].values[j]))  # fmt: skip
        return out

    def _sigma_model_rows(self, add, num, ess, rhat) -> None:
        """Posterior-table rows of the ``log sigma`` formula: coefficients, SDs, correlations."""
        sub, built = self.bm.spec.sigma_model, self.model.submodels["sigma"]
        beta = self._values("beta_sigma")
        for j, n in enumerate(built.fixef_names):
            add(f"fixef_sigma[{n}]", beta[..., j], num(ess["beta_sigma"].values[j]),
                num(rhat["beta_sigma"].values[j]))  # fmt: skip
        labels = unique_group_names(built.terms)
        for name, label, t, corr in zip(sub.names, labels, built.terms, sub.correlated,
                                        strict=True):  # fmt: skip
            g = f"sigma_{name}"
            for a in range(t.d):
                add(f"sd_sigma[{label}, {t.names[a]}]", self._values(f"sd_{g}")[..., a],
                    num(ess[f"sd_{g}"].values[a]), num(rhat[f"sd_{g}"].values[a]))  # fmt: skip
            if corr:
                for j, (a, b, _) in enumerate(_corr_pairs(t.names)):
                    add(f"corr_sigma[{label}, {t.names[a]}, {t.names[b]}]",
                        self._values(f"corr_{g}")[..., j], num(ess[f"corr_{g}"].values[j]),
                        num(rhat[f"corr_{g}"].values[j]))  # fmt: skip

    # --------------------------------------------------------------- output
    def to_dict(self) -> dict:
        """The JSON result: the shared keys with posterior means, plus ``posterior``."""
        spec = self.bm.spec
        nuts = self.options.model_dump()
        fixed = {g: list(f) for g, f in zip(self.bm.term_names, spec.fixed_sd, strict=True) if f}
        nuts.update(  # the model's options as the model was built (bm may come from elsewhere)
            likelihood=spec.likelihood, fixed_scales=fixed, shared_scale=spec.shared_scale,
            fast_path=spec.fast,
            marginalize=[g for g, m in zip(self.bm.term_names, spec.marginal, strict=True) if m],
            marginalize_auto=None if self.bm.auto is None else self.bm.auto.to_dict(
                self.bm.term_names),
            eigen_fast_path=spec.fast, warmup_seconds=self.warmup_seconds,
            sampling_seconds=self.sampling_seconds, recovery_seconds=self.recovery_seconds,
            compile_seconds=self.compile_seconds, grad_evals=self.grad_evals,
            seconds_per_gradient=self.seconds_per_gradient(), gradients_at_once=self.concurrent,
            priors=self._priors(),
        )  # fmt: skip
        return result_dict(
            self, posterior=self.posterior_table(), divergences=self.divergences,
            max_r_hat=self.max_rhat(), nuts=nuts,
        )  # fmt: skip

    def prior_summary(self) -> pd.DataFrame:
        """The priors in force, defaults included, one row per parameter (as brms prints them)."""
        rows = []
        effect_names = {
            f"sd_{g}": list(t.names)
            for g, t in zip(self.bm.term_names, self.model.terms, strict=True)
        }
        if self.bm.spec.sigma_model is not None:
            built = self.model.submodels["sigma"]
            effect_names.update({f"sigma.sd_{g}": list(t.names) for g, t in zip(
                unique_group_names(built.terms), built.terms, strict=True)})  # fmt: skip
        for key, prior in self._priors().items():
            names = prior.get("names") or effect_names.get(key)
            n = len(names) if names else max(
                (len(v) for v in prior.values() if isinstance(v, list)), default=1
            )  # fmt: skip
            for i in range(n):
                args = {k: v[i] if isinstance(v, list) and len(v) == n else v
                        for k, v in prior.items() if k != "names"}  # fmt: skip
                family = args.pop("dist")  # a mixed prior names each element's family
                text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in args.items() if v is not None)  # fmt: skip
                label = f"{key}[{names[i]}]" if names else (key if n == 1 else f"{key}[{i}]")
                rows.append({"parameter": label, "prior": f"{family}({text})"})
        return pd.DataFrame(rows).set_index("parameter")

    def _priors(self) -> dict:
        """Every prior by parameter name (the sigma formula's with a ``sigma.`` prefix)."""
        spec = self.bm.spec
        out = spec.priors.to_dict(self.model.fixef_names, self.bm.term_names)
        if spec.sigma_model is not None:
            del out["sigma"]
            built = self.model.submodels["sigma"]
            names = unique_group_names(built.terms)
            sub = spec.sigma_model.priors.to_dict(built.fixef_names, names)
            out.update({f"sigma.{k}": v for k, v in sub.items() if k != "sigma"})
        return out

    def to_netcdf(self, path) -> str:
        """Write the InferenceData to a netCDF file; returns the path."""
        from pathlib import Path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.idata.to_netcdf(str(path))
        return str(path)

    def _header(self, table) -> str:
        """Model, sampler options, timings and diagnostics, above the summary table."""
        s, spec = self.options, self.bm.spec
        r = table["r_hat"].to_numpy(dtype=float)
        r = r[np.isfinite(r)]
        max_rhat = f"{r.max():.3f}" if r.size else "n/a (one chain)"
        phases = (
            f"compile {self.compile_seconds:.1f} s, warm-up {self.warmup_seconds:.1f} s, "
            f"sampling {self.sampling_seconds:.1f} s, "
        )
        marg = [g for g, m in zip(self.bm.term_names, spec.marginal, strict=True) if m]
        lines = [
            f"Bayesian linear mixed model (NUTS, {s.backend}): {self.model.formula}",
            f"  likelihood {spec.likelihood}; N = {self.model.nobs}; "
            f"marginalised: {', '.join(marg) or 'none'}{self._auto_note()}"
            + ("; eigendecomposition fast path" if spec.fast else "")
            + (f"; sigma {self.model.submodels['sigma'].formula}" if spec.sigma_model else ""),
            f"  {s.num_chains} chains x {s.num_samples} draws after {s.num_warmup} warm-up; "
            f"{self.seconds:.1f} s ({phases}recovery {self.recovery_seconds:.1f} s)",
            f"  divergences: {self.divergences}; max r_hat: {max_rhat}; {self._per_gradient()}",
        ]
        return "\n".join(lines)

    def _auto_note(self) -> str:
        """`` (auto: ...)`` when ``marginalize: auto`` chose: the funnel depths behind it."""
        auto = self.bm.auto
        if auto is None:
            return ""
        depths = ", ".join(f"{g} {d:.3g}" for g, d in zip(self.bm.term_names, auto.depths,
                                                            strict=True))  # fmt: skip
        return f" (marginalize auto; funnel depth {depths})"

    def seconds_per_gradient(self) -> float:
        """Sampling seconds per gradient of one chain, as the gradients ran.

        Wall seconds per gradient times :attr:`concurrent`, the gradients
        evaluated at once (a vectorised step's chains, or the chains run side
        by side on threads).
        """
        n = self.grad_evals.get("sampling", 0)
        return self.sampling_seconds * self.concurrent / n if n else float("nan")

    def _per_gradient(self) -> str:
        n = self.grad_evals.get("sampling", 0)
        if not n:
            return "no gradient count"
        return (f"{n + self.grad_evals.get('warmup', 0)} gradient evaluations, "
                f"{1e3 * self.seconds_per_gradient():.3g} ms each while sampling")  # fmt: skip

    def __str__(self) -> str:
        return self.summary()

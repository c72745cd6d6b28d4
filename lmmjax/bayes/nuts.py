"""``fit_nuts``: build, sample, recover and summarise a Bayesian LMM in one call."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from lmmjax.bayes.model import BayesModel, build_bayes_model
from lmmjax.bayes.output import BayesFit, build_inference_data
from lmmjax.bayes.recovery import recover_effects
from lmmjax.bayes.samplers import SamplerSettings, run_sampler

__all__ = ["NutsWarning", "fit_nuts", "sample_model"]


class NutsWarning(RuntimeWarning):
    """Sampler diagnostics that call the posterior into question."""


def _loud(message: str) -> None:
    """Warn, and print the same line to stderr so that it is seen in CLI runs."""
    print(f"lmmjax: WARNING: {message}", file=sys.stderr)
    warnings.warn(message, NutsWarning, stacklevel=3)


def check_diagnostics(fit: BayesFit) -> None:
    """Report divergences and r_hat > 1.01 loudly."""
    n_div = fit.divergences
    if n_div:
        total = fit.settings.num_chains * fit.settings.num_samples
        _loud(
            f"{n_div} of {total} post-warm-up transitions diverged: the posterior may be "
            "biased; raise target_accept, or change marginalize / the priors"
        )
    table = fit.summary()
    rhat = table["r_hat"].astype(float)
    bad = rhat[rhat > 1.01]
    if len(bad):
        worst = ", ".join(f"{k} ({v:.3f})" for k, v in bad.sort_values()[::-1][:5].items())
        _loud(
            f"r_hat > 1.01 for {len(bad)} parameter(s): {worst}; the chains have not "
            "mixed, run longer chains"
        )


def sample_model(bm: BayesModel, settings: SamplerSettings) -> BayesFit:
    """Sample a built Bayesian model and recover its marginalised effects.

    Parameters
    ----------
    bm : BayesModel
    settings : SamplerSettings

    Returns
    -------
    BayesFit
    """
    start = time.perf_counter()
    draws = run_sampler(bm, settings)
    t0 = time.perf_counter()
    chains, ndraw = draws.samples["beta"].shape[:2]
    flat = {k: v.reshape(chains * ndraw, *v.shape[2:]) for k, v in draws.samples.items()}
    effects = recover_effects(flat, bm.data, bm.spec, draws.keys["recovery"])
    effects = tuple(np.asarray(e).reshape(chains, ndraw, *e.shape[1:]) for e in effects)
    rec = time.perf_counter() - t0
    idata = build_inference_data(bm, draws, effects)
    fit = BayesFit(
        bm=bm, idata=idata, settings=settings, warmup_seconds=draws.warmup_seconds,
        sampling_seconds=draws.sampling_seconds, recovery_seconds=rec,
    )  # fmt: skip
    fit.summary()
    fit.seconds = time.perf_counter() - start
    check_diagnostics(fit)
    return fit


def fit_nuts(
    model,
    *,
    marginalize: str | Sequence[str] = "all",
    backend: str = "numpyro",
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    seed: int = 0,
    likelihood: str = "normal",
    priors: Mapping | None = None,
    fixed_scales: Mapping | None = None,
    shared_scale: bool = False,
    fast_path: bool | None = None,
    progress_bar: bool = True,
) -> BayesFit:
    """Fit a Bayesian linear mixed model by NUTS.

    Parameters
    ----------
    model : lmmjax.design.Model
        From :func:`lmmjax.design.build_model`.
    marginalize : "none", "all" or sequence of str
        Grouping factors integrated out of the potential (their effects are
        recovered exactly afterwards).
    backend : {"numpyro", "blackjax"}
    num_warmup, num_samples, num_chains : int
    target_accept : float
    max_tree_depth : int
    dense_mass : bool
    seed : int
    likelihood : {"normal", "lognormal"}
    priors : mapping, optional
        Per-parameter prior overrides (see :mod:`lmmjax.bayes.priors`).
    fixed_scales : mapping of str to float, optional
        Random-effect SDs held constant, by grouping factor.
    shared_scale : bool
        One sampled scale multiplies every random-effect SD (uncorrelated terms).
    fast_path : bool, optional
        Force (True) or forbid (False) the eigendecomposition fast path.
    progress_bar : bool

    Returns
    -------
    BayesFit
    """
    bm = build_bayes_model(
        model, marginalize=marginalize, likelihood=likelihood, priors=priors,
        fixed_scales=fixed_scales, shared_scale=shared_scale, fast_path=fast_path,
    )  # fmt: skip
    settings = SamplerSettings(
        backend=backend, num_warmup=num_warmup, num_samples=num_samples,
        num_chains=num_chains, target_accept=target_accept, max_tree_depth=max_tree_depth,
        dense_mass=dense_mass, seed=seed, progress_bar=progress_bar,
    )  # fmt: skip
    return sample_model(bm, settings)


def fit_from_config(model, cfg) -> BayesFit:
    """The ``method: nuts`` fitter of the CLI: options from the ``nuts:`` section.

    Writes the netCDF file named by ``nuts.netcdf`` (relative to the current
    directory) when one is given.
    """
    opts = cfg.nuts
    extra = {k: getattr(opts, k) for k in ("shared_scale", "fast_path") if hasattr(opts, k)}
    fit = fit_nuts(
        model, marginalize=opts.marginalize, backend=opts.backend, num_warmup=opts.num_warmup,
        num_samples=opts.num_samples, num_chains=opts.num_chains,
        target_accept=opts.target_accept, max_tree_depth=opts.max_tree_depth,
        dense_mass=opts.dense_mass, seed=opts.seed, likelihood=opts.likelihood,
        priors=opts.priors, fixed_scales=opts.fixed_scales,
        progress_bar=opts.progress_bar, **extra,
    )  # fmt: skip
    if opts.netcdf:
        written = fit.to_netcdf(opts.netcdf)
        print(f"posterior written to {written}")
    return fit

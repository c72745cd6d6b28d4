"""``fit_nuts``: build, sample, recover and summarise a Bayesian LMM in one call."""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np

from lmmjax.bayes.model import BayesModel, build_bayes_model, run_overhead
from lmmjax.bayes.recovery import recover_effects
from lmmjax.bayes.result import BayesFit, build_inference_data, import_arviz
from lmmjax.bayes.samplers import QUICK_SECONDS, predicted_seconds, run_sampler
from lmmjax.cache import compile_seconds
from lmmjax.errors import LmmInputError
from lmmjax.options import NutsOptions, takes_options

__all__ = ["NutsWarning", "fit_nuts", "sample_model"]


class NutsWarning(RuntimeWarning):
    """Sampler diagnostics that call the posterior into question."""


def _loud(message: str) -> None:
    """Warn once (the CLI prints warnings as one ``lmmjax: warning:`` line)."""
    warnings.warn(message, NutsWarning, stacklevel=3)


def check_diagnostics(fit: BayesFit) -> None:
    """Report divergences and r_hat > 1.01 loudly."""
    n_div = fit.divergences
    if n_div:
        total = fit.options.num_chains * fit.options.num_samples
        _loud(
            f"{n_div} of {total} post-warm-up transitions diverged: the posterior may be "
            "biased; raise target_accept, or change marginalize / the priors"
        )
    table = fit.posterior_summary()
    rhat = table["r_hat"].astype(float)
    bad = rhat[rhat > 1.01]
    if len(bad):
        worst = ", ".join(f"{k} ({v:.3f})" for k, v in bad.sort_values()[::-1][:5].items())
        _loud(
            f"r_hat > 1.01 for {len(bad)} parameter(s): {worst}; the chains have not "
            "mixed, run longer chains"
        )


# Predicted seconds of the recovery's draws below which, on a CPU, they run one at a time:
# dillonE1's 4,000 (0.7 s predicted) compiled in 1.11-1.16 s and ran in 0.50-0.56 s that way,
# against 1.48-1.71 and 0.35-0.40 s in vectorised batches of 256, but a crossed model whose
# draws ran in 2.5 s batched took 3.3 s one at a time
LOOP_SECONDS = 1.0


def sample_model(bm: BayesModel, options: NutsOptions) -> BayesFit:
    """Sample a built Bayesian model and recover its marginalised effects.

    Parameters
    ----------
    bm : BayesModel
    options : NutsOptions
        Only the sampler's options are read; the model options are ``bm``'s.

    Returns
    -------
    BayesFit
    """
    start = time.perf_counter()
    import_arviz()  # in the background, while the sampler compiles
    draws = run_sampler(bm, options)
    compile0 = compile_seconds()
    t0 = time.perf_counter()
    chains, ndraw = draws.samples["beta"].shape[:2]
    flat = {k: v.reshape(chains * ndraw, *v.shape[2:]) for k, v in draws.samples.items()}
    # a draw costs about a third of a gradient (no reverse pass), but compiled quickly it
    # runs 2-7 times slower: counted as one gradient. dillonE1's 4,000 draws compiled in
    # 0.7-0.8 s quickly and ran in 2.6 s, against 2.1 and 0.34-0.40 s; sleepstudy's,
    # Orthodont's and dutch's still compile quickly (0.6-0.7 s against 1.0-1.5 s, run
    # 0.04-0.10 s against 0.01-0.02)
    predicted = predicted_seconds(bm, chains * ndraw)
    quick = predicted < QUICK_SECONDS
    # on a CPU, one draw at a time where that is predicted short (see LOOP_SECONDS)
    loop = jax.default_backend() == "cpu" and predicted < LOOP_SECONDS
    effects = recover_effects(flat, bm.data, bm.spec, draws.keys["recovery"], quick=quick,
                              batch_size=1 if loop else None)  # fmt: skip
    effects = tuple(np.asarray(e).reshape(chains, ndraw, *e.shape[1:]) for e in effects)
    rec_compile = compile_seconds() - compile0
    rec = time.perf_counter() - t0 - rec_compile
    idata = build_inference_data(bm, draws, effects, options)
    fit = BayesFit(
        bm=bm, idata=idata, options=options, warmup_seconds=draws.warmup_seconds,
        sampling_seconds=draws.sampling_seconds, recovery_seconds=rec,
        compile_seconds=draws.compile_seconds + rec_compile, grad_evals=dict(draws.grad_evals),
        concurrent=draws.concurrent,
    )  # fmt: skip
    fit.posterior_summary()
    fit.seconds = time.perf_counter() - start
    check_diagnostics(fit)
    return fit


def _as_model(model):
    """The structured model of ``model``, which may also be a fit of one (``fit.model``)."""
    if isinstance(model, str):
        raise LmmInputError(
            "fit_nuts takes a model from lmmjax.build_model (or a fit), not a formula; "
            "to fit from a formula use lmmjax.lmm(formula, data, method='nuts')"
        )
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "terms"):
        model = inner
    if not hasattr(model, "terms"):
        raise LmmInputError(
            f"fit_nuts takes a model from lmmjax.build_model (or a fit), got {type(model).__name__}"
        )
    return model


@takes_options(NutsOptions)
def fit_nuts(model, options: NutsOptions | None = None, **kwargs) -> BayesFit:
    """Fit a Bayesian linear mixed model by NUTS.

    Parameters
    ----------
    model : lmmjax.design.Model
        From :func:`lmmjax.design.build_model`, or any fit of one (its ``model``);
        or a :class:`lmmjax.stream.StreamedModel`, sampled from its sufficient
        statistics with every class marginalised (``marginalize`` "all"; "auto"
        means "all" there).
    options : NutsOptions or mapping, optional
        Sampler and model options; keywords override them. The main ones:
        ``marginalize`` ("auto", the default, chooses by the rule of
        :mod:`lmmjax.bayes.auto`; "none", "all" or grouping factors integrated out
        of the potential, their effects recovered exactly afterwards), ``backend``
        ("numpyro" or "blackjax"), ``num_warmup``, ``num_samples``,
        ``num_chains``, ``target_accept``, ``seed``, ``likelihood``, ``priors``
        and ``fixed_scales``; see :class:`~lmmjax.options.NutsOptions`.

    Returns
    -------
    BayesFit
        With the posterior; also written to ``netcdf`` when that option is set.
    """
    opts = NutsOptions.from_call(options, kwargs)
    model = _as_model(model)
    bm = build_bayes_model(
        model, marginalize=opts.marginalize, likelihood=opts.likelihood, priors=opts.priors,
        fixed_scales=opts.fixed_scales, shared_scale=opts.shared_scale, fast_path=opts.fast_path,
        sigma=opts.sigma, center=opts.center, overhead=run_overhead(opts),
    )  # fmt: skip
    if bm.moments is not None:  # streamed: before sampling, what needs the rows
        opts.check_streamed([t.group for t in model.terms])
    fit = sample_model(bm, opts)
    if opts.netcdf:
        written = fit.to_netcdf(opts.netcdf)
        print(f"posterior written to {written}")
    return fit

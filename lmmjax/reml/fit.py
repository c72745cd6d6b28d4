"""``fit_reml``: profiled REML / ML fits of a structured model, and likelihood-ratio tests."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import scipy.special

from lmmjax.errors import LmmInputError, LmmWarning
from lmmjax.options import RemlOptions, takes_options
from lmmjax.reml.objective import blocked_problem, small_problem
from lmmjax.reml.optimize import QUICK_MAX_Q, optimize_theta
from lmmjax.reml.result import LmmFit
from lmmjax.reml.start import moment_start, start_scale

__all__ = ["check_identifiable", "compare", "fit_reml"]


def check_identifiable(model) -> None:
    """lme4's checks that each term can be told apart from the residual.

    Raises
    ------
    LmmInputError
        When a grouping factor has as many levels as there are observations, or
        a term has at least as many random effects as observations.
    """
    for t in model.terms:
        if t.nlevels >= model.nobs:
            raise LmmInputError(
                f"grouping factor {t.group!r} has {t.nlevels} levels for {model.nobs} "
                "observations; the number of levels must be smaller than the number of "
                "observations (the variance is not identifiable from the residual)"
            )
        if t.q >= model.nobs and t.d > 1:
            raise LmmInputError(
                f"term ({' + '.join(t.names)} | {t.group}) has {t.q} random effects for "
                f"{model.nobs} observations; its parameters and the residual variance "
                "are probably unidentifiable"
            )


@takes_options(RemlOptions, extra={"reml": True})
def fit_reml(model, options: RemlOptions | None = None, *, reml: bool = True, **kwargs) -> LmmFit:
    """Fit a linear mixed model by REML (default) or maximum likelihood.

    Parameters
    ----------
    model : lmmjax.design.Model
        The structured model.
    options : RemlOptions or mapping, optional
        Optimiser options; keywords (``maxiter``, ``gtol``, ``fallback``,
        ``snap_tol``) override them.
    reml : bool
        REML (default) or maximum likelihood.

    Returns
    -------
    LmmFit
    """
    start = time.perf_counter()
    opts = RemlOptions.from_call(options, kwargs)
    if not isinstance(reml, bool):
        raise LmmInputError(f"option 'reml' must be True or False, got {reml!r}")
    if opts.ddf == "Kenward-Roger" and not reml:
        raise LmmInputError("option 'ddf': Kenward-Roger needs a REML fit (method: reml)")
    model.require_full_rank("reml" if reml else "ml")
    check_identifiable(model)
    small = small_problem(model)
    if small is not None:  # few random effects: a program shared with other small models
        system, products, layout, shift, b0 = small
        struct = xp = None
    else:
        struct, xp, shift, b0 = blocked_problem(model, for_fit=True)
        system, products, layout = struct, xp, None
        if np.any(b0):  # y was shifted (float32): not for methods that fix beta
            struct = xp = None
    theta0, scale = np.concatenate([t.theta_init() for t in model.terms]), None
    if small is None and system.q > QUICK_MAX_Q:  # large: fewer evaluations from a moment start
        moment = moment_start(model.terms, system, products)
        if moment is not None:
            theta0, scale = moment, start_scale(model.terms, moment)
    theta, _, log, singular, est = optimize_theta(
        system, products, model.terms, theta0, opts, reml=reml, padding=layout, scale=scale
    )
    est = est._replace(beta=np.asarray(est.beta) + b0)
    result = LmmFit.from_estimates(
        model, theta, est, reml=reml, log=log, singular=singular, blocked=(struct, xp),
        small=small[:3] if small is not None else None,
    )  # fmt: skip
    result.objective += shift
    result.ddf = opts.ddf
    result._fitter = fit_reml
    result.seconds = time.perf_counter() - start
    if singular:
        warnings.warn("boundary (singular) fit: a variance or correlation is at the edge of its "
                      "range; see LmmFit.singular", LmmWarning, stacklevel=2)  # fmt: skip
    if not log.converged:
        warnings.warn(f"model failed to converge: projected gradient {log.grad_norm:.3g} after "
                      f"{log.iterations} L-BFGS iterations ({log.optimizer})", LmmWarning,
                      stacklevel=2)  # fmt: skip
    return result


def compare(*fits: LmmFit, **named: LmmFit) -> pd.DataFrame:
    """Likelihood-ratio tests of nested models, as lme4's ``anova(m0, m1, ...)``.

    REML fits are refitted by ML first, since REML criteria of models with
    different fixed effects are not comparable. Models are sorted by their
    number of parameters; each row's test is against the row above. Rows are
    labelled by keyword (``compare(null=m0, full=m1)``), or ``m0, m1, ...`` by
    position.
    """
    labels = [f"m{k}" for k in range(len(fits))] + list(named)
    fits = (*fits, *named.values())
    if len(fits) < 2:
        raise LmmInputError("compare needs at least two fitted models")
    fits = [fit_reml(m.model, reml=False) if m.reml else m for m in fits]
    if len({f.nobs for f in fits}) > 1:
        raise LmmInputError("models were fitted to different numbers of observations")
    order = sorted(range(len(fits)), key=lambda k: fits[k].npar)
    rows = []
    for pos, k in enumerate(order):
        f = fits[k]
        row = {"npar": f.npar, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik,
               "deviance": f.objective}  # fmt: skip
        row.update({"Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan})
        if pos > 0:
            prev = fits[order[pos - 1]]
            chisq = max(prev.objective - f.objective, 0.0)
            df = f.npar - prev.npar
            p = scipy.special.chdtrc(df, chisq) if df > 0 else np.nan
            row.update({"Chisq": chisq, "Df": df, "Pr(>Chisq)": p})
        rows.append(row)
    return pd.DataFrame(rows, index=[labels[k] for k in order])

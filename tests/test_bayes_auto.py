"""``marginalize: auto``: the funnel depths against their analytic values, the rule, the report."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.bayes import build_bayes_model
from lmmjax.bayes.auto import (
    FIXED_SECONDS,
    STEPS_PER_ITERATION,
    candidate_label,
    choose_marginal,
    fixed_overhead,
    funnel_depths,
    gradient_seconds,
)
from lmmjax.datasets import load_bundled
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError

SLEEP = "Reaction ~ Days + (Days | Subject)"
TINY = dict(num_chains=1, num_warmup=30, num_samples=20, progress_bar=False, seed=3)


def simulated(levels, per_level, tau, sigma, seed=0, second=None):
    """A random-intercept data set; ``second`` = (levels, tau) adds a crossed class."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(levels), per_level)
    y = 1.0 + tau * rng.standard_normal(levels)[g] + sigma * rng.standard_normal(g.size)
    df = pd.DataFrame({"y": y, "g": [f"g{i}" for i in g]})
    if second is not None:
        m2, tau2 = second
        h = rng.integers(0, m2, g.size)
        df["y"] += tau2 * rng.standard_normal(m2)[h]
        df["h"] = [f"h{i}" for i in h]
    return df


@pytest.mark.parametrize(("per_level", "tau", "sigma"), [(10, 2.0, 1.0), (4, 0.5, 1.0)])
def test_funnel_depth_matches_its_analytic_value(per_level, tau, sigma):
    """For a random intercept, lambda = n tau^2 / sigma^2 (n rows per level)."""
    model = build_model(simulated(600, per_level, tau, sigma), "y ~ 1 + (1 | g)")
    (depth,) = funnel_depths(model.y, model.X, model.terms)
    assert depth == pytest.approx(per_level * tau**2 / sigma**2, rel=0.15)


def test_fixed_scales_replace_the_estimate():
    model = build_model(simulated(50, 5, 2.0, 1.0), "y ~ 1 + (1 | g)")
    (depth,) = funnel_depths(model.y, model.X, model.terms, fixed_sd=[(0.1,)])
    assert depth == pytest.approx(5 * 0.01 / 1.0, rel=0.2)  # sigma^2 still estimated


def test_dense_funnel_depth_for_a_correlated_term():
    """Sleepstudy's depth equals a dense per-level computation from the same moments."""
    model = build_model(load_bundled("sleepstudy"), SLEEP)
    y, X, (t,) = np.asarray(model.y), model.X, model.terms
    r = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    b, grams, within = [], [], 0.0
    for m in range(t.nlevels):
        Z, rm = t.z[t.refs == m], r[t.refs == m]
        bm = np.linalg.solve(Z.T @ Z, Z.T @ rm)
        b.append(bm)
        grams.append(Z.T @ Z)
        within += np.sum((rm - Z @ bm) ** 2)
    s2 = within / (len(y) - t.nlevels * t.d)
    cov = np.cov(np.array(b).T) - s2 * np.mean([np.linalg.inv(G) for G in grams], axis=0)
    L = np.linalg.cholesky(cov)
    want = np.median([np.linalg.eigvalsh(L.T @ G @ L / s2)[-1] for G in grams])
    (depth,) = funnel_depths(y, X, model.terms)
    assert depth == pytest.approx(want, rel=1e-8)


def test_rule_marginalises_deep_funnels_and_skips_costly_shallow_ones():
    sleep = build_model(load_bundled("sleepstudy"), SLEEP)
    assert build_bayes_model(sleep, marginalize="auto").spec.marginal == (True,)
    # two large crossed classes, both nearly uninformative per level: the dense Schur
    # block of 'all' costs far more than the mild funnel of sampling them
    df = simulated(1500, 2, 0.05, 1.0, second=(1200, 0.05))
    crossed = build_model(df, "y ~ 1 + (1 | g) + (1 | h)")
    choice = choose_marginal(crossed.y, crossed.X, crossed.terms, ["g", "h"])
    assert not all(choice.marginal)
    scores = {label: score for label, _, _, score in choice.candidates}
    assert scores["all"] > min(scores.values())


def test_fixed_work_is_spread_over_the_run():
    # t_0 = FIXED_SECONDS over the gradients one core runs: 4 chains on 2 cores run 2 each
    assert fixed_overhead(4, 1000, 1000, cores=2) == pytest.approx(
        FIXED_SECONDS / (2 * 2000 * STEPS_PER_ITERATION)
    )
    assert fixed_overhead(4, 1000, 1000, cores=8) == pytest.approx(
        fixed_overhead(1, 1000, 1000, cores=1)
    )
    df = simulated(1500, 2, 0.05, 1.0, second=(1200, 0.05))
    crossed = build_model(df, "y ~ 1 + (1 | g) + (1 | h)")
    for overhead in (0.0, 1e-4, 1.0):
        choice = choose_marginal(crossed.y, crossed.X, crossed.terms, ["g", "h"],
                                 overhead=overhead)  # fmt: skip
        assert choice.overhead == overhead
        for _, t, factor, score in choice.candidates:
            assert score == pytest.approx((t + overhead) * factor)
        best = min(choice.candidates, key=lambda c: c[3])
        chosen = candidate_label(choice.marginal, ["g", "h"])
        assert best[0] == chosen
    # when fixed work dominates, the smallest funnel factor wins whatever its gradient costs
    assert best[2] == min(c[2] for c in choice.candidates)


def test_cost_model_grows_with_the_schur_block():
    df = simulated(200, 3, 1.0, 1.0, second=(150, 1.0))
    model = build_model(df, "y ~ 1 + (1 | g) + (1 | h)")
    n, p = model.nobs, model.X.shape[1]
    one = gradient_seconds(model.terms, (True, False), n, p)
    both = gradient_seconds(model.terms, (True, True), n, p)
    assert both > one > gradient_seconds(model.terms, (False, False), n, p)


def test_auto_is_reported_and_deterministic():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = [lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", **TINY) for _ in range(2)]
    a, b = fits
    assert a.bm.auto is not None and a.bm.auto.marginal == a.bm.spec.marginal
    nuts = a.to_dict()["nuts"]
    assert nuts["marginalize_auto"]["chosen"] == nuts["marginalize"] == ["Subject"]
    assert set(nuts["marginalize_auto"]["candidates"]) == {"all", "none"}
    assert a.summary().count("marginalize auto") == 1
    np.testing.assert_array_equal(a.posterior["beta"].values, b.posterior["beta"].values)
    explicit = lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", marginalize="all",
                          **TINY)  # fmt: skip
    assert explicit.bm.auto is None and explicit.to_dict()["nuts"]["marginalize_auto"] is None
    np.testing.assert_array_equal(a.posterior["beta"].values, explicit.posterior["beta"].values)


@pytest.mark.parametrize("value", ["automatic", 3, ["Subject", 1]])
def test_bad_marginalize_is_one_line(value):
    with pytest.raises(LmmInputError, match="marginalize") as info:
        lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", marginalize=value)
    assert "\n" not in str(info.value)


def test_quick_compile_only_for_short_runs():
    from lmmjax.bayes import NutsOptions
    from lmmjax.bayes.samplers import _sampler_gradients, quick_compile

    bm = build_bayes_model(build_model(load_bundled("sleepstudy"), SLEEP), marginalize="all")
    short = NutsOptions(num_warmup=100, num_samples=100)
    assert quick_compile(bm, _sampler_gradients(short))
    # 4 x 2,000 iterations: the optimised build pays (Orthodont 5.7 s against 7.2 s quick)
    assert not quick_compile(bm, _sampler_gradients(NutsOptions()))

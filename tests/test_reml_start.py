"""Moment starting values for large REML fits (lmmjax.reml.start)."""

import numpy as np
import pandas as pd
import pytest

from lmmjax.design import build_model
from lmmjax.reml import fit as reml_fit
from lmmjax.reml import fit_reml
from lmmjax.reml.objective import blocked_problem
from lmmjax.reml.optimize import QUICK_MAX_Q
from lmmjax.reml.start import FIRST_STEP, SD_FLOOR, moment_start, start_scale


def _crossed(rng, n=40000, g=2500, h=300, sd=(0.8, 0.4), sd_h=0.5, sigma=1.5):
    """Crossed classes: a correlated intercept and slope per g, an intercept per h."""
    gi, hi = rng.integers(0, g, n), rng.integers(0, h, n)
    x = rng.normal(size=n)
    cov = np.array([[sd[0] ** 2, 0.3 * sd[0] * sd[1]], [0.3 * sd[0] * sd[1], sd[1] ** 2]])
    bg = rng.multivariate_normal([0.0, 0.0], cov, g)
    y = (2 + 0.5 * x + bg[gi, 0] + bg[gi, 1] * x + rng.normal(0, sd_h, h)[hi]
         + rng.normal(0, sigma, n))  # fmt: skip
    return pd.DataFrame({"y": y, "x": x, "g": gi.astype(str), "h": hi.astype(str)})


def test_moment_start_is_near_the_truth(rng):
    df = _crossed(rng)
    model = build_model(df, "y ~ x + (x | g) + (1 | h)")
    struct, xp, _, _ = blocked_problem(model)
    theta0 = moment_start(model.terms, struct, xp)
    # theta: g's Lambda (11, 21, 22), then h's; SDs relative to sigma, correlations zero
    truth = np.array([0.8, 0.4, 0.5]) / 1.5
    # each column alone: the slope's per-level sums also carry some of the intercept's
    # variance (a level's x do not sum to zero), so its start is the roughest
    np.testing.assert_allclose(theta0[[0, 3]], truth[[0, 2]], rtol=0.1)
    np.testing.assert_allclose(theta0[2], truth[1], rtol=0.3)
    assert theta0[1] == 0.0


def test_moment_start_floors_absent_variances(rng):
    n = 20000
    df = pd.DataFrame({"y": rng.normal(size=n), "g": rng.integers(0, 3000, n).astype(str)})
    model = build_model(df, "y ~ 1 + (1 | g)")
    struct, xp, _, _ = blocked_problem(model)
    theta0 = moment_start(model.terms, struct, xp)
    assert theta0.min() >= SD_FLOOR  # never 0: a stationary point of the criterion
    assert theta0[0] < 0.1


def test_start_scale_follows_levels_and_each_terms_largest_sd(rng):
    df = _crossed(rng, n=5000, g=400, h=100)
    model = build_model(df, "y ~ x + (x | g) + (1 | h)")
    theta0 = np.array([0.5, 0.0, 0.25, 0.2])
    scale = start_scale(model.terms, theta0)
    raw = np.array([np.sqrt(400) / 0.5] * 3 + [np.sqrt(100) / 0.2])
    np.testing.assert_allclose(scale, FIRST_STEP * raw / raw.max())


def test_nested_classes_get_no_moment_start(rng):
    # each inner level sits in one outer level: both classes claim the outer variance
    n, outer, per = 30000, 250, 12
    a = rng.integers(0, outer, n)
    b = a * per + rng.integers(0, per, n)
    y = rng.normal(0, 2.0, outer)[a] + rng.normal(0, 0.3, outer * per)[b] + rng.normal(size=n)
    df = pd.DataFrame({"y": y, "a": a.astype(str), "b": (b % per).astype(str)})
    model = build_model(df, "y ~ 1 + (1 | a/b)")
    struct, xp, _, _ = blocked_problem(model)
    assert moment_start(model.terms, struct, xp) is None
    crossed = build_model(_crossed(rng), "y ~ x + (x | g) + (1 | h)")
    struct, xp, _, _ = blocked_problem(crossed)
    assert moment_start(crossed.terms, struct, xp) is not None


def test_large_fit_from_the_moment_start_reaches_the_same_optimum(rng, monkeypatch):
    """The start changes the path, not the answer: the same criterion and estimates as from
    lme4's start (Lambda = I), in fewer evaluations."""
    df = _crossed(rng)
    model = build_model(df, "y ~ x + (x | g) + (1 | h)")
    assert blocked_problem(model)[0].q > QUICK_MAX_Q  # the compiled loop's path
    moment = fit_reml(model)
    monkeypatch.setattr(
        reml_fit,
        "moment_start",
        lambda terms, s, x: np.concatenate([t.theta_init() for t in terms]),
    )
    monkeypatch.setattr(reml_fit, "start_scale", lambda terms, theta0: None)
    ones = fit_reml(model)
    assert moment.converged and ones.converged
    assert moment.objective == pytest.approx(ones.objective, abs=1e-6 * abs(ones.objective))
    np.testing.assert_allclose(moment.theta, ones.theta, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(moment.fixef, ones.fixef, rtol=1e-6)
    assert moment.log.fevals < ones.log.fevals

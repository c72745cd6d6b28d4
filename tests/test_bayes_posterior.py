"""Posterior equivalence of marginalised and unmarginalised NUTS, output and CLI.

Marginalising a class changes the sampler's parameterisation, not the model,
so ``marginalize: all``, one class and ``none`` must agree on every posterior
mean and SD within Monte Carlo error. The tolerance comes from the runs' own
MCSE (ESS-based): ``|m1 - m2| <= 4 sqrt(mcse1^2 + mcse2^2)``, for means and,
with ArviZ's MCSE of the SD, for SDs. Sleepstudy has a single grouping factor,
so there "one class" is "all".
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from lmmjax.bayes import NutsOptions, build_bayes_model, fit_nuts, sample_model
from lmmjax.datasets import load_bundled
from lmmjax.design import build_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

SETTINGS = dict(num_warmup=300, num_samples=500, num_chains=2, progress_bar=False, seed=1)
Z = 4.0


def run(model, marginalize, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_nuts(model, marginalize=marginalize, **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def sleepstudy_fits():
    model = build_model(
        load_bundled("sleepstudy"), "Reaction ~ Days + (Days | Subject)", categorical=["Subject"]
    )
    return {m: run(model, m) for m in ("all", "none")}


@pytest.fixture(scope="module")
def penicillin_fits():
    model = build_model(load_bundled("Penicillin"), "diameter ~ 1 + (1 | plate) + (1 | sample)")
    return {"all": run(model, "all"), "plate": run(model, ["plate"]), "none": run(model, "none")}


def _stats(fit, var_names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = fit.idata.posterior[var_names]
        return (post.mean(("chain", "draw")), post.std(("chain", "draw")),
                az.mcse(fit.idata, var_names=var_names, method="mean"),
                az.mcse(fit.idata, var_names=var_names, method="sd"))  # fmt: skip


def assert_same_posterior(f1, f2, var_names):
    """Means and SDs agree within Z combined MCSEs, element by element."""
    m1, s1, em1, es1 = _stats(f1, var_names)
    m2, s2, em2, es2 = _stats(f2, var_names)
    for v in var_names:
        a, b = np.asarray(m1[v]), np.asarray(m2[v])
        tol = Z * np.sqrt(np.asarray(em1[v]) ** 2 + np.asarray(em2[v]) ** 2)
        assert np.all(np.abs(a - b) <= tol), (v, a, b, tol)
        a, b = np.asarray(s1[v]), np.asarray(s2[v])
        tol = Z * np.sqrt(np.asarray(es1[v]) ** 2 + np.asarray(es2[v]) ** 2)
        assert np.all(np.abs(a - b) <= tol), (v, "sd", a, b, tol)


SLEEP_VARS = ["beta", "sigma", "sd_Subject", "corr_Subject"]
PEN_VARS = ["beta", "sigma", "sd_plate", "sd_sample"]


def test_sleepstudy_all_vs_none(sleepstudy_fits):
    assert_same_posterior(sleepstudy_fits["all"], sleepstudy_fits["none"], SLEEP_VARS)


def test_sleepstudy_recovered_effects_match(sleepstudy_fits):
    assert_same_posterior(sleepstudy_fits["all"], sleepstudy_fits["none"], ["r_Subject"])


@pytest.mark.parametrize(("a", "b"), [("all", "none"), ("plate", "none"), ("all", "plate")])
def test_penicillin_marginalisations_agree(penicillin_fits, a, b):
    assert_same_posterior(penicillin_fits[a], penicillin_fits[b], PEN_VARS)
    assert_same_posterior(penicillin_fits[a], penicillin_fits[b], ["r_plate", "r_sample"])


def test_output_layout(sleepstudy_fits, tmp_path):
    fit = sleepstudy_fits["all"]
    other = sleepstudy_fits["none"]
    post = fit.idata.posterior
    assert set(post.data_vars) == set(other.idata.posterior.data_vars)
    assert post["r_Subject"].dims == ("chain", "draw", "Subject_level", "Subject_effect")
    assert post["r_Subject"].shape == other.idata.posterior["r_Subject"].shape == (2, 500, 18, 2)
    assert list(post["beta"].coords["fixef"].values) == ["(Intercept)", "Days"]
    assert list(post["r_Subject"].coords["Subject_level"].values)[:2] == ["308", "309"]
    for stat in ("diverging", "tree_depth", "step_size"):
        assert stat in fit.idata.sample_stats
    assert fit.idata.observed_data["y"].shape == (180,)
    table = fit.posterior_summary()
    for col in ("mean", "sd", "hdi_2.5%", "hdi_97.5%", "ess_bulk", "ess_tail", "r_hat"):
        assert col in table.columns
    out = fit.to_dict()
    for key in ("method", "formula", "nobs", "ngroups", "fixef", "fixef_se", "sigma", "theta",
                "varcorr", "objective", "converged", "singular", "seconds", "posterior",
                "divergences"):  # fmt: skip
        assert key in out
    assert out["method"] == "nuts" and out["singular"] is None
    assert set(out["posterior"]["sigma"]) == {"mean", "sd", "hdi_low", "hdi_high", "ess_bulk",
                                              "r_hat"}  # fmt: skip
    rows = {(r["group"], r["var1"], r["var2"]): r for r in out["varcorr"]}
    assert rows[("Subject", "(Intercept)", "Days")]["corr"] is not None
    assert out["converged"] == (out["max_r_hat"] <= 1.01 and out["divergences"] == 0)
    path = fit.to_netcdf(tmp_path / "post.nc")
    back = az.from_netcdf(path)
    np.testing.assert_allclose(back.posterior["beta"].values, post["beta"].values)


def test_reproducible(sleepstudy_fits):
    """Same seed, same draws (and the same recovered effects)."""
    model = sleepstudy_fits["all"].model
    again = run(model, "all")
    for var in ("beta", "r_Subject"):
        np.testing.assert_array_equal(
            again.idata.posterior[var].values, sleepstudy_fits["all"].idata.posterior[var].values
        )


def test_lognormal_and_fixed_scales_run():
    """LogNormal likelihood on a positive response, and the eigen fast path end to end."""
    df = load_bundled("Penicillin")
    model = build_model(df, "diameter ~ 1 + (1 | plate) + (1 | sample)")
    bm = build_bayes_model(model, marginalize="all", likelihood="lognormal",
                           fixed_scales={"plate": 0.04, "sample": 0.08})  # fmt: skip
    assert bm.spec.fast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sample_model(bm, NutsOptions(num_warmup=200, num_samples=200, num_chains=1,
                                               progress_bar=False))  # fmt: skip
    assert "sd_plate" not in fit.idata.posterior
    assert fit.idata.posterior["r_sample"].shape == (1, 200, 6, 1)
    assert abs(fit.fixef.iloc[0] - np.log(df["diameter"]).mean()) < 0.1
    json.dumps(fit.to_dict())  # plain types only


def test_cli_method_nuts_blackjax(sleepstudy_fits, tmp_path, monkeypatch, capsys):
    """``method: nuts`` with ``backend: blackjax`` through the CLI: summary, JSON, netCDF.

    BlackJAX samples the same potential as NumPyro, so the posterior matches the
    NumPyro run within Monte Carlo error.
    """
    from lmmjax.cli import main

    cfg = tmp_path / "nuts.yaml"
    cfg.write_text(
        "data: bundled:sleepstudy\n"
        "formula: Reaction ~ Days + (Days | Subject)\n"
        "categorical: [Subject]\n"
        "method: nuts\n"
        "output: out/fit.json\n"
        "nuts:\n"
        "  backend: blackjax\n"
        "  marginalize: [Subject]\n"
        "  num_warmup: 300\n  num_samples: 500\n  num_chains: 2\n  seed: 1\n"
        "  progress_bar: false\n"
        "  priors: {corr: {dist: LKJCholesky, eta: 2}}\n"
        "  netcdf: out/post.nc\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "r_hat" in out and "ess_bulk" in out and "hdi_97.5%" in out and "divergences" in out
    result = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert result["method"] == "nuts" and result["nobs"] == 180
    assert result["nuts"]["backend"] == "blackjax"
    assert result["nuts"]["priors"]["corr_Subject"] == {"dist": "lkj", "eta": 2.0}
    ref = sleepstudy_fits["all"].to_dict()
    for name, post in result["posterior"].items():
        tol = (
            Z * post["sd"] * np.sqrt(1 / post["ess_bulk"] + 1 / ref["posterior"][name]["ess_bulk"])
        )
        assert abs(post["mean"] - ref["posterior"][name]["mean"]) <= tol, name
    assert (tmp_path / "out" / "post.nc").is_file()


def test_divergences_and_rhat_are_reported_loudly(sleepstudy_fits, capsys):
    import copy

    from lmmjax.bayes import NutsWarning
    from lmmjax.bayes.fit import check_diagnostics

    fit = copy.copy(sleepstudy_fits["all"])
    fit.idata = fit.idata.copy()
    fit.idata.sample_stats["diverging"][0, :3] = True
    beta = fit.idata.posterior["beta"]
    beta[1] = beta[1] + 5 * float(beta.std())  # chains disagree: r_hat >> 1.01
    fit._table = None
    with pytest.warns(NutsWarning) as record:
        check_diagnostics(fit)
    messages = " ".join(str(w.message) for w in record)
    assert "3 of 1000 post-warm-up transitions diverged" in messages
    assert "r_hat > 1.01" in messages and "beta[(Intercept)]" in messages
    assert capsys.readouterr().err == ""  # a warning, shown once by whoever shows warnings
    assert not fit.converged
    assert sleepstudy_fits["all"].divergences == 0  # the original is untouched

"""EM / MAP with empirical Bayes (method "map"): against ML, analytic identities and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.linalg

import lmmjax
from lmmjax.datasets import load_data
from lmmjax.design import build_model
from lmmjax.em import MapFit, fit_map
from lmmjax.em.em import make_ridge, ridge_solve, run_em_at, start_params
from lmmjax.em.fit import em_data, penalty_mask
from lmmjax.em.hyper import (
    _laplace_and_grad,
    _mode,
    b_lower_bound,
    criterion_data,
    laplace_at,
    laplace_value,
    log_marginal,
    pack,
)
from lmmjax.em.objective import Hyper
from lmmjax.options import MapOptions
from lmmjax.output import Fit

REPO = Path(__file__).resolve().parents[1]
SLEEP = "Reaction ~ Days + (Days | Subject)"
CUBIC = "y ~ 1 + t + I(t**2) + I(t**3) + (1 + t + I(t**2) + I(t**3) | ind)"


@pytest.fixture(scope="module")
def sleep():
    return load_data("bundled:sleepstudy")


@pytest.fixture(scope="module")
def em_sleep(sleep):
    """EM with no shrinkage (b = 0) and no ridge (lambda = 0), converged tightly."""
    return lmmjax.lmm(SLEEP, sleep, method="map", b=0, lam=0, A=1.0, tol=1e-14)


def simulate_cubic(rng, n_full=10, n_times=10, n_single=25) -> pd.DataFrame:
    """The issue's under-identified design: 10 individuals at 10 times plus 25 seen once."""
    t_full = np.tile(np.arange(1, n_times + 1) / n_times, n_full)
    t_single = rng.integers(1, n_times + 1, n_single) / n_times
    t = np.concatenate([t_full, t_single])
    ind = np.concatenate([np.repeat(np.arange(n_full), n_times), n_full + np.arange(n_single)])
    T = np.column_stack([t**k for k in range(4)])
    sd = np.array([1.0, 0.7, 0.5, 0.3])
    Sigma = np.outer(sd, sd) * (0.3 + 0.7 * np.eye(4))
    gamma = rng.multivariate_normal(np.zeros(4), Sigma, ind.max() + 1)
    y = T @ np.array([1.0, 2.0, -1.0, 0.5]) + np.sum(T * gamma[ind], axis=1)
    y = y + rng.normal(0.0, 0.3, t.size)
    return pd.DataFrame({"y": y, "t": t, "ind": [f"i{k}" for k in ind]})


def test_em_without_priors_is_ml(sleep, em_sleep):
    ml = lmmjax.lmm(SLEEP, sleep, method="ml", gtol=1e-9)
    assert em_sleep.converged
    np.testing.assert_allclose(em_sleep.fixef, ml.fixef, rtol=1e-4)
    np.testing.assert_allclose(em_sleep.sigma, ml.sigma, rtol=1e-4)
    np.testing.assert_allclose(em_sleep.covs[0], ml.covariances()[0], rtol=1e-4)
    # with flat priors the log posterior is the ML log-likelihood (up to the tiny sigma prior)
    np.testing.assert_allclose(em_sleep.log_posterior, ml.loglik, rtol=1e-6)
    np.testing.assert_allclose(em_sleep.fixef_se, ml.fixef_se, rtol=1e-3)


def test_log_posterior_never_decreases(em_sleep, sleep):
    hist = em_sleep.history
    assert em_sleep.em_iterations > 10 and hist.size == em_sleep.em_iterations + 1
    assert np.all(np.diff(hist) >= -1e-9 * np.abs(hist[1:]))
    # also with shrinkage and a ridge, where the priors enter the objective
    fit = lmmjax.lmm(SLEEP, sleep, method="map", b=0.5, lam=2.0, A=[400.0, 20.0])
    assert np.all(np.diff(fit.history) >= -1e-9 * np.abs(fit.history[1:]))
    assert fit.hyper == {"lambda": 2.0, "b": {"Subject": 0.5}, "A": {"Subject": [400.0, 20.0]}}


def test_shrinkage_update_is_the_conjugate_one(sleep):
    """At a fixed point Sigma = b A + (1 - b) S / m with S the conditional second moments."""
    b, A = 0.4, np.array([100.0, 4.0])
    fit = lmmjax.lmm(SLEEP, sleep, method="map", b=b, lam=0, A=A.tolist(), tol=1e-14)
    mean, cv = fit.b[0], fit.condvar[0]
    S = (mean.T @ mean + cv.sum(axis=0)) / mean.shape[0]
    np.testing.assert_allclose(fit.covs[0], b * np.diag(A) + (1 - b) * S, rtol=1e-5)


@pytest.mark.parametrize("p", [3, 40])
def test_ridge_solve_matches_dense(rng, p):
    n = 25  # p = 40 > n: the dual N x N system
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    r = rng.normal(size=n)
    pen = np.r_[0.0, np.ones(p - 1)]
    lam = 0.7
    ridge, dual = make_ridge(jnp.asarray(X), jnp.asarray(pen), lam)
    assert dual == (p > n)
    got = ridge_solve(ridge, jnp.asarray(X), jnp.asarray(r), dual=dual)
    want = np.linalg.solve(X.T @ X + lam * np.diag(pen), X.T @ r)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def highdim_model(rng, p: int, n_ind: int = 12, m: int = 5):
    """Experiment 4's design at a small size: ``(1 + x0 | g)`` and p fixed-effect columns
    whose coefficients are drawn from the ridge prior (so that lambda has a finite optimum)."""
    ind = np.repeat(np.arange(n_ind), m)
    X = rng.normal(size=(ind.size, p))
    gamma = rng.normal(size=(n_ind, 2)) * np.array([1.0, 0.5])
    y = X @ rng.normal(scale=0.5, size=p) + gamma[ind, 0] + X[:, 0] * gamma[ind, 1]
    cols = [f"x{j}" for j in range(p)]
    df = pd.DataFrame(X, columns=cols).assign(y=y + rng.normal(size=ind.size), g=ind.astype(str))
    return build_model(df, "y ~ " + " + ".join(cols) + " + (1 + x0 | g)", drop_aliased=False)


def _hyper(lam: float, b: float, A) -> Hyper:
    return Hyper(jnp.asarray(lam), (jnp.asarray(b),), (jnp.asarray(A),), jnp.asarray(1e-6))


@pytest.mark.parametrize("p", [3, 80])  # p = 80 > N = 60: the SVD-reduced primal differs
def test_criterion_forms_agree(rng, p):
    """The full primal, the reduced primal and the collapsed form are one likelihood."""
    model = highdim_model(rng, p)
    data = em_data(model, penalty_mask(model, MapOptions()))
    hyper = _hyper(0.7, 0.4, [1.5, 0.6])
    forms = {f: criterion_data(data, flat=False, form=f) for f in ("full", "primal", "collapsed")}
    assert criterion_data(data, flat=False).levels == (None if p == 3 else (12,))
    assert forms["primal"].data.X.shape[1] == (p + 1 if p == 3 else 60)
    for phi in rng.normal(scale=0.4, size=(3, 4)):
        values = {
            f: float(log_marginal(jnp.asarray(phi), c.data, hyper, levels=c.levels))
            for f, c in forms.items()
        }
        np.testing.assert_allclose(values["primal"], values["full"], rtol=1e-9)
        np.testing.assert_allclose(values["collapsed"], values["full"], rtol=1e-9)
    # lambda fixed at 0: every column flat in both forms
    if p == 3:
        flat = [criterion_data(data, flat=True, form=f) for f in ("full", "collapsed")]
        h0 = _hyper(0.0, 0.4, [1.5, 0.6])
        v = [float(log_marginal(jnp.asarray(phi), c.data, h0, levels=c.levels)) for c in flat]
        np.testing.assert_allclose(v[0], v[1], rtol=1e-9)


def _dense_log_marginal(model, phi, lam: float, b: float, A, s0: float) -> float:
    """``l(phi)`` from dense matrices: beta (ridge on the penalised columns, flat on the
    intercept) and gamma integrated out of ``y ~ N(X beta + Z gamma, sigma^2 I)``, plus the
    priors (scipy's inverse-Wishart) and the log Jacobian of ``phi``."""
    from scipy.stats import invwishart

    d = len(A)
    s2 = np.exp(phi[0])
    L = np.zeros((d, d))
    L[np.tril_indices(d)] = phi[1:]
    logdiag = np.diag(L).copy()
    L[np.diag_indices(d)] = np.exp(logdiag)
    Sigma = L @ L.T
    term = model.terms[0]
    n, m = model.nobs, term.nlevels
    Z = np.zeros((n, m * d))
    for j in range(d):
        Z[np.arange(n), term.refs * d + j] = term.z[:, j]
    Xu, Xp = model.X[:, :1], model.X[:, 1:]
    C = s2 * (np.eye(n) + Xp @ Xp.T / lam) + Z @ np.kron(np.eye(m), Sigma) @ Z.T
    cf = scipy.linalg.cho_factor(C, lower=True)
    ciy, cix = scipy.linalg.cho_solve(cf, model.y), scipy.linalg.cho_solve(cf, Xu)
    G = Xu.T @ cix
    quad = model.y @ ciy - (Xu.T @ ciy) @ np.linalg.solve(G, Xu.T @ ciy)
    loglik = -0.5 * (
        (n - 1) * np.log(2 * np.pi) + 2 * np.sum(np.log(np.diag(cf[0])))
        + np.linalg.slogdet(G)[1] + quad
    )  # fmt: skip
    kappa = b * m / (1 - b)
    prior = invwishart(df=kappa - d - 1, scale=kappa * np.diag(A)).logpdf(Sigma) - s0 / s2
    jacobian = phi[0] + d * np.log(2) + np.sum((d + 1 - np.arange(d)) * logdiag)
    return loglik + prior + jacobian


@pytest.mark.parametrize("form", ["full", "collapsed"])
def test_criterion_is_the_dense_marginal_likelihood(rng, form):
    """``l(phi)``, the function Laplace's method integrates over the variance parameters only,
    has beta and gamma integrated out exactly: against the dense Gaussian integral."""
    model = highdim_model(rng, 3, n_ind=8, m=4)
    data = em_data(model, penalty_mask(model, MapOptions()))
    crit = criterion_data(data, flat=False, form=form)
    lam, b, A = 0.7, 0.45, [1.5, 0.6]
    hyper = _hyper(lam, b, A)
    for phi in rng.normal(scale=0.4, size=(3, 4)):
        got = float(log_marginal(jnp.asarray(phi), crit.data, hyper, levels=crit.levels))
        want = _dense_log_marginal(model, phi, lam, b, A, float(hyper.s0))
        np.testing.assert_allclose(got, want, rtol=1e-10)


# primal: about 25-100 s (compiles third derivatives through the blocked factorisation)
@pytest.mark.parametrize("form", [pytest.param("primal", marks=pytest.mark.slow), "collapsed"])
def test_laplace_gradient_matches_finite_differences(rng, form):
    """The implicit-function gradient of the Laplace value, against central differences."""
    model = highdim_model(rng, 6)
    data = em_data(model, penalty_mask(model, MapOptions()))
    crit = criterion_data(data, flat=False, form=form)
    hyper = _hyper(0.8, 0.5, [1.2, 0.4])
    trace = run_em_at(
        data, hyper, start_params(data, [np.diag([1.2, 0.4])]), maxiter=500, tol=1e-10
    )
    phi, f, H = _mode(pack(trace.params), crit, hyper)
    # compiled, as _search_point runs it: op by op, a GPU compiles each of its thousands of
    # operations on its own (over 200 s on an H100)
    laplace_and_grad = jax.jit(partial(_laplace_and_grad, levels=crit.levels))
    value, grad = laplace_and_grad(phi, crit.data, hyper)
    np.testing.assert_allclose(float(value), laplace_value(phi, f, H), rtol=1e-10)

    def laplace(h):
        return laplace_value(*_mode(phi, crit, h))

    eps = 1e-5
    for name, plus, minus, got in [
        ("lambda", _hyper(0.8 + eps, 0.5, [1.2, 0.4]), _hyper(0.8 - eps, 0.5, [1.2, 0.4]),
         grad.lam),
        ("b", _hyper(0.8, 0.5 + eps, [1.2, 0.4]), _hyper(0.8, 0.5 - eps, [1.2, 0.4]), grad.b[0]),
        ("A0", _hyper(0.8, 0.5, [1.2 + eps, 0.4]), _hyper(0.8, 0.5, [1.2 - eps, 0.4]),
         grad.A[0][0]),
    ]:  # fmt: skip
        fd = (laplace(plus) - laplace(minus)) / (2 * eps)
        np.testing.assert_allclose(float(got), fd, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow  # about 20-70 s: a full empirical-Bayes fit plus the primal-form check
def test_more_columns_than_rows(rng):
    """p = 120 > N = 60: EM by the dual ridge, empirical Bayes by the collapsed form."""
    model = highdim_model(rng, 120)
    fit = fit_map(model)
    assert fit.search["form"] == "collapsed" and fit.converged
    assert fit.hyper["lambda"] > 0 and 0 < fit.hyper["b"]["g"] < 1
    assert np.all(np.diff(fit.history) >= -1e-9 * np.abs(fit.history[1:]))
    # the value the search reports is the primal form's Laplace value at the chosen hyper
    data = em_data(model, penalty_mask(model, MapOptions()))
    hyper = _hyper(fit.hyper["lambda"], fit.hyper["b"]["g"], fit.hyper["A"]["g"])
    params = start_params(data, [np.diag(fit.hyper["A"]["g"])])
    trace = run_em_at(data, hyper, params, maxiter=2000, tol=1e-10)
    primal = laplace_at(data, hyper, trace.params, criterion_data(data, False, form="primal"))
    np.testing.assert_allclose(fit.laplace_log_marginal, primal, rtol=1e-7)
    # and a local maximum: moving lambda either way lowers it
    for lam in (0.8 * fit.hyper["lambda"], 1.25 * fit.hyper["lambda"]):
        moved = _hyper(lam, fit.hyper["b"]["g"], fit.hyper["A"]["g"])
        assert laplace_at(data, moved, trace.params) < fit.laplace_log_marginal


def test_fit_protocol_and_json(em_sleep):
    assert isinstance(em_sleep, MapFit) and isinstance(em_sleep, Fit)
    d = em_sleep.to_dict()
    for key in ("fixef", "sigma", "varcorr", "nobs", "converged", "seconds",
                "log_posterior", "laplace_log_marginal", "hyper", "em_iterations"):  # fmt: skip
        assert key in d
    json.dumps(d)
    assert set(d["hyper"]) == {"lambda", "b", "A"}
    assert "Subject" in em_sleep.ranef()
    text = em_sleep.summary()
    assert "Random effects:" in text and "lambda = 0" in text and "Priors:" in text
    assert repr(em_sleep).startswith("MapFit(")
    # theta is lme4's: chol(Sigma) / sigma
    L = np.linalg.cholesky(em_sleep.covs[0]) / em_sleep.sigma
    np.testing.assert_allclose(em_sleep.theta, L[[0, 1, 1], [0, 0, 1]])


@pytest.mark.slow  # about 15-45 s: empirical Bayes over (lambda, b, a) on 2 CPU cores
def test_under_identified_cubic_model(rng):
    df = simulate_cubic(rng)
    model = build_model(df, CUBIC)
    assert (model.nobs, model.q) == (125, 140)
    with pytest.raises(lmmjax.LmmInputError, match="140 random effects for 125 observations"):
        lmmjax.fit_reml(model)
    fit = fit_map(model)  # b and lambda "auto"
    S = fit.covs[0]
    assert np.all(np.linalg.eigvalsh(S) > 0)
    corr = fit.correlations()[0][np.triu_indices(4, 1)]
    assert np.all(np.abs(corr) < 0.99)
    b = fit.hyper["b"]["ind"]
    assert b_lower_bound(4, 35) < b < 1 and fit.hyper["lambda"] > 0
    assert np.isfinite(fit.laplace_log_marginal)
    assert np.all(np.diff(fit.history) >= -1e-9 * np.abs(fit.history[1:]))


def _cli(tmp_path, method: str, data: Path) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(
        f"data: {data}\nformula: {CUBIC}\ncategorical: [ind]\nmethod: {method}\n"
        f"output: {tmp_path / (method + '.json')}\nmap:\n  b: auto\n  lambda: auto\n",
        encoding="utf-8",
    )
    return subprocess.run(
        [sys.executable, "-m", "lmmjax.fit", str(cfg)], capture_output=True, text=True, cwd=REPO,
        timeout=300,
    )  # fmt: skip


def test_cli_reml_refuses_the_cubic_model_in_one_line(tmp_path, rng):
    data = tmp_path / "cubic.csv"
    simulate_cubic(rng).to_csv(data, index=False)
    reml = _cli(tmp_path, "reml", data)
    assert reml.returncode == 2
    lines = reml.stderr.strip().splitlines()
    assert len(lines) == 1 and "140 random effects for 125 observations" in lines[0]


@pytest.mark.slow  # about 15-45 s
def test_cli_map_fits_what_reml_refuses(tmp_path, rng):
    data = tmp_path / "cubic.csv"
    simulate_cubic(rng).to_csv(data, index=False)
    reml = _cli(tmp_path, "reml", data)
    assert reml.returncode == 2
    lines = reml.stderr.strip().splitlines()
    assert len(lines) == 1 and "140 random effects for 125 observations" in lines[0]
    out = _cli(tmp_path, "map", data)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "map.json").read_text())
    assert result["method"] == "map" and result["nobs"] == 125
    corr = [r["corr"] for r in result["varcorr"] if r["var2"] is not None]
    assert len(corr) == 6 and max(abs(c) for c in corr) < 0.99
    assert 0 < result["hyper"]["b"]["ind"] < 1 and result["em_iterations"] > 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"b": 1.0}, "option 'b': must be a number in \\[0, 1\\)"),
        ({"b": -0.1}, "option 'b'"),
        ({"lam": -1.0}, "option 'lam': must be a number >= 0"),
        ({"lambda": -1.0}, "option 'lambda': must be a number >= 0"),
        ({"A": {"Subject": [1.0, 2.0, 3.0]}}, "option 'A': factor 'Subject' has 2 random effects"),
        ({"A": {"Batch": 1.0}}, "option 'A': unknown grouping factor 'Batch'"),
        ({"b": {"Batch": 0.5}}, "option 'b': unknown grouping factor 'Batch'"),
        ({"b": {"Subject": 2}}, "option 'b': factor 'Subject'"),
        ({"A": -2.0}, "option 'A'"),
        ({"unpenalized": ["Nope"]}, "option 'unpenalized': 'Nope'"),
        ({"solver": 1}, "unknown key"),
    ],
)
def test_bad_input_is_one_line(sleep, options, match):
    with pytest.raises(lmmjax.LmmInputError, match=match) as info:
        lmmjax.lmm(SLEEP, sleep, method="map", **options)
    assert "\n" not in str(info.value)


def test_config_section_takes_lambda(tmp_path):
    from lmmjax.config import validate_config

    cfg = validate_config(
        {
            "data": "bundled:sleepstudy",
            "formula": SLEEP,
            "method": "map",
            "map": {"lambda": 0.5, "b": {"Subject": "auto"}, "A": 2},
        }  # fmt: skip
    )
    assert cfg.options().lam == 0.5 and cfg.options().b == {"Subject": "auto"}
    with pytest.raises(lmmjax.LmmInputError, match="config key 'map.lambda'"):
        validate_config({"data": "x.csv", "formula": SLEEP, "map": {"lambda": -1}})


@pytest.mark.slow  # about 15 s
def test_benchmark_smoke():
    out = subprocess.run(
        [sys.executable, "benchmarks/em_map.py", "--quick", "--only", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "REML refused" in out.stdout and "[1] MAP: b=" in out.stdout

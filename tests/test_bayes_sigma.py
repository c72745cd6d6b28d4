"""A linear predictor for the residual SD (brms' ``sigma ~ x + (x | g)``).

The kernels with one residual SD per row are checked against the dense
N x N multivariate normal ``N(r | 0, diag(sigma_i^2) + sum_{l in S} Z_l Sigma_l Z_l')``
for every subset S of marginalised classes, the recovered effects against the
dense Gaussian conditional, the potential's gradient against finite
differences, and a short posterior against the unmarginalised sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.stats
from test_bayes_kernels import random_params, subsets, term_covs

import lmmjax
from lmmjax.bayes.model import build_bayes_model, log_sigma_from_params, loglik_from_params
from lmmjax.bayes.recovery import recover_effects
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError

SIGMA = "sigma ~ x + (x | g1)"


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(21)
    n = 90
    g1 = rng.permutation(np.concatenate([np.arange(9), rng.integers(0, 9, n - 9)]))
    g2 = rng.permutation(np.concatenate([np.arange(5), rng.integers(0, 5, n - 5)]))
    x = rng.normal(size=n)
    y = np.exp(0.4 * (1.0 + 0.5 * x + rng.normal(size=n)))
    df = pd.DataFrame({"y": y, "x": x, "g1": [f"a{v}" for v in g1], "g2": [f"b{v}" for v in g2]})
    return build_model(df, "y ~ x + (x | g1) + (1 | g2)", submodels={"sigma": SIGMA})


def sigma_params(rng, bm) -> dict:
    """Random values of the sigma formula's sites, added to the mean's."""
    params = random_params(rng, bm)
    del params["sigma"]
    sub = bm.spec.sigma_model
    params["beta_sigma"] = jnp.asarray(rng.normal(scale=0.3, size=sub.p))
    for name, d, m in zip(sub.names, sub.d, sub.nlevels, strict=True):
        params[f"sd_sigma_{name}"] = jnp.asarray(rng.uniform(0.1, 0.5, size=d))
        a = rng.normal(size=(d, d + 2))
        cov = a @ a.T
        sd = np.sqrt(np.diag(cov))
        params[f"L_sigma_{name}"] = jnp.asarray(np.linalg.cholesky(cov / np.outer(sd, sd)))
        params[f"z_sigma_{name}"] = jnp.asarray(rng.normal(size=(m, d)))
    return params


def dense_sigma(model, bm, params) -> np.ndarray:
    """Per-row sigma_i from dense designs."""
    sub = model.submodels["sigma"]
    eta = sub.X @ np.asarray(params["beta_sigma"])
    for t, name in zip(sub.terms, bm.spec.sigma_model.names, strict=True):
        sd = np.asarray(params[f"sd_sigma_{name}"])
        C = sd[:, None] * np.asarray(params[f"L_sigma_{name}"])
        eta = eta + t.dense() @ (np.asarray(params[f"z_sigma_{name}"]) @ C.T).reshape(-1)
    return np.exp(eta)


def dense_parts(model, bm, params):
    """Residual after the sampled classes, and the dense covariance of the marginalised."""
    spec = bm.spec
    r = np.log(model.y) - model.X @ np.asarray(params["beta"])
    V = np.diag(dense_sigma(model, bm, params) ** 2)
    Zs, Ss = [], []
    for k, (t, cov) in enumerate(zip(model.terms, term_covs(bm, params), strict=True)):
        if spec.marginal[k]:
            Zs.append(t.dense())
            Ss.append(np.kron(np.eye(t.nlevels), cov))
            V += Zs[-1] @ Ss[-1] @ Zs[-1].T
        else:
            b = np.asarray(params[f"z_{spec.names[k]}"]) @ np.linalg.cholesky(cov).T
            r = r - t.dense() @ b.reshape(-1)
    return r, V, Zs, Ss


def test_log_sigma_rows(model):
    bm = build_bayes_model(model, marginalize="all", likelihood="lognormal", sigma=SIGMA)
    params = sigma_params(np.random.default_rng(1), bm)
    got = np.asarray(log_sigma_from_params(params, bm.data, bm.spec))
    np.testing.assert_allclose(got, np.log(dense_sigma(model, bm, params)), rtol=1e-12)


def test_loglik_matches_dense(model):
    rng = np.random.default_rng(2)
    for marg in subsets(model):
        bm = build_bayes_model(model, marginalize=marg, likelihood="lognormal", sigma=SIGMA)
        assert not bm.spec.fast and bm.data.xp is None
        for _ in range(2):
            params = sigma_params(rng, bm)
            r, V, _, _ = dense_parts(model, bm, params)
            want = scipy.stats.multivariate_normal(np.zeros(r.size), V).logpdf(r)
            want -= np.sum(np.log(model.y))
            got = float(loglik_from_params(params, bm.data, bm.spec))
            assert got == pytest.approx(want, rel=1e-9), marg


@pytest.mark.parametrize("marg", ["all", ["g2"]])
def test_recovery_is_the_exact_conditional(model, marg):
    bm = build_bayes_model(model, marginalize=marg, likelihood="lognormal", sigma=SIGMA)
    params = sigma_params(np.random.default_rng(3), bm)
    r, V, Zs, Ss = dense_parts(model, bm, params)
    Z, S = np.hstack(Zs), scipy.linalg.block_diag(*Ss)
    K = S @ Z.T @ np.linalg.solve(V, np.eye(r.size))
    mean, cov = K @ r, S - K @ Z @ S
    n = 4000
    samples = {k: jnp.broadcast_to(v, (n, *jnp.shape(v))) for k, v in params.items()}
    effects = recover_effects(samples, bm.data, bm.spec, jax.random.PRNGKey(4), batch_size=500)
    draws = np.concatenate(
        [np.asarray(e).reshape(n, -1) for e, m in zip(effects, bm.spec.marginal, strict=True)
         if m], axis=1,
    )  # fmt: skip
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(draws.mean(axis=0) - mean) <= 5 * se)
    scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.max(np.abs(np.cov(draws, rowvar=False) - cov) / scale) < 0.12


@pytest.mark.parametrize("marg", ["all", "none"])
def test_potential_gradient_matches_finite_differences(model, marg):
    bm = build_bayes_model(model, marginalize=marg, likelihood="lognormal", sigma=SIGMA)
    p0 = jax.tree.map(lambda a: a[0], bm.init_params(jax.random.PRNGKey(0), 1))
    assert "sigma" not in p0 and "beta_sigma" in p0
    f = jax.jit(bm.potential)
    grad = jax.jit(jax.grad(bm.potential))(p0, bm.data)
    rng = np.random.default_rng(5)
    for _ in range(3):
        v = {k: jnp.asarray(rng.normal(size=np.shape(a))) for k, a in p0.items()}
        plus = jax.tree.map(lambda a, b: a + 1e-5 * b, p0, v)
        minus = jax.tree.map(lambda a, b: a - 1e-5 * b, p0, v)
        fd = (float(f(plus, bm.data)) - float(f(minus, bm.data))) / 2e-5
        ad = sum(float(jnp.sum(grad[k] * v[k])) for k in p0)
        assert ad == pytest.approx(fd, rel=1e-6, abs=1e-6)


def test_bad_input_is_named(model):
    with pytest.raises(LmmInputError, match="needs the model built with it"):
        build_bayes_model(model, sigma="~ x")
    with pytest.raises(LmmInputError, match="prior 'sigma': sigma has its own formula"):
        build_bayes_model(model, sigma=SIGMA, priors={"sigma": {"scale": 1}})
    with pytest.raises(LmmInputError, match="parameter 'sigma.sd_g9'; choose from sigma.beta"):
        build_bayes_model(model, sigma=SIGMA, priors={"sigma.sd_g9": {"scale": 1}})
    with pytest.raises(LmmInputError, match="no formula for sigma"):
        build_bayes_model(model, priors={"sigma.beta": {"scale": 1}})
    with pytest.raises(LmmInputError, match="fast path needs a constant sigma"):
        build_bayes_model(model, sigma=SIGMA, fast_path=True)
    df = model.data.assign(y=model.y)
    with pytest.raises(LmmInputError, match="unknown column 'w' in the sigma formula"):
        build_model(df, "y ~ x + (1 | g1)", submodels={"sigma": "~ w"})
    with pytest.raises(LmmInputError, match="must be one-sided"):
        build_model(df, "y ~ x + (1 | g1)", submodels={"sigma": "mu ~ x"})


def test_prior_overrides_reach_the_sigma_formula(model):
    bm = build_bayes_model(model, sigma=SIGMA, priors={
        "sigma.beta[x]": {"scale": 0.25}, "sigma.sd_g1": {"scale": [2.0, 3.0]}, "sd": {"scale": 7},
    })  # fmt: skip
    sub = bm.spec.sigma_model.priors
    assert sub.beta.scale[1] == 0.25 and sub.sd[0].scale == (2.0, 3.0)
    assert all(s.scale == (7.0,) * len(s.scale) for s in bm.spec.priors.sd)


def test_fit_reports_the_sigma_formula(model):
    """A short run through the public API: names, derived sigma and JSON priors."""
    df = model.data.assign(y=model.y)
    fit = lmmjax.lmm("y ~ x + (x | g1) + (1 | g2)", df, method="nuts", sigma=SIGMA,
                     likelihood="lognormal", num_chains=1, num_warmup=30, num_samples=20,
                     progress_bar=False)  # fmt: skip
    post = fit.posterior
    assert post["beta_sigma"].shape == (1, 20, 2)
    assert post["r_sigma_g1"].shape == (1, 20, 9, 2)
    out = fit.to_dict()
    assert "fixef_sigma[x]" in out["posterior"] and "sd_sigma[g1, x]" in out["posterior"]
    assert "sigma.beta" in out["nuts"]["priors"] and "sigma" not in out["nuts"]["priors"]
    assert "sigma sigma ~ x + (x | g1)" in fit.summary()
    # expected response with each row's own sigma: exp(mu + sigma_i^2 / 2) for the LogNormal
    table = fit.fitted()
    assert np.all(np.isfinite(table["Estimate"])) and np.all(table["Estimate"] > 0)
    assert "log_likelihood" in fit.idata.groups()
    with pytest.raises(LmmInputError, match="with a sigma formula are not built"):
        fit.predict(df.head(3))
    # the derived sigma: exp of the mean over rows of log sigma_i, draw by draw
    bm = fit.bm
    samples = {k: jnp.asarray(v[0, 3]) for k, v in _raw_samples(fit).items()}
    want = np.exp(np.mean(np.asarray(log_sigma_from_params(samples, bm.data, bm.spec))))
    assert float(post["sigma"].values[0, 3]) == pytest.approx(want, rel=1e-10)


def _raw_samples(fit) -> dict:
    """Sample sites of the sigma formula rebuilt from the posterior (z from r and C)."""
    post, sub = fit.posterior, fit.bm.spec.sigma_model
    out = {"beta_sigma": post["beta_sigma"].values}
    for name in sub.names:
        sd = post[f"sd_sigma_{name}"].values
        rho = post[f"corr_sigma_{name}"].values[..., 0]
        L = np.zeros((*rho.shape, 2, 2))
        L[..., 0, 0], L[..., 1, 0], L[..., 1, 1] = 1.0, rho, np.sqrt(1 - rho**2)
        C = sd[..., :, None] * L
        r = post[f"r_sigma_{name}"].values
        out[f"sd_sigma_{name}"], out[f"L_sigma_{name}"] = sd, L
        out[f"z_sigma_{name}"] = np.linalg.solve(C[..., None, :, :], r[..., None])[..., 0]
    return out

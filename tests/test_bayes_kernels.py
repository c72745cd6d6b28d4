"""Marginal likelihood kernels of the Bayesian LMM against a dense N x N reference.

For every subset S of the random-effect classes, the kernel's log-likelihood
with S integrated out is compared with the dense multivariate normal

    log N(r | 0, sigma^2 I + sum_{l in S} Z_l (I kron Sigma_l) Z_l'),
    r = y - X beta - sum_{l not in S} Z_l b_l,

built here with NumPy and SciPy, on small random designs (crossed, nested,
correlated slopes, three terms, LogNormal). Also: the eigen fast path, exact
recovery of the marginalised effects, and gradients of the NUTS potential
against finite differences.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from lmmjax.bayes.model import build_bayes_model, loglik_from_params
from lmmjax.bayes.recovery import recover_effects
from lmmjax.design import build_model

RTOL = 1e-9

# name -> (formula, N, levels of each grouping column, likelihood)
DESIGNS = {
    "crossed": ("y ~ x + (1|g1) + (1|g2)", 90, {"g1": 15, "g2": 6}, "normal"),
    "nested": ("y ~ x + (1|g2/g1)", 96, {"g1": 4, "g2": 6}, "normal"),
    "slopes": ("y ~ x + (x|g1) + (1|g2)", 100, {"g1": 12, "g2": 5}, "normal"),
    "three_terms": (
        "y ~ x + (x|g1) + (1|g2) + (0 + x2|g3)",
        110,
        {"g1": 11, "g2": 6, "g3": 4},
        "normal",
    ),  # fmt: skip
    "lognormal": ("y ~ x + (x|g1) + (1|g2)", 80, {"g1": 10, "g2": 4}, "lognormal"),
}


def make_data(rng, n: int, levels: dict, likelihood: str) -> pd.DataFrame:
    """Random data with every level used; ``g1`` nested in ``g2`` when both exist."""
    cols = {}
    for g, m in levels.items():
        cols[g] = rng.permutation(np.concatenate([np.arange(m), rng.integers(0, m, n - m)]))
    cols = {g: np.array([f"{g}_{v}" for v in c]) for g, c in cols.items()}
    x, x2 = rng.normal(size=n), rng.uniform(-1, 1, size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=n)
    if likelihood == "lognormal":
        y = np.exp(0.3 * y)
    return pd.DataFrame({"y": y, "x": x, "x2": x2, **cols})


def random_params(rng, bm) -> dict:
    """Constrained parameter values for every sample site of the model."""
    spec = bm.spec
    params = {"beta": rng.normal(size=spec.p), "sigma": rng.uniform(0.5, 1.5)}
    if spec.shared_scale:
        params["sd_shared"] = rng.uniform(0.5, 1.5)
    for k, name in enumerate(spec.names):
        d = spec.d[k]
        if spec.fixed_sd[k] is None:
            params[f"sd_{name}"] = rng.uniform(0.3, 1.5, size=d)
        if spec.correlated[k]:
            a = rng.normal(size=(d, d + 2))
            cov = a @ a.T
            sd = np.sqrt(np.diag(cov))
            params[f"L_{name}"] = np.linalg.cholesky(cov / np.outer(sd, sd))
        if not spec.marginal[k]:
            params[f"z_{name}"] = rng.normal(size=(spec.nlevels[k], d))
    return {k: jnp.asarray(v) for k, v in params.items()}


def term_covs(bm, params) -> list[np.ndarray]:
    spec = bm.spec
    out = []
    for k, name in enumerate(spec.names):
        if spec.fixed_sd[k] is not None:
            sd = np.asarray(spec.fixed_sd[k]) * (float(params["sd_shared"]) if spec.shared_scale
                                                 else 1.0)  # fmt: skip
        else:
            sd = np.asarray(params[f"sd_{name}"])
        L = np.asarray(params[f"L_{name}"]) if spec.correlated[k] else np.eye(spec.d[k])
        C = sd[:, None] * L
        out.append(C @ C.T)
    return out


def dense_reference(bm, params) -> float:
    """Dense N x N multivariate-normal log-likelihood (plus the LogNormal Jacobian)."""
    model, spec = bm.model, bm.spec
    y = np.log(model.y) if spec.likelihood == "lognormal" else np.asarray(model.y)
    r = y - model.X @ np.asarray(params["beta"])
    sigma = float(params["sigma"])
    V = sigma**2 * np.eye(y.size)
    for k, (t, cov) in enumerate(zip(model.terms, term_covs(bm, params), strict=True)):
        Z = t.dense()
        if spec.marginal[k]:
            V += Z @ np.kron(np.eye(t.nlevels), cov) @ Z.T
        else:
            C = np.linalg.cholesky(cov)
            b = np.asarray(params[f"z_{spec.names[k]}"]) @ C.T
            r = r - Z @ b.reshape(-1)
    ll = scipy.stats.multivariate_normal(mean=np.zeros(y.size), cov=V).logpdf(r)
    if spec.likelihood == "lognormal":
        ll -= np.sum(np.log(model.y))
    return float(ll)


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(4)
    out = {}
    for name, (formula, n, levels, lik) in DESIGNS.items():
        df = make_data(rng, n, levels, lik)
        out[name] = (build_model(df, formula), lik)
    return out


def subsets(model) -> list:
    """Every subset of the grouping factors, as ``marginalize`` values."""
    groups = sorted({t.group for t in model.terms})
    out: list = ["none", "all"]
    for k in range(1, len(groups)):
        out += [list(c) for c in itertools.combinations(groups, k)]
    return out


@pytest.mark.parametrize("design", list(DESIGNS))
def test_marginal_loglik_matches_dense(models, design):
    model, lik = models[design]
    rng = np.random.default_rng(11)
    for marg in subsets(model):
        bm = build_bayes_model(model, marginalize=marg, likelihood=lik)
        for _ in range(2):
            params = random_params(rng, bm)
            got = float(loglik_from_params(params, bm.data, bm.spec))
            want = dense_reference(bm, params)
            assert got == pytest.approx(want, rel=RTOL), (design, marg)


@pytest.mark.parametrize("shared", [False, True])
def test_eigen_fast_path_matches_dense(models, shared):
    model, _ = models["crossed"]
    rng = np.random.default_rng(5)
    fixed = {"g1": 0.7, "g2": 1.3}
    bm = build_bayes_model(model, marginalize="all", fixed_scales=fixed, shared_scale=shared)
    assert bm.spec.fast
    slow = build_bayes_model(model, marginalize="all", fixed_scales=fixed,
                             shared_scale=shared, fast_path=False)  # fmt: skip
    assert not slow.spec.fast
    for _ in range(3):
        params = random_params(rng, bm)
        got = float(loglik_from_params(params, bm.data, bm.spec))
        assert got == pytest.approx(dense_reference(bm, params), rel=RTOL)
        assert got == pytest.approx(float(loglik_from_params(params, slow.data, slow.spec)),
                                    rel=RTOL)  # fmt: skip


def dense_conditional(bm, params):
    """Mean and covariance of the marginalised effects given y (dense formulas)."""
    model, spec = bm.model, bm.spec
    r = np.asarray(model.y) - model.X @ np.asarray(params["beta"])
    sigma = float(params["sigma"])
    covs = term_covs(bm, params)
    Zs, Ss = [], []
    for k, (t, cov) in enumerate(zip(model.terms, covs, strict=True)):
        if spec.marginal[k]:
            Zs.append(t.dense())
            Ss.append(np.kron(np.eye(t.nlevels), cov))
        else:
            b = np.asarray(params[f"z_{spec.names[k]}"]) @ np.linalg.cholesky(cov).T
            r = r - t.dense() @ b.reshape(-1)
    Z = np.hstack(Zs)
    S = scipy.linalg.block_diag(*Ss)
    V = sigma**2 * np.eye(r.size) + Z @ S @ Z.T
    K = S @ Z.T @ np.linalg.inv(V)
    return K @ r, S - K @ Z @ S


@pytest.mark.parametrize(
    ("design", "marg", "opts"),
    [
        ("slopes", "all", {}),
        ("three_terms", ["g1", "g3"], {}),
        ("crossed", "all", {"fixed_scales": {"g1": 0.7, "g2": 1.3}}),
    ],
)
def test_recovery_is_the_exact_conditional(models, design, marg, opts):
    """Many recovered draws at one parameter value: mean and covariance as the dense formulas."""
    model, _ = models[design]
    bm = build_bayes_model(model, marginalize=marg, **opts)
    params = random_params(np.random.default_rng(8), bm)
    mean, cov = dense_conditional(bm, params)
    n = 4000
    samples = {k: jnp.broadcast_to(v, (n, *jnp.shape(v))) for k, v in params.items()}
    effects = recover_effects(samples, bm.data, bm.spec, jax.random.PRNGKey(3), batch_size=500)
    draws = np.concatenate(
        [np.asarray(e).reshape(n, -1) for e, m in zip(effects, bm.spec.marginal, strict=True)
         if m], axis=1,
    )  # fmt: skip
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(draws.mean(axis=0) - mean) <= 5 * se)
    emp = np.cov(draws, rowvar=False)
    scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.max(np.abs(emp - cov) / scale) < 0.12
    # sampled classes pass through unchanged
    for k, e in enumerate(effects):
        if not bm.spec.marginal[k]:
            C = np.linalg.cholesky(term_covs(bm, params)[k])
            want = np.asarray(params[f"z_{bm.spec.names[k]}"]) @ C.T
            np.testing.assert_allclose(np.asarray(e[0]), want, rtol=1e-12)


def test_recovery_one_draw_at_a_time_equals_batches(models):
    """The CPU default (a plain loop over draws) draws what vectorised batches draw."""
    model, _ = models["crossed"]
    bm = build_bayes_model(model, marginalize="all")
    rng = np.random.default_rng(9)
    draws = [random_params(rng, bm) for _ in range(10)]
    samples = {k: jnp.stack([d[k] for d in draws]) for k in draws[0]}
    key = jax.random.PRNGKey(5)
    one = recover_effects(samples, bm.data, bm.spec, key, batch_size=1)
    batched = recover_effects(samples, bm.data, bm.spec, key, batch_size=4)
    for a, b in zip(one, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("design", "marg", "lik", "opts"),
    [("slopes", "all", "normal", {}), ("three_terms", ["g2"], "normal", {}),
     ("lognormal", "none", "lognormal", {}),
     ("crossed", "all", "normal", {"fixed_scales": {"g1": 0.7}, "shared_scale": True})],
)  # fmt: skip
def test_potential_gradient_matches_finite_differences(models, design, marg, lik, opts):
    model, _ = models[design]
    bm = build_bayes_model(model, marginalize=marg, likelihood=lik, **opts)
    init = bm.init_params(jax.random.PRNGKey(0), 1)
    p0 = jax.tree.map(lambda a: a[0], init)
    f = jax.jit(bm.potential)
    grad = jax.jit(jax.grad(bm.potential))(p0, bm.data)
    rng = np.random.default_rng(2)
    for _ in range(3):
        v = {k: jnp.asarray(rng.normal(size=np.shape(a))) for k, a in p0.items()}
        h = 1e-5
        plus = jax.tree.map(lambda a, b: a + 1e-5 * b, p0, v)
        minus = jax.tree.map(lambda a, b: a - 1e-5 * b, p0, v)
        fd = (float(f(plus, bm.data)) - float(f(minus, bm.data))) / (2 * h)
        ad = sum(float(jnp.sum(grad[k] * v[k])) for k in p0)
        assert ad == pytest.approx(fd, rel=1e-6, abs=1e-6)


def test_potential_is_shared_and_complete(models):
    """The potential is -(log prior + log Jacobian + log-likelihood) of the constrained values."""
    import numpyro.distributions as dist
    from numpyro.infer.util import constrain_fn

    from lmmjax.bayes.priors import to_distribution

    model, _ = models["slopes"]
    bm = build_bayes_model(model, marginalize=["g2"])
    p0 = jax.tree.map(lambda a: a[0], bm.init_params(jax.random.PRNGKey(1), 1))
    c = jax.jit(lambda p, d: constrain_fn(bm.numpyro_model, (d,), {}, p))(p0, bm.data)
    pri = bm.spec.priors
    lp = to_distribution(pri.beta).log_prob(c["beta"]).sum()
    lp += to_distribution(pri.sigma, scalar=True).log_prob(c["sigma"]) + jnp.log(c["sigma"])
    for k, name in enumerate(bm.spec.names):
        sd = c[f"sd_{name}"]
        lp += to_distribution(pri.sd[k]).log_prob(sd).sum() + jnp.log(sd).sum()
        if bm.spec.correlated[k]:
            t = dist.transforms.CorrCholeskyTransform()
            lp += dist.LKJCholesky(bm.spec.d[k], 2.0).log_prob(c[f"L_{name}"])
            lp += t.log_abs_det_jacobian(p0[f"L_{name}"], c[f"L_{name}"])
        if not bm.spec.marginal[k]:
            lp += dist.Normal().log_prob(c[f"z_{name}"]).sum()
    lp += loglik_from_params(c, bm.data, bm.spec)
    assert float(jax.jit(bm.potential)(p0, bm.data)) == pytest.approx(-float(lp), rel=1e-12)


def test_inputs_are_checked(models):
    from lmmjax.errors import LmmInputError

    model, _ = models["crossed"]
    with pytest.raises(LmmInputError, match="not a grouping factor"):
        build_bayes_model(model, marginalize=["nope"])
    with pytest.raises(LmmInputError, match="unknown prior parameter"):
        build_bayes_model(model, priors={"tau": {"scale": 1}})
    with pytest.raises(LmmInputError, match="fast path"):
        build_bayes_model(model, marginalize="all", fast_path=True)
    assert np.any(model.y <= 0)
    bad = np.sum(model.y <= 0)
    with pytest.raises(LmmInputError, match=f"strictly positive.*<= 0 in {bad} of"):
        build_bayes_model(model, likelihood="lognormal")


def test_prior_overrides(models):
    model, _ = models["slopes"]
    bm = build_bayes_model(
        model,
        priors={
            "beta": {"scale": 10},
            "beta[x]": {"loc": 1.0, "scale": 2.0},
            "sigma": {"dist": "HalfNormal", "scale": 3},
            "sd_g1": {"dist": "exponential", "rate": [1.0, 2.0]},
            "corr": {"eta": 4},
        },
        fixed_scales={"g2": 0.5},
    )
    pri = bm.spec.priors
    assert pri.beta.scale == (10.0, 2.0) and pri.beta.loc[1] == 1.0
    assert pri.sigma.family == "halfnormal" and pri.sigma.scale == (3.0,)
    k = [t.group for t in model.terms].index("g1")
    assert pri.sd[k].family == "exponential" and pri.sd[k].scale == (1.0, 0.5)
    assert pri.corr[k].scale == (4.0,)
    assert bm.spec.fixed_sd[1 - k] == (0.5,)
    assert "sd_g2" not in bm.site_shapes()

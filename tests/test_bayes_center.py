"""Centred sampling of the fixed effects: an exact change of coordinates, the same posterior."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmmjax.bayes import build_bayes_model
from lmmjax.bayes.model import centred_beta, user_beta
from lmmjax.datasets import load_bundled
from lmmjax.design import build_model

SLEEP = "Reaction ~ Days + (Days | Subject)"


@pytest.fixture(scope="module")
def pastes():
    df = load_bundled("Pastes").assign(x=lambda d: np.arange(len(d)) % 7 - 1.5)
    return build_model(df, "strength ~ x + cask + (1 | batch) + (1 | sample)")


def test_user_beta_is_the_dense_transformation(pastes):
    bm = build_bayes_model(pastes, marginalize="all", center=True)
    k, p, shift = bm.spec.intercept, bm.spec.p, np.asarray(bm.data.x_shift)
    assert k == 0 and shift[0] == 0.0
    np.testing.assert_allclose(shift[1:], np.asarray(pastes.X)[:, 1:].mean(axis=0))
    A = np.eye(p)
    A[k] -= shift  # X_c = X A has centred columns: X beta = X_c gamma with beta = A gamma
    Xc = np.asarray(pastes.X) @ A
    np.testing.assert_allclose(Xc[:, 1:].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(Xc[:, 0], 1.0, atol=1e-12)
    gamma = np.random.default_rng(0).standard_normal((3, 5, p))
    beta = np.asarray(user_beta(jnp.asarray(gamma), bm.data.x_shift, k))
    np.testing.assert_allclose(beta, gamma @ A.T, rtol=1e-13, atol=1e-12)
    back = np.asarray(centred_beta(jnp.asarray(beta), bm.data.x_shift, k))
    np.testing.assert_allclose(back, gamma, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("marginalize", ["all", "none", ["batch"]])
def test_centred_potential_is_the_uncentred_one(pastes, marginalize):
    """Same density at corresponding points (the map is linear with unit Jacobian)."""
    centred = build_bayes_model(pastes, marginalize=marginalize, center=True)
    plain = build_bayes_model(pastes, marginalize=marginalize, center=False)
    assert plain.spec.intercept == -1 and plain.data.x_shift is None
    params = jax.tree.map(lambda a: a[0], plain.init_params(jax.random.PRNGKey(2), 1))
    moved = {**params, "beta": centred_beta(params["beta"], centred.data.x_shift, 0)}
    assert float(centred.potential(moved)) == pytest.approx(float(plain.potential(params)),
                                                            rel=1e-11)  # fmt: skip


def test_centred_starting_points_map_back(pastes):
    centred = build_bayes_model(pastes, marginalize="all", center=True)
    plain = build_bayes_model(pastes, marginalize="all", center=False)
    key = jax.random.PRNGKey(5)
    start = user_beta(centred.init_params(key, 3)["beta"], centred.data.x_shift, 0)
    want = plain.init_params(key, 3)["beta"]
    np.testing.assert_allclose(np.asarray(start), np.asarray(want), rtol=1e-12)


def test_no_intercept_means_no_centring():
    df = load_bundled("sleepstudy")
    bm = build_bayes_model(build_model(df, "Reaction ~ 0 + Days + (1 | Subject)"), center=True)
    assert bm.spec.intercept == -1 and bm.data.x_shift is None
    bm = build_bayes_model(build_model(df, "Reaction ~ 1 + (1 | Subject)"), center=True)
    assert bm.spec.intercept == -1  # nothing to centre


@pytest.mark.slow
def test_centred_posterior_matches_the_uncentred_run():
    from test_bayes_posterior import SLEEP_VARS, assert_same_posterior, run

    model = build_model(load_bundled("sleepstudy"), SLEEP, categorical=["Subject"])
    fits = [run(model, "all", center=c) for c in (True, False)]
    assert fits[0].bm.spec.intercept == 0 and fits[1].bm.spec.intercept == -1
    assert_same_posterior(*fits, SLEEP_VARS)
    # user scale: the intercept is lme4's (251.4), not the centred one (~298.5)
    assert abs(float(fits[0].fixef["(Intercept)"]) - 251.4) < 10.0

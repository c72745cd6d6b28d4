"""The warm-up's starting inverse mass matrix: a dense check of the guess and its wiring."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lmmjax.bayes import build_bayes_model
from lmmjax.bayes.samplers import _inverse_mass, _nuts_kernels, _ravel, _sites, _unravel
from lmmjax.datasets import load_bundled
from lmmjax.design import build_model


@pytest.fixture(scope="module")
def sleep():
    model = build_model(load_bundled("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
    return model, build_bayes_model(model, marginalize="none", center=True)


def test_guess_is_the_least_squares_variance_in_centred_coordinates(sleep):
    model, bm = sleep
    X, y = np.asarray(model.X), np.asarray(model.y)
    Xc = X.copy()
    Xc[:, 1] -= X[:, 1].mean()  # the sampler's coordinates: Xc'Xc is diagonal
    coef = np.linalg.solve(Xc.T @ Xc, Xc.T @ y)
    s2 = np.mean((y - Xc @ coef) ** 2)
    guess = bm.inverse_mass_guess()
    np.testing.assert_allclose(guess["beta"], s2 * np.diag(np.linalg.inv(Xc.T @ Xc)), rtol=1e-10)
    assert float(guess["sigma"]) == pytest.approx(1 / (2 * 180))
    np.testing.assert_allclose(guess["sd_Subject"], 1 / 36)
    np.testing.assert_allclose(guess["L_Subject"], 1 / 18)
    np.testing.assert_allclose(guess["z_Subject"], 1.0)
    assert set(guess) == set(bm.site_shapes())


@pytest.mark.parametrize("dense", [False, True])
def test_nuts_starts_from_the_guess(sleep, dense):
    _, bm = sleep
    sites = _sites(bm)
    init, _ = _nuts_kernels(bm.spec, bm.data, sites=sites, num_warmup=10, target=0.8, depth=5,
                            dense=dense)  # fmt: skip
    z = _ravel(bm.init_params(jax.random.PRNGKey(0), 1), sites)[0]
    state = jax.jit(init)(z, jax.random.PRNGKey(1), _inverse_mass(bm, 1, dense)[0])
    want = np.asarray(ravel_pytree(bm.inverse_mass_guess())[0])
    got = np.asarray(state.adapt_state.inverse_mass_matrix)
    np.testing.assert_allclose(np.diag(got) if dense else got, want)
    assert np.isfinite(float(state.adapt_state.step_size))


def test_flat_positions_round_trip_and_keep_the_potential(sleep):
    """The sampler's flat vector holds the sites in NumPyro's ravel order; same potential."""
    from functools import partial

    from numpyro.infer.util import potential_energy

    from lmmjax.bayes.model import lmm_model

    _, bm = sleep
    sites = _sites(bm)
    z = bm.init_params(jax.random.PRNGKey(3), 2)
    flat = _ravel(z, sites)
    np.testing.assert_array_equal(flat[1], ravel_pytree(jax.tree.map(lambda a: a[1], z))[0])
    back = _unravel(flat, sites)
    assert set(back) == set(z)
    for k in z:
        np.testing.assert_array_equal(back[k], z[k])
    model = partial(lmm_model, spec=bm.spec)
    one = jax.tree.map(lambda a: a[0], z)
    want = potential_energy(model, (bm.data,), {}, one)
    got = potential_energy(model, (bm.data,), {}, _unravel(jax.numpy.asarray(flat[0]), sites))
    assert float(got) == float(want)

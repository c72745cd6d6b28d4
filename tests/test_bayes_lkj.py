"""The written-out LKJ prior of a 2 x 2 correlation against NumPyro's general one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions.transforms import CorrCholeskyTransform, biject_to

from lmmjax.bayes.lkj import LKJCholesky2, lkj_cholesky


@pytest.mark.parametrize("eta", [0.7, 1.0, 2.0, 5.0])
def test_density_and_transform_match_numpyro(eta):
    x = jnp.asarray(np.random.default_rng(1).normal(scale=2.0, size=(50, 1)))
    ours, theirs = LKJCholesky2(eta), dist.LKJCholesky(2, eta)
    t_ours, t_theirs = biject_to(ours.support), CorrCholeskyTransform()
    L, L_ref = t_ours(x), t_theirs(x)
    np.testing.assert_allclose(L, L_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(t_ours.inv(L), x, rtol=1e-9)
    got = ours.log_prob(L) + t_ours.log_abs_det_jacobian(x, L)
    want = theirs.log_prob(L_ref) + t_theirs.log_abs_det_jacobian(x, L_ref)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)

    def joint(d, t):
        return lambda v: jnp.sum(d.log_prob(t(v)) + t.log_abs_det_jacobian(v, t(v)))

    g, g_ref = jax.grad(joint(ours, t_ours))(x), jax.grad(joint(theirs, t_theirs))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-10)


def test_density_integrates_to_one_and_draws_follow_it():
    eta = 3.0
    rho = np.linspace(-1 + 1e-9, 1 - 1e-9, 200_001)
    L = jnp.stack([jnp.stack([jnp.ones_like(rho), jnp.zeros_like(rho)], -1),
                   jnp.stack([rho, np.sqrt(1 - rho**2)], -1)], -2)  # fmt: skip
    dens = np.exp(np.asarray(LKJCholesky2(eta).log_prob(L)))
    assert np.trapezoid(dens, rho) == pytest.approx(1.0, abs=1e-6)
    draws = LKJCholesky2(eta).sample(jax.random.PRNGKey(0), (20_000,))
    r = np.asarray(draws[:, 1, 0])
    # (rho + 1) / 2 ~ Beta(eta, eta): variance 1 / (2 eta + 1) for rho
    assert np.var(r) == pytest.approx(1 / (2 * eta + 1), rel=0.05)
    np.testing.assert_allclose(np.asarray(draws[:, 1, 1]) ** 2 + r**2, 1.0, atol=1e-12)


def test_general_dimensions_stay_numpyro():
    assert isinstance(lkj_cholesky(2, 2.0, jnp.float64), LKJCholesky2)
    assert isinstance(lkj_cholesky(3, 2.0, jnp.float64), dist.LKJCholesky)

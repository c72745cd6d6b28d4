"""The LKJ prior of a 2 x 2 correlation matrix's Cholesky factor, written out.

NumPyro's ``LKJCholesky`` and ``CorrCholeskyTransform`` serve any dimension
through signed stick breaking. For d = 2 (a random intercept and slope, the
commonest correlated term) they are a large share of a small model's
potential: the value and gradient of dillonE1's (two such terms) had 1,475
operations in its jaxpr with them and 913 with this module. With one
correlation ``rho = tanh(x)`` everything is closed form:

* ``L = [[1, 0], [rho, sqrt(1 - rho^2)]]``, and ``sqrt(1 - rho^2) = sech(x)``;
* ``(rho + 1) / 2 ~ Beta(eta, eta)``, so ``log p(L) = (eta - 1) log(1 - rho^2)
  - (2 eta - 1) log 2 - log B(eta, eta)`` (the map from ``L``'s free element
  to the correlation has unit Jacobian for d = 2);
* ``log |d rho / d x| = log(1 - tanh(x)^2)``.

These are NumPyro's own density and transform for d = 2, to rounding (a test
compares them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import scipy.special
from jax.scipy.special import betaln
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform, biject_to

__all__ = ["LKJCholesky2", "lkj_cholesky"]


class _CorrCholesky2(constraints._CorrCholesky):
    """Lower Cholesky factors of 2 x 2 correlation matrices (a type of its own for biject_to)."""


corr_cholesky_2 = _CorrCholesky2()


def _log_sech(x):
    """``log(sech(x))``, stable for large ``|x|``."""
    a = jnp.abs(x)
    return jnp.log(2.0) - a - jnp.log1p(jnp.exp(-2.0 * a))


class TanhCorrCholesky2(Transform):
    """``x (..., 1) -> [[1, 0], [tanh x, sech x]] (..., 2, 2)``."""

    domain = constraints.real_vector
    codomain = corr_cholesky_2

    def __call__(self, x):
        r, s = jnp.tanh(x[..., 0]), jnp.exp(_log_sech(x[..., 0]))
        one, zero = jnp.ones_like(r), jnp.zeros_like(r)
        return jnp.stack([jnp.stack([one, zero], -1), jnp.stack([r, s], -1)], -2)

    def _inverse(self, y):
        return jnp.arctanh(y[..., 1, 0])[..., None]

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        # log(1 - tanh(x)^2) = 2 log sech(x) = 2 log y[1, 1]: reuse the forward's value
        return 2.0 * (_log_sech(x[..., 0]) if y is None else jnp.log(y[..., 1, 1]))

    def forward_shape(self, shape):
        return shape[:-1] + (2, 2)

    def inverse_shape(self, shape):
        return shape[:-2] + (1,)

    def tree_flatten(self):
        return (), ((), {})

    def __eq__(self, other):
        return isinstance(other, TanhCorrCholesky2)


@biject_to.register(corr_cholesky_2)
def _transform_to_corr_cholesky_2(constraint):
    return TanhCorrCholesky2()


def _log_normalizer(eta):
    """``(2 eta - 1) log 2 + log B(eta, eta)``, on the host when ``eta`` is a constant.

    (JAX's ``betaln`` is about 50 operations in a traced potential, though its
    argument is a prior's constant.)
    """
    try:
        e = np.asarray(eta, dtype=float)
    except jax.errors.TracerArrayConversionError:
        return (2.0 * eta - 1.0) * jnp.log(2.0) + betaln(eta, eta)
    return (2.0 * e - 1.0) * np.log(2.0) + scipy.special.betaln(e, e)


class LKJCholesky2(dist.Distribution):
    """NumPyro's ``LKJCholesky(2, concentration)``, written out (see the module docstring).

    Parameters
    ----------
    concentration : float or array
        ``eta``; 1 is uniform over correlations, larger values shrink them to 0.
    """

    arg_constraints = {"concentration": constraints.positive}
    support = corr_cholesky_2
    reparametrized_params = ["concentration"]

    def __init__(self, concentration=1.0, *, validate_args=None):
        self.concentration = concentration  # a constant stays on the host: _log_normalizer
        super().__init__(batch_shape=jnp.shape(concentration), event_shape=(2, 2),
                         validate_args=validate_args)  # fmt: skip

    def log_prob(self, value):
        eta = self.concentration
        log_l22 = jnp.log(value[..., 1, 1])  # sqrt(1 - rho^2)
        out = 2.0 * (eta - 1.0) * log_l22 - _log_normalizer(eta)
        return jnp.asarray(out, dtype=value.dtype)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        rho = 2.0 * jax.random.beta(key, self.concentration, self.concentration, shape) - 1.0
        zero, one = jnp.zeros_like(rho), jnp.ones_like(rho)
        rows = [jnp.stack([one, zero], -1), jnp.stack([rho, jnp.sqrt(1.0 - rho * rho)], -1)]
        return jnp.stack(rows, -2)


def lkj_cholesky(d: int, eta, dtype) -> dist.Distribution:
    """The LKJ prior of a d x d correlation's Cholesky factor: written out for d = 2.

    ``eta`` a constant (a float or NumPy array) or a JAX array; ``dtype`` the
    model's float type.
    """
    if d == 2:
        return LKJCholesky2(eta if isinstance(eta, jax.Array) else np.asarray(eta, dtype))
    return dist.LKJCholesky(d, jnp.asarray(eta, dtype))

"""The host L-BFGS of small REML/ML fits (lmmjax.reml.lbfgs), against analytic minima and SciPy."""

import numpy as np
import pytest
import scipy.optimize

from lmmjax.reml import lbfgs


def _rosenbrock(x):
    value = 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2
    grad = np.array([-400.0 * x[0] * (x[1] - x[0] ** 2) - 2.0 * (1.0 - x[0]),
                     200.0 * (x[1] - x[0] ** 2)])  # fmt: skip
    return value, grad


def _gradient_below(tol):
    return lambda value, grad: np.max(np.abs(grad)) <= tol


def test_rosenbrock_reaches_its_minimum():
    stop = _gradient_below(1e-9)
    res = lbfgs.minimize(_rosenbrock, np.array([-1.2, 1.0]), maxiter=200, stop=stop)
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-7)
    assert res.fun < 1e-14
    assert res.nfev < 100  # SciPy's L-BFGS-B takes about 45 evaluations from this start


def test_quadratic_minimiser_is_the_linear_solve(rng):
    n = 12
    a = rng.normal(size=(n, n))
    A = a @ a.T + n * np.eye(n)
    b = rng.normal(size=n)

    def quad(x):
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    res = lbfgs.minimize(quad, np.zeros(n), maxiter=500, stop=_gradient_below(1e-10))
    # the relative-decrease test (1e-14) may end it first, at an error of about
    # sqrt(1e-14 |f| / lambda_min) here
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), atol=1e-7)
    assert res.nit < 3 * n


def test_same_minimum_as_scipy_on_a_smooth_problem(rng):
    """A sum of softplus terms with a ridge: one minimum, compared with SciPy's L-BFGS-B."""
    n = 6
    W, c = rng.normal(size=(30, n)), rng.normal(size=30)

    def fun(x):
        z = W @ x - c
        value = np.sum(np.logaddexp(0.0, z)) + 0.5 * x @ x
        return value, W.T @ (1.0 / (1.0 + np.exp(-z))) + x

    x0 = rng.normal(size=n)
    ours = lbfgs.minimize(fun, x0, maxiter=200, stop=_gradient_below(1e-10))
    ref = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 0.0})  # fmt: skip
    np.testing.assert_allclose(ours.x, ref.x, atol=1e-8)
    assert ours.fun == pytest.approx(ref.fun, abs=1e-12)


def test_line_search_steps_back_from_non_finite_values():
    """``x - log x`` (minimum at 1) is infinite at x <= 0, where the first step lands."""

    def fun(x):
        if x[0] <= 0.0:
            return np.inf, np.full(1, np.nan)
        return x[0] - np.log(x[0]), np.array([1.0 - 1.0 / x[0]])

    res = lbfgs.minimize(fun, np.array([0.02]), maxiter=100, stop=_gradient_below(1e-10))
    assert res.x[0] == pytest.approx(1.0, abs=1e-9)
    assert np.isfinite(res.fun)


def test_stop_is_asked_first_and_maxiter_holds():
    x0 = np.array([-1.2, 1.0])
    none = lbfgs.minimize(_rosenbrock, x0, maxiter=50, stop=lambda v, g: True)
    assert none.nit == 0 and none.nfev == 1
    np.testing.assert_array_equal(none.x, x0)
    three = lbfgs.minimize(_rosenbrock, x0, maxiter=3, stop=_gradient_below(0.0))
    assert three.nit == 3
    assert three.fun < _rosenbrock(x0)[0]


def test_a_flat_function_stops_without_progress():
    res = lbfgs.minimize(lambda x: (1.0, np.zeros(2)), np.ones(2), maxiter=10,
                        stop=_gradient_below(-1.0))  # fmt: skip
    assert res.nit == 0

"""LAPACK's potri through the typed FFI (``lmmjax.lapack``) against NumPy's inverse.

Orders from ``POTRI_MIN`` up take the foreign call on the CPU; smaller ones
the triangular solves. Both must give ``(L L')^{-1}`` and the same
derivatives, batched or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmmjax.lapack import POTRI_MIN, TARGET, _by_solves, register, spd_inverse
from lmmjax.linalg import lapack_blocks, logdet_quad


def _spd(rng, n, batch=()):
    X = rng.normal(size=(*batch, n, 2 * n))
    return X @ np.swapaxes(X, -1, -2) / n + np.eye(n)


def _lower_with_garbage(rng, A):
    """A's Cholesky factor with noise above the diagonal, which must not be read."""
    L = np.linalg.cholesky(A)
    return jnp.asarray(L + np.triu(rng.normal(size=L.shape), 1))


def test_the_target_registers_on_this_cpu():
    assert register()


@pytest.mark.parametrize("n", [5, POTRI_MIN + 3])
def test_inverse_matches_numpy(rng, n):
    A = _spd(rng, n)
    ours = jax.jit(spd_inverse)(_lower_with_garbage(rng, A))
    np.testing.assert_allclose(ours, np.linalg.inv(A), rtol=1e-10, atol=1e-12)
    if n >= POTRI_MIN:  # potri's inverse is symmetrised exactly
        np.testing.assert_array_equal(ours, np.swapaxes(ours, -1, -2))


def test_batched_and_vmapped_inverses(rng):
    A = _spd(rng, POTRI_MIN, batch=(3,))
    L = jnp.asarray(np.linalg.cholesky(A))
    for f in (jax.jit(spd_inverse), jax.jit(jax.vmap(spd_inverse))):
        np.testing.assert_allclose(f(L), np.linalg.inv(A), rtol=1e-10, atol=1e-12)


def test_float32_inverse_is_single_precision_accurate(rng):
    A = _spd(rng, POTRI_MIN)
    ours = jax.jit(spd_inverse)(jnp.asarray(np.linalg.cholesky(A), jnp.float32))
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, np.linalg.inv(A), rtol=1e-4, atol=1e-5)


def test_derivatives_match_the_triangular_solves(rng):
    n = POTRI_MIN + 1
    L = _lower_with_garbage(rng, _spd(rng, n))
    dL = jnp.asarray(np.tril(rng.normal(size=(n, n))))  # a Cholesky factor's tangent
    weights = jnp.asarray(rng.normal(size=(n, n)))

    def loss(inverse):
        return lambda L: jnp.sum(weights * jnp.sin(inverse(L)))

    ours, ref = jax.grad(loss(spd_inverse)), jax.grad(loss(_by_solves))
    # L's upper triangle is never read: ours is zero there, the solves' rule is not
    g = np.asarray(jax.jit(ours)(L))
    np.testing.assert_array_equal(np.triu(g, 1), 0.0)
    np.testing.assert_allclose(g, np.tril(ref(L)), rtol=1e-9, atol=1e-12)
    hvp = jax.jvp(ours, (L,), (dL,))[1]  # forward over reverse, as Satterthwaite's Hessian
    hvp_ref = np.tril(jax.jvp(ref, (L,), (dL,))[1])
    np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-8, atol=1e-10)


def test_a_zero_pivot_gives_nan_not_garbage(rng):
    L = np.linalg.cholesky(_spd(rng, POTRI_MIN))
    L[7, 7] = 0.0
    assert np.isnan(np.asarray(jax.jit(spd_inverse)(jnp.asarray(L)))).all()


@pytest.mark.parametrize("q", [2, 12, POTRI_MIN + 2])
def test_logdet_quad_lower_reads_and_differentiates_the_lower_triangle(rng, q):
    A = _spd(rng, q)
    R = jnp.asarray(rng.normal(size=(q, 3)))
    weights = jnp.asarray(rng.normal(size=(3, 3)))
    garbage = jnp.asarray(np.tril(A) + np.triu(rng.normal(size=A.shape), 1))

    def objective(lower):
        def f(A):
            ld, Q = logdet_quad(A, R, lower=lower)
            return 0.7 * ld + jnp.sum(weights * Q)

        return f

    full, lower = objective(False), objective(True)
    assert float(lower(garbage)) == pytest.approx(float(full(jnp.asarray(A))), rel=1e-12)
    # the lower form's gradient, symmetrised, is the symmetric gradient
    g = np.asarray(jax.grad(lower)(garbage))
    np.testing.assert_array_equal(np.triu(g, 1), 0.0)
    sym = (g + g.T) / 2
    np.testing.assert_allclose(sym, jax.grad(full)(jnp.asarray(A)), rtol=1e-9, atol=1e-12)


def test_logdet_quad_lower_with_lapack_blocks_reads_the_lower_triangle(rng):
    """Inside ``lapack_blocks()`` even a 2 x 2 block is factored by LAPACK: lower only."""
    A = _spd(rng, 2)
    R = jnp.asarray(rng.normal(size=(2, 1)))
    garbage = jnp.asarray(np.tril(A) + np.triu(np.full_like(A, 99.0), 1))
    want = logdet_quad(jnp.asarray(A), R)
    with lapack_blocks():
        got = jax.jit(lambda a: logdet_quad(a, R, lower=True))(garbage)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)


@pytest.mark.parametrize("q", [12, POTRI_MIN + 2])
def test_logdet_quad_lower_second_derivatives_read_the_lower_triangle(rng, q):
    """Hessians (Satterthwaite, Kenward-Roger) through the lower form equal the symmetric
    form's, whatever the upper triangle of the matrix and of its tangents holds."""
    A = _spd(rng, q)
    R = jnp.asarray(rng.normal(size=(q, 2)))
    noise = jnp.asarray(np.triu(rng.normal(size=A.shape), 1))
    D = jnp.asarray(rng.normal(size=A.shape))
    D = (D + D.T) / q  # a symmetric direction, as theta moves a symmetric block

    def along(lower, upper):
        def f(t):  # the block at A + t D, its upper triangle replaced by garbage when lower
            M = jnp.asarray(A) + t * D
            M = jnp.tril(M) + upper * t if lower else M
            ld, Q = logdet_quad(M, R, lower=lower)
            return ld + jnp.sum(Q)

        return f

    full, lower = along(False, None), along(True, noise)
    second = [jax.grad(jax.grad(f))(0.3) for f in (full, lower)]
    np.testing.assert_allclose(second[1], second[0], rtol=1e-9)
    hess = [jax.jacrev(jax.grad(f))(0.3) for f in (full, lower)]  # reverse over reverse
    np.testing.assert_allclose(hess[1], hess[0], rtol=1e-9)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the handler is the CPU's")
def test_handler_errors_are_raised_not_crashes():
    """Input the handler cannot take comes back from XLA as an error naming the target."""
    register()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((3, 3), jnp.int32))
    with pytest.raises(Exception, match="lmmjax_potri takes float32 or float64"):
        jax.block_until_ready(jax.jit(call)(jnp.eye(3, dtype=jnp.int32)))

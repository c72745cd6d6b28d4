"""The blocked factorisation against a dense N x N reference on small random designs.

For each design the dense matrices are built here with NumPy: Z from
``Term.dense()``, Lambda as ``blockdiag_l kron(I_{M_l}, Lambda_l)``, and
``A = Lambda' Z' Z Lambda + I``. The blocked kernels run under ``jax.jit``
with the Structure passed as an argument (it is a pytree).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lmmjax.likelihood import profiled_objective
from lmmjax.linalg import (
    blocked_to_terms,
    build_structure,
    factorize,
    lambda_zt,
    logdet,
    make_lambdas,
    solve_lower,
    solve_upper,
    z_lambda,
)
from lmmjax.terms import Term

RTOL = 1e-10

# --------------------------------------------------------------------------------------
# random designs
# --------------------------------------------------------------------------------------

# name -> (N, [(levels M, d, intercept?) per term, in decreasing M], how refs are drawn)
CASES = {
    "one_term_d1": (50, [(12, 1, True)], "random"),
    "one_term_d2": (80, [(15, 2, True)], "random"),
    "two_crossed": (100, [(20, 1, True), (7, 1, True)], "balanced"),
    "nested": (108, [(18, 1, True), (6, 1, True)], "nested"),
    "slopes_then_crossed": (120, [(15, 2, True), (6, 1, True)], "random"),
    "rest_has_slopes": (100, [(20, 1, True), (6, 2, True)], "random"),
    "three_terms": (120, [(16, 2, True), (8, 1, False), (5, 2, True)], "random"),
}


def draw_refs(rng, n: int, levels: list[int], kind: str) -> list[np.ndarray]:
    """Level index per row for each term; every level is used at least once."""
    if kind == "nested":  # inner factor with 3 levels inside each of M2 outer levels
        inner = rng.permutation(np.arange(n) % levels[0])
        return [inner, inner // (levels[0] // levels[1])]
    if kind == "balanced":  # equal counts: the Gram blocks of term 1 coincide
        return [np.arange(n) % levels[0], rng.permutation(np.arange(n) % levels[1])]
    out = []
    for m in levels:
        refs = np.concatenate([np.arange(m), rng.integers(0, m, size=n - m)])
        out.append(rng.permutation(refs))
    return out


def draw_lambda(rng, d: int) -> np.ndarray:
    """Random lower-triangular relative factor with a negative off-diagonal."""
    lam = np.diag(rng.uniform(0.3, 1.5, size=d))
    for i in range(1, d):
        for j in range(i):
            lam[i, j] = rng.normal(scale=0.6)
    if d > 1:
        lam[1, 0] = -abs(lam[1, 0]) - 0.1
    return lam


def _lower_cols(lam: np.ndarray) -> np.ndarray:
    """lme4's theta for one term: Lambda's lower triangle, column by column."""
    d = lam.shape[0]
    return np.array([lam[i, j] for j in range(d) for i in range(j, d)])


def make_case(name: str, seed: int = 7):
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n, spec, kind = CASES[name]
    refs = draw_refs(rng, n, [m for m, _, _ in spec], kind)
    terms, lams = [], []
    for k, ((m, d, intercept), ref) in enumerate(zip(spec, refs, strict=True)):
        cols = [np.ones(n)] if intercept else []
        cols += [rng.normal(size=n) for _ in range(d - len(cols))]
        z = np.column_stack(cols)
        names = tuple(f"c{c}" for c in range(d))
        levels = tuple(f"L{j}" for j in range(m))
        terms.append(Term(f"g{k}", names, levels, ref.astype(np.int32), z))
        lams.append(draw_lambda(rng, d))
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.uniform(-1, 1, size=n)])
    Z = np.hstack([t.dense() for t in terms])
    Lam = scipy.linalg.block_diag(
        *[np.kron(np.eye(t.nlevels), lam) for t, lam in zip(terms, lams, strict=True)]
    )
    b = Lam @ rng.normal(size=Z.shape[1])
    y = X @ np.array([1.0, -0.5, 2.0]) + 1.3 * Z @ b + rng.normal(size=n)
    theta = np.concatenate([_lower_cols(lam) for lam in lams])
    return {
        "terms": terms,
        "lams": lams,
        "theta": theta,
        "X": X,
        "y": y,
        "Z": Z,
        "Lam": Lam,
        "rng": rng,
    }


def dense_objective(Z, Lam, X, y, reml: bool) -> float:
    """lme4's profiled criterion from the N x N marginal covariance V = I + Z Lam Lam' Z'."""
    n, p = X.shape
    ZL = Z @ Lam
    V = np.eye(n) + ZL @ ZL.T
    cV = scipy.linalg.cho_factor(V)
    ViX, Viy = scipy.linalg.cho_solve(cV, X), scipy.linalg.cho_solve(cV, y)
    XtViX = X.T @ ViX
    beta = np.linalg.solve(XtViX, X.T @ Viy)
    r = y - X @ beta
    r2 = r @ scipy.linalg.cho_solve(cV, r)
    logdet_v = np.linalg.slogdet(V)[1]
    if reml:
        return (
            logdet_v
            + np.linalg.slogdet(XtViX)[1]
            + (n - p) * (1 + np.log(2 * np.pi * r2 / (n - p)))
        )
    return logdet_v + n * (1 + np.log(2 * np.pi * r2 / n))


# --------------------------------------------------------------------------------------
# the blocked kernels, jitted once per shape with the structure as an argument
# --------------------------------------------------------------------------------------


@jax.jit
def blocked_quantities(theta, struct, c1, c2, r, u1, u2):
    """The blocked kernels and objectives the tests compare, compiled once per shape."""
    lambdas = make_lambdas(theta, struct.layout)
    factor = factorize(struct, lambdas)
    w1, w2 = solve_lower(struct, factor, c1, c2)
    x1, x2 = solve_upper(struct, factor, w1, w2)
    return {
        "lambdas": lambdas,
        "logdet": logdet(factor),
        "w": (w1, w2),
        "x": (x1, x2),
        "lzt": lambda_zt(struct, lambdas, r),
        "lzt_vec": lambda_zt(struct, lambdas, r[:, 0]),
        "zl": z_lambda(struct, lambdas, u1, u2),
        "objective_reml": profiled_objective(theta, struct, True),
        "objective_ml": profiled_objective(theta, struct, False),
    }


def _weighted_objective(theta, struct, weights):
    """``weights[0] * REML + weights[1] * ML``: one compiled gradient serves both."""
    reml = profiled_objective(theta, struct, True)
    ml = profiled_objective(theta, struct, False)
    return weights[0] * reml + weights[1] * ml


objective_and_grad = jax.jit(jax.value_and_grad(_weighted_objective))
WEIGHTS = {True: jnp.array([1.0, 0.0]), False: jnp.array([0.0, 1.0])}


def objective(theta: np.ndarray, struct, reml: bool) -> tuple[float, np.ndarray]:
    value, grad = objective_and_grad(jnp.asarray(theta), struct, WEIGHTS[reml])
    return float(value), np.asarray(grad)


def flat(x1, x2) -> np.ndarray:
    """Blocked (M1, d1, k), (q_rest, k) -> the dense (q, k) level-major layout."""
    x1 = np.asarray(x1)
    return np.concatenate([x1.reshape(-1, x1.shape[-1]), np.asarray(x2)], axis=0)


def split(v: np.ndarray, terms) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Dense (q, k) -> blocked form."""
    q1 = terms[0].q
    return jnp.asarray(v[:q1].reshape(terms[0].nlevels, terms[0].d, -1)), jnp.asarray(v[q1:])


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def computed(name: str) -> dict:
    """Everything the tests of one design compare, computed once."""
    case = make_case(name)
    terms, Z, Lam, rng = case["terms"], case["Z"], case["Lam"], case["rng"]
    n, q = Z.shape
    struct = build_structure(terms, case["X"], case["y"])
    c = rng.normal(size=(q, 3))
    r = rng.normal(size=(n, 2))
    u = rng.normal(size=(q, 2))
    args = (struct, *split(c, terms), jnp.asarray(r), *split(u, terms))
    out = blocked_quantities(jnp.asarray(case["theta"]), *args)
    A = Lam.T @ Z.T @ Z @ Lam + np.eye(q)
    return {**case, "struct": struct, "args": args, "c": c, "r": r, "u": u, "A": A, "out": out}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return computed(request.param)


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


def test_structure_is_a_pytree_with_static_layout(case):
    struct = case["struct"]
    leaves, treedef = jax.tree_util.tree_flatten(struct)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.layout == struct.layout
    terms = case["terms"]
    assert struct.layout.q_rest == sum(t.q for t in terms[1:])
    assert struct.layout.p == 3
    assert struct.layout.ntheta == sum(t.ntheta for t in terms) == case["theta"].size


def test_make_lambdas(case):
    for got, lam in zip(case["out"]["lambdas"], case["lams"], strict=True):
        np.testing.assert_array_equal(np.asarray(got), lam)


def test_logdet_matches_dense(case):
    sign, expected = np.linalg.slogdet(case["A"])
    assert sign == 1.0
    assert abs(float(case["out"]["logdet"]) - expected) <= RTOL * abs(expected)


def test_solve_lower_is_the_cholesky_solve(case):
    w = flat(*case["out"]["w"])
    c, A = case["c"], case["A"]
    # ||L^{-1} c||^2 = c' A^{-1} c, column by column
    quad = np.einsum("ik,ik->k", c, np.linalg.solve(A, c))
    np.testing.assert_allclose(np.sum(w**2, axis=0), quad, rtol=RTOL)
    # the blocked L is lower triangular with a positive diagonal, so it is A's Cholesky factor
    L = np.linalg.cholesky(A)
    assert rel(w, scipy.linalg.solve_triangular(L, c, lower=True)) <= RTOL


def test_solve_upper_after_lower_is_inverse(case):
    x = flat(*case["out"]["x"])
    assert rel(x, np.linalg.solve(case["A"], case["c"])) <= RTOL


def test_lambda_zt(case):
    expected = case["Lam"].T @ case["Z"].T @ case["r"]
    assert rel(flat(*case["out"]["lzt"]), expected) <= RTOL
    assert rel(flat(*case["out"]["lzt_vec"])[:, 0], expected[:, 0]) <= RTOL


def test_z_lambda(case):
    expected = case["Z"] @ case["Lam"] @ case["u"]
    assert rel(case["out"]["zl"], expected) <= RTOL


def test_blocked_to_terms(case):
    terms, c = case["terms"], case["c"]
    pieces = blocked_to_terms(case["struct"], *split(c, terms))
    offset = 0
    for t, piece in zip(terms, pieces, strict=True):
        assert piece.shape == (t.nlevels, t.d, c.shape[1])
        np.testing.assert_array_equal(np.asarray(piece).reshape(t.q, -1), c[offset : offset + t.q])
        offset += t.q


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_profiled_objective_matches_dense(case, reml):
    got = float(case["out"]["objective_reml" if reml else "objective_ml"])
    expected = dense_objective(case["Z"], case["Lam"], case["X"], case["y"], reml)
    assert abs(got - expected) <= RTOL * abs(expected)


# Compiling the gradient costs 1-4 s per design on a 2-core CPU, so the default run
# checks it on three designs that between them cover every block shape; the others
# run with ``-m slow``.
GRAD_CASES = ("one_term_d2", "two_crossed", "three_terms")


@pytest.mark.parametrize(
    "name",
    [n if n in GRAD_CASES else pytest.param(n, marks=pytest.mark.slow) for n in CASES],
)
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_gradient_matches_central_differences(name, reml):
    case = computed(name)
    theta, struct = case["theta"], case["struct"]
    value, grad = objective(theta, struct, reml)
    assert value == pytest.approx(float(case["out"]["objective_reml" if reml else "objective_ml"]))
    _, grad = objective(theta, struct, reml)
    h = 1e-5
    fd = np.empty(theta.size)
    for k in range(theta.size):
        step = h * np.eye(theta.size)[k]
        fd[k] = (
            objective(theta + step, struct, reml)[0] - objective(theta - step, struct, reml)[0]
        ) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5 * np.linalg.norm(fd))


def test_objective_on_the_boundary():
    """Theta with zero diagonal entries (a singular fit) stays finite and exact."""
    case = computed("three_terms")
    theta = case["theta"].copy()
    theta[2] = 0.0  # Lambda_1[1, 1]: the slope of term 1 fully correlated
    theta[3] = 0.0  # term 2 switched off
    lams = [np.zeros((t.d, t.d)) for t in case["terms"]]
    k = 0
    for t, lam in zip(case["terms"], lams, strict=True):
        rows, cols = t.theta_index()
        lam[rows, cols] = theta[k : k + t.ntheta]
        k += t.ntheta
    blocks = [np.kron(np.eye(t.nlevels), lam) for t, lam in zip(case["terms"], lams, strict=True)]
    Lam = scipy.linalg.block_diag(*blocks)
    # same shapes as before: the compiled functions are reused
    out = blocked_quantities(jnp.asarray(theta), *case["args"])
    expected = np.linalg.slogdet(Lam.T @ case["Z"].T @ case["Z"] @ Lam + np.eye(Lam.shape[0]))[1]
    assert abs(float(out["logdet"]) - expected) <= RTOL * abs(expected)
    for reml in (True, False):
        value = float(out["objective_reml" if reml else "objective_ml"])
        expected = dense_objective(case["Z"], Lam, case["X"], case["y"], reml)
        assert abs(value - expected) <= RTOL * abs(expected)
        assert np.all(np.isfinite(objective(theta, case["struct"], reml)[1]))


def test_structure_without_fixed_effects():
    """build_structure without X, y serves the factorisation alone."""
    case = computed("slopes_then_crossed")
    struct = build_structure(case["terms"])
    assert struct.layout.p == -1
    got = jax.jit(lambda th, st: logdet(factorize(st, make_lambdas(th, st.layout))))(
        jnp.asarray(case["theta"]), struct
    )
    expected = np.linalg.slogdet(case["A"])[1]
    assert abs(float(got) - expected) <= RTOL * abs(expected)


def test_no_terms_is_an_error():
    with pytest.raises(ValueError, match="at least one random-effect term"):
        build_structure([])


def test_logdet_quad_gradient_matches_autodiff_through_cholesky(rng):
    from lmmjax.linalg.dense import logdet_quad

    q, k = 12, 3
    B = rng.normal(size=(q, q))
    A = jnp.asarray(B @ B.T / q + np.eye(q))
    R = jnp.asarray(rng.normal(size=(q, k)))
    weights = jnp.asarray(rng.normal(size=(k, k)))

    def custom(A, R):
        ld, Q = logdet_quad(A, R)
        return 0.7 * ld + jnp.sum(weights * Q)

    def plain(A, R):
        L = jnp.linalg.cholesky(A)
        W = jax.scipy.linalg.solve_triangular(L, R, lower=True)
        return 0.7 * 2.0 * jnp.sum(jnp.log(jnp.diag(L))) + jnp.sum(weights * (W.T @ W))

    assert float(custom(A, R)) == pytest.approx(float(plain(A, R)), rel=1e-12)
    for ours, ref in zip(
        jax.grad(custom, (0, 1))(A, R), jax.grad(plain, (0, 1))(A, R), strict=True
    ):
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)

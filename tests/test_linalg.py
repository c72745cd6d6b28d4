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

from lmmjax.linalg import (
    build_structure,
    cholesky,
    column_map,
    conditional_moments,
    cross_products,
    dense_gram,
    eigen_gls_gram,
    eigen_moments,
    eigen_precompute,
    factorize,
    gls_gram,
    lapack_blocks,
    linear_predictor,
    logdet,
    logdet_quad,
    make_lambdas,
    rows_scalable,
    scale_rows,
    small,
    small_system,
    tri_solve,
    z_times,
)
from lmmjax.reml.objective import profiled_objective
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
    # a scalar rest block of order >= lmmjax.lapack.POTRI_MIN: LAPACK's potri in the gradient
    # and the Schur block assembled in its lower triangle only, as for InstEval
    "big_scalar_rest": (1500, [(400, 1, True), (260, 1, True), (8, 1, True)], "random"),
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
def blocked_quantities(theta, struct, xpy, M, r, effects):
    """The blocked kernels and objectives the tests compare, compiled once per shape."""
    lambdas = make_lambdas(theta, struct)
    xm = cross_products(struct, M)
    xr = cross_products(struct, r)
    sigma = 1.7
    return {
        "lambdas": lambdas,
        "logdet": logdet(factorize(struct, lambdas)),
        "xm": xm,
        "gls": gls_gram(struct, lambdas, xm),
        "moments": conditional_moments(struct, lambdas, xr, sigma, cov=True, chunk=5),
        "zb": z_times(struct.refs, struct.z, effects),
        "objective_reml": profiled_objective(theta, struct, xpy, True),
        "objective_ml": profiled_objective(theta, struct, xpy, False),
    }


def _weighted_objective(theta, struct, xpy, weights):
    """``weights[0] * REML + weights[1] * ML``: one compiled gradient serves both."""
    reml = profiled_objective(theta, struct, xpy, True)
    ml = profiled_objective(theta, struct, xpy, False)
    return weights[0] * reml + weights[1] * ml


objective_and_grad = jax.jit(jax.value_and_grad(_weighted_objective))
WEIGHTS = {True: jnp.array([1.0, 0.0]), False: jnp.array([0.0, 1.0])}


def objective(theta: np.ndarray, case, reml: bool) -> tuple[float, np.ndarray]:
    value, grad = objective_and_grad(jnp.asarray(theta), case["struct"], case["xpy"], WEIGHTS[reml])
    return float(value), np.asarray(grad)


def flat(x1, x2) -> np.ndarray:
    """Blocked (M1, d1, k), (q_rest, k) -> the dense (q, k) level-major layout."""
    x1 = np.asarray(x1)
    return np.concatenate([x1.reshape(-1, x1.shape[-1]), np.asarray(x2)], axis=0)


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def computed(name: str) -> dict:
    """Everything the tests of one design compare, computed once."""
    case = make_case(name)
    terms, Z, Lam, rng = case["terms"], case["Z"], case["Lam"], case["rng"]
    n, q = Z.shape
    struct = build_structure(terms)
    xpy = cross_products(struct, np.column_stack([case["X"], case["y"]]))
    M = rng.normal(size=(n, 3))
    r = rng.normal(size=n)
    effects = tuple(jnp.asarray(rng.normal(size=(t.nlevels, t.d))) for t in terms)
    args = (struct, xpy, jnp.asarray(M), jnp.asarray(r), effects)
    out = blocked_quantities(jnp.asarray(case["theta"]), *args)
    A = Lam.T @ Z.T @ Z @ Lam + np.eye(q)
    return {**case, "struct": struct, "xpy": xpy, "args": args, "M": M, "r": r,
            "effects": effects, "A": A, "out": out}  # fmt: skip


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
    assert struct.layout.ntheta == sum(t.ntheta for t in terms) == case["theta"].size


def test_make_lambdas(case):
    for got, lam in zip(case["out"]["lambdas"], case["lams"], strict=True):
        np.testing.assert_array_equal(np.asarray(got), lam)


def test_logdet_matches_dense(case):
    sign, expected = np.linalg.slogdet(case["A"])
    assert sign == 1.0
    assert abs(float(case["out"]["logdet"]) - expected) <= RTOL * abs(expected)


def test_cross_products_and_dense_gram(case):
    Z, M = case["Z"], case["M"]
    xm = case["out"]["xm"]
    assert rel(flat(xm.first, xm.rest), Z.T @ M) <= RTOL
    assert rel(xm.gram, M.T @ M) <= RTOL
    np.testing.assert_allclose(dense_gram(case["struct"]), Z.T @ Z, rtol=0, atol=1e-12)


def test_gls_gram_is_woodbury(case):
    Z, Lam, M = case["Z"], case["Lam"], case["M"]
    V = np.eye(Z.shape[0]) + Z @ Lam @ Lam.T @ Z.T
    logdet_v, gram = case["out"]["gls"]
    expected = np.linalg.slogdet(V)[1]
    assert abs(float(logdet_v) - expected) <= RTOL * abs(expected)
    assert rel(gram, M.T @ np.linalg.solve(V, M)) <= RTOL


def test_conditional_moments_match_dense(case):
    Z, Lam, r, A = case["Z"], case["Lam"], case["r"], case["A"]
    sigma = 1.7
    mean = Lam @ np.linalg.solve(A, Lam.T @ Z.T @ r)
    cov = sigma**2 * Lam @ np.linalg.solve(A, Lam.T)
    got = case["out"]["moments"]
    offset = 0
    for t, m, c in zip(case["terms"], got.mean, got.cov, strict=True):
        assert m.shape == (t.nlevels, t.d) and c.shape == (t.nlevels, t.d, t.d)
        sl = slice(offset, offset + t.q)
        assert rel(np.asarray(m).reshape(-1), mean[sl]) <= RTOL
        blocks = [cov[sl, sl][j * t.d : (j + 1) * t.d, j * t.d : (j + 1) * t.d]
                  for j in range(t.nlevels)]  # fmt: skip
        assert rel(c, np.stack(blocks)) <= RTOL
        offset += t.q
    assert got.draw is None


def test_z_times(case):
    b = np.concatenate([np.asarray(e).reshape(-1) for e in case["effects"]])
    assert rel(case["out"]["zb"], case["Z"] @ b) <= RTOL
    # a left-out term and an unseen level (negative index) contribute nothing
    struct, effects, terms = case["struct"], case["effects"], case["terms"]
    refs = [np.where(np.arange(len(r)) == 0, -1, np.asarray(r)) for r in struct.refs]
    got = z_times(refs, struct.z, (effects[0],) + (None,) * (len(terms) - 1), unseen=True)
    want = terms[0].dense() @ np.asarray(effects[0]).reshape(-1)
    want[0] = 0.0
    assert rel(got, want) <= RTOL
    host = z_times(refs, [np.asarray(z) for z in struct.z],
                   (np.asarray(effects[0]),) + (None,) * (len(terms) - 1), unseen=True)  # fmt: skip
    assert isinstance(host, np.ndarray) and rel(host, want) <= RTOL  # NumPy in, NumPy out


def test_linear_predictor_multiplies_each_distinct_column_once(case):
    """X beta + Z b, with an intercept and a slope column shared by X and a term."""
    struct, effects, terms = case["struct"], case["effects"], case["terms"]
    X = np.column_stack([case["X"], terms[0].z[:, -1]])  # a term's column also in X
    beta = np.array([0.5, -1.0, 2.0, 0.3])
    cols, cmap = column_map(X, [t.z for t in terms])
    assert cmap.fixef[0] == -1 and cmap.fixef[3] == cmap.terms[0][-1]
    assert cols.shape[1] == len({c for ks in (cmap.fixef, *cmap.terms) for c in ks} - {-1})
    b = np.concatenate([np.asarray(e).reshape(-1) for e in effects])
    got = jax.jit(linear_predictor, static_argnums=1)(cols, cmap, beta, struct.refs, effects)
    assert rel(got, X @ beta + case["Z"] @ b) <= RTOL
    left_out = linear_predictor(cols, cmap, beta, struct.refs, (None,) * len(terms))
    assert rel(left_out, X @ beta) <= RTOL


@pytest.mark.parametrize("name", ["one_term_d1", "two_crossed", "rest_has_slopes"])
def test_eigen_fast_path_matches_blocked(name):
    """With Lambda_l = rho T_l the eigen kernels equal the blocked ones."""
    case = computed(name)
    struct, rng = case["struct"], np.random.default_rng(3)
    T = [np.diag(rng.uniform(0.5, 1.5, size=t.d)) for t in case["terms"]]
    xm = cross_products(struct, case["M"])
    eig = eigen_precompute(struct, T, xm)
    rho, sigma = 0.8, 1.3
    lambdas = tuple(jnp.asarray(rho * t) for t in T)
    for got, want in zip(eigen_gls_gram(eig, rho, eig.products), gls_gram(struct, lambdas, xm),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-9)
    coef = jnp.asarray([0.3, -1.2, 2.0])
    fast = eigen_moments(struct, eig, rho, eig.products.combine(coef), sigma)
    slow = conditional_moments(struct, lambdas, xm.combine(coef), sigma)
    for a, b in zip(fast.mean, slow.mean, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("schur", ["sparse", "dense", "grouped"])
@pytest.mark.parametrize("name", [n for n in CASES if len(CASES[n][1]) > 1])
def test_both_schur_forms_match_dense(name, schur):
    """B held as aggregated pairs, dense, or as dense per-group products: one factorisation."""
    case = computed(name)
    Z, Lam, A, M, r = case["Z"], case["Lam"], case["A"], case["M"], case["r"]
    struct = build_structure(case["terms"], schur=schur)
    assert struct.layout.dense_b == (schur == "dense")
    assert struct.layout.dense_pairs == (schur == "grouped")
    out = blocked_quantities(jnp.asarray(case["theta"]), struct, *case["args"][1:])
    V = np.eye(Z.shape[0]) + Z @ Lam @ Lam.T @ Z.T
    assert rel(out["gls"][1], M.T @ np.linalg.solve(V, M)) <= RTOL
    assert abs(float(out["logdet"]) - np.linalg.slogdet(A)[1]) <= RTOL * abs(
        np.linalg.slogdet(A)[1]
    )
    mean = Lam @ np.linalg.solve(A, Lam.T @ Z.T @ r)
    got = np.concatenate([np.asarray(m).reshape(-1) for m in out["moments"].mean])
    assert rel(got, mean) <= RTOL
    for key in ("objective_reml", "objective_ml"):
        assert float(out[key]) == pytest.approx(float(case["out"][key]), rel=1e-11)


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_profiled_objective_matches_dense(case, reml):
    got = float(case["out"]["objective_reml" if reml else "objective_ml"])
    expected = dense_objective(case["Z"], case["Lam"], case["X"], case["y"], reml)
    assert abs(got - expected) <= RTOL * abs(expected)


# Compiling the gradient costs 1-4 s per design on a 2-core CPU, so the default run
# checks it on four designs that between them cover every block shape; the others
# run with ``-m slow``.
GRAD_CASES = ("one_term_d2", "two_crossed", "three_terms", "big_scalar_rest")


@pytest.mark.parametrize(
    "name",
    [n if n in GRAD_CASES else pytest.param(n, marks=pytest.mark.slow) for n in CASES],
)
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_gradient_matches_central_differences(name, reml):
    case = computed(name)
    theta = case["theta"]
    value, grad = objective(theta, case, reml)
    assert value == pytest.approx(float(case["out"]["objective_reml" if reml else "objective_ml"]))
    h = 1e-5
    fd = np.empty(theta.size)
    for k in range(theta.size):
        step = h * np.eye(theta.size)[k]
        fd[k] = (
            objective(theta + step, case, reml)[0] - objective(theta - step, case, reml)[0]
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
        assert np.all(np.isfinite(objective(theta, case, reml)[1]))


def test_no_terms_is_an_error():
    with pytest.raises(ValueError, match="at least one random-effect term"):
        build_structure([])


@pytest.mark.parametrize("q", [2, 12])  # unrolled (<= dense.SMALL) and LAPACK factors
def test_logdet_quad_gradient_matches_autodiff_through_cholesky(rng, q):
    k = 3
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


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_small_cholesky_and_solves_match_lapack(rng, d):
    B = jnp.asarray(rng.normal(size=(7, d, d)))
    rhs = jnp.asarray(rng.normal(size=(7, d, 3)))

    def spd(B):
        return B @ jnp.swapaxes(B, -1, -2) / d + jnp.eye(d)

    L = cholesky(spd(B))
    np.testing.assert_allclose(L, np.linalg.cholesky(np.asarray(spd(B))), rtol=1e-12, atol=1e-14)
    for transpose in (False, True):
        pairs = zip(np.asarray(L), np.asarray(rhs), strict=True)
        ref = np.stack([scipy.linalg.solve_triangular(a, b, lower=True, trans=int(transpose))
                        for a, b in pairs])  # fmt: skip
        np.testing.assert_allclose(tri_solve(L, rhs, transpose=transpose), ref, rtol=1e-11)

    def ours(B):  # log-determinant and a quadratic form through the factor
        L = cholesky(spd(B))
        w = tri_solve(L, rhs)
        return jnp.sum(jnp.log(jnp.diagonal(L, axis1=1, axis2=2))) + jnp.sum(w**2)

    def lapack(B):
        L = jnp.linalg.cholesky(spd(B))
        w = jax.scipy.linalg.solve_triangular(L, rhs, lower=True)
        return jnp.sum(jnp.log(jnp.diagonal(L, axis1=1, axis2=2))) + jnp.sum(w**2)

    np.testing.assert_allclose(jax.grad(ours)(B), jax.grad(lapack)(B), rtol=1e-10, atol=1e-12)
    bad = jnp.asarray(np.diag(np.r_[1.0, -1.0, np.ones(d)][:d])) if d > 1 else -jnp.eye(1)
    assert np.isnan(np.asarray(cholesky(bad))).any()  # not positive definite: NaN, as LAPACK


def test_lapack_blocks_turns_unrolling_off_while_tracing():
    A = jnp.eye(2) * 2.0

    def traced(fn, *args):  # a new function each time: no cached trace
        return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))

    assert "cholesky" not in traced(cholesky, A)
    with lapack_blocks():
        assert "cholesky" in traced(cholesky, A)
        assert "triangular_solve" in traced(tri_solve, A, A)
    assert "cholesky" not in traced(cholesky, A)


def test_cost_model_picks_the_cheaper_schur_form():
    from lmmjax.linalg.structure import dense_b_pays

    # every level of term 1 meets every rest row (eeg: subjects x items): dense pays
    assert dense_b_pays(np.full(334, 160), q_rest=160, d1=2)
    # a few rest rows per level and a large rest block (InstEval): the pairs are cheaper
    assert not dense_b_pays(np.full(2972, 25), q_rest=1142, d1=1)


@pytest.mark.parametrize("name", list(CASES))
def test_scale_rows_is_the_weighted_system(name):
    """``scale_rows`` gives Z'WZ, and gls_gram the weighted Woodbury, against dense N x N."""
    c = make_case(name)
    rng = np.random.default_rng(3)
    n = c["y"].size
    sigma_i = np.exp(rng.normal(scale=0.4, size=n))  # per-row residual SDs
    s = 1.0 / sigma_i
    struct = build_structure(c["terms"], schur="dense")
    scaled = jax.jit(scale_rows)(struct, jnp.asarray(s))
    Zs = s[:, None] * c["Z"]
    np.testing.assert_allclose(dense_gram(scaled), Zs.T @ Zs, rtol=0, atol=1e-11)
    # the same structure as precomputing from row-scaled terms
    direct = build_structure(
        [Term(t.group, t.names, t.levels, t.refs, s[:, None] * t.z) for t in c["terms"]],
        schur="dense",
    )
    np.testing.assert_allclose(np.asarray(scaled.C), np.asarray(direct.C), atol=1e-11)
    # weighted marginal covariance V = diag(sigma_i^2) + Z Lam Lam' Z'
    r = c["y"] - c["X"] @ np.array([0.5, 0.1, -0.3])
    lambdas = tuple(jnp.asarray(lam) for lam in c["lams"])
    logdet_a, gram = jax.jit(gls_gram)(scaled, lambdas, cross_products(scaled, jnp.asarray(s * r)))
    ZL = c["Z"] @ c["Lam"]
    V = np.diag(sigma_i**2) + ZL @ ZL.T
    want_logdet = np.linalg.slogdet(V)[1] - 2.0 * np.sum(np.log(sigma_i))
    np.testing.assert_allclose(float(logdet_a), want_logdet, rtol=RTOL)
    np.testing.assert_allclose(float(gram[0, 0]), r @ np.linalg.solve(V, r), rtol=1e-9)


def test_scale_rows_refuses_the_sparse_schur_form():
    c = make_case("two_crossed")
    struct = build_structure(c["terms"], schur="sparse")
    assert not rows_scalable(struct)
    with pytest.raises(ValueError, match="schur='dense'"):
        scale_rows(struct, jnp.ones(c["y"].size))
    assert rows_scalable(build_structure(c["terms"][:1]))


def test_small_system_matches_dense(case):
    """The padded dense system: same log|V|, M' V^-1 M, objective and conditional mean."""
    Z, Lam, M, r, A = case["Z"], case["Lam"], case["M"], case["r"], case["A"]
    if Z.shape[1] > small.MAX_Q:
        pytest.skip("more random effects than a small system holds")
    system, xm, layout = small_system(case["terms"], M, jnp.float64)
    assert system.q >= Z.shape[1] and layout.size >= case["theta"].size
    theta = jnp.asarray(layout.pad(case["theta"]))
    lam = make_lambdas(theta, system)
    np.testing.assert_array_equal(np.asarray(lam)[: Z.shape[1], : Z.shape[1]], Lam)
    assert not np.any(np.asarray(lam)[Z.shape[1] :])  # padding stays zero
    logdet_v, gram = gls_gram(system, lam, xm)
    V = np.eye(Z.shape[0]) + Z @ Lam @ Lam.T @ Z.T
    assert float(logdet_v) == pytest.approx(np.linalg.slogdet(V)[1], rel=RTOL)
    assert rel(gram, M.T @ np.linalg.solve(V, M)) <= RTOL
    mean = conditional_moments(system, lam, xm.combine(jnp.asarray([0.0, 0.0, 0.0])), 1.0).mean
    assert len(mean) == 1 and not np.any(np.asarray(mean[0]))
    rsys = small_system(case["terms"], r[:, None], jnp.float64)
    got = conditional_moments(rsys[0], lam, rsys[1], 1.7).mean[0]
    want = Lam @ np.linalg.solve(A, Lam.T @ Z.T @ r)
    assert rel(np.concatenate([b.reshape(-1) for b in layout.unpack(got)]), want) <= RTOL
    cov = conditional_moments(rsys[0], lam, rsys[1], 1.7, cov=True).cov[0]
    dense = 1.7**2 * Lam @ np.linalg.solve(A, Lam.T)
    for t, blocks, (o, m, d) in zip(case["terms"], layout.blocks(cov), layout.terms, strict=True):
        assert blocks.shape == (t.nlevels, t.d, t.d)
        want = np.stack([dense[o + j * d : o + (j + 1) * d, o + j * d : o + (j + 1) * d]
                         for j in range(m)])  # fmt: skip
        assert rel(blocks, want) <= RTOL
    X = case["X"][:, :2]  # p = 2: [X y] padded from 3 columns to 4
    xy = small_system(case["terms"], np.column_stack([X, case["y"]]), jnp.float64, pad_fixed=True)
    assert xy[1].gram.shape == (4, 4) and float(xy[0].p) == 2
    for reml in (True, False):
        got = float(profiled_objective(theta, xy[0], xy[1], reml))
        expected = dense_objective(Z, Lam, X, case["y"], reml)
        assert got == pytest.approx(expected, rel=RTOL)


def test_schur_pair_keys_do_not_wrap_at_int32():
    """Pairs of rest rows near 50,000 give keys past 2**31: they must stay exact."""
    from lmmjax.linalg.structure import _pairs

    q_rest, groups = 50_000, 3
    b_row = np.array([49_998, 49_999, 10, 49_999], np.int32)  # B's rows, by first-term level
    b_lev = np.array([0, 0, 1, 1], np.int32)
    b_val = np.ones((4, 1))
    entry, group, val = _pairs(b_row, b_lev, b_val, np.array([0, 2]), groups, q_rest)
    hi_lo = sorted({(max(a, b), min(a, b), g) for lev, g in ((0, 0), (1, 2))
                    for a in b_row[b_lev == lev] for b in b_row[b_lev == lev]})  # fmt: skip
    want = [int(h) * q_rest + int(lo) for h, lo, _ in hi_lo]
    assert sorted(entry.tolist()) == sorted(want) and max(want) > 2**31
    assert val.shape == (len(want), 1, 1)


@pytest.mark.parametrize("d", [1, 2, 4, 5])  # 5: past SMALL_D, the einsum
@pytest.mark.parametrize("transpose", [True, False])
def test_lambda_left_is_the_blockwise_product(d, transpose):
    from lmmjax.linalg.blocked import SMALL_D, lambda_left

    assert SMALL_D == 4  # the parametrisation straddles it
    rng = np.random.default_rng(d)
    lam = np.tril(rng.normal(size=(d, d)))
    x = rng.normal(size=(3, 7, d, 4))
    got = np.asarray(lambda_left(jnp.asarray(lam), jnp.asarray(x), transpose=transpose))
    m = lam.T if transpose else lam
    want = np.stack([[m @ x[i, j] for j in range(7)] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(14,), (14, 3)])
def test_accelerator_level_paths_equal_gather_and_scatter(shape):
    # the compare-and-reduce forms that a GPU runs for terms of few levels (the CPU
    # lowers take_levels/sum_levels to a gather and a scatter), values and gradients
    from lmmjax.linalg.products import gather_by_compare, sum_by_compare, sum_levels, take_levels

    rng = np.random.default_rng(3)
    b = rng.normal(size=shape)
    refs = rng.integers(0, shape[0], size=500)
    g = rng.normal(size=(500, *shape[1:]))
    np.testing.assert_allclose(gather_by_compare(b, refs), b[refs], rtol=1e-14)
    np.testing.assert_allclose(take_levels(jnp.asarray(b), refs), b[refs], rtol=1e-14)
    expected = np.zeros(shape)
    np.add.at(expected, refs, g)
    np.testing.assert_allclose(sum_by_compare(g, refs, shape[0]), expected, rtol=1e-12)
    np.testing.assert_allclose(sum_levels(jnp.asarray(g), refs, shape[0]), expected, rtol=1e-12)
    # the transpose of the gather is the per-level sum, and the other way round
    grad = jax.grad(lambda b: jnp.sum(gather_by_compare(b, refs) * g))(b)
    np.testing.assert_allclose(grad, expected, rtol=1e-12)
    w = rng.normal(size=shape)
    grad = jax.grad(lambda v: jnp.sum(sum_by_compare(v, refs, shape[0]) * w))(g)
    np.testing.assert_allclose(grad, w[refs], rtol=1e-14)
    # an index out of range is left out of the sums, as segment_sum leaves it
    bad = refs.copy()
    bad[:3] = -1
    kept = np.zeros(shape)
    np.add.at(kept, bad[3:], g[3:])
    np.testing.assert_allclose(sum_by_compare(g, bad, shape[0]), kept, rtol=1e-12)


def test_level_paths_keep_the_dtype_of_a_gather_and_a_scatter():
    # lax.platform_dependent traces both forms: a sum that promoted int32 to int64 made
    # jit(take_levels) fail on integers (found by review)
    from lmmjax.linalg.products import gather_by_compare, sum_by_compare, sum_levels, take_levels

    refs = jnp.array([0, 2, 1, 2])
    b = jnp.arange(6, dtype=jnp.int32).reshape(3, 2)
    assert jax.jit(take_levels)(b, refs).dtype == jnp.int32
    np.testing.assert_array_equal(jax.jit(take_levels)(b, refs), np.asarray(b)[np.asarray(refs)])
    assert gather_by_compare(b, refs).dtype == jnp.int32
    v = jnp.ones(4, jnp.int32)
    assert jax.jit(sum_levels, static_argnums=2)(v, refs, 3).dtype == jnp.int32
    np.testing.assert_array_equal(sum_by_compare(v, refs, 3), [1, 1, 2])
    f32 = jnp.ones((4, 2), jnp.float32)
    assert sum_by_compare(f32, refs, 3).dtype == jnp.float32

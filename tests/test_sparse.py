"""Sparse fixed effects (method "sparse"): transform, selection, criteria, API and CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.errors import LmmInputError
from lmmjax.output import Fit
from lmmjax.sparse import select
from lmmjax.sparse.cv import _stable_choice
from lmmjax.sparse.select import Candidate, Problem, best_subset, prepare
from lmmjax.sparse.transform import (
    cluster_layout,
    logdet,
    pad_rows,
    svd_factors,
    trace_inverse,
    unpad_rows,
    whiten,
)

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    """``benchmarks/sparse_lmm.py`` as a module (its simulator is the issue's design)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sparse_lmm
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return sparse_lmm


def simulate(seed, design="issue"):
    """The issue's design: m = 8, n = 15, p = 200, q = 4, beta_1, beta_5, beta_10 = 1, 5, 3."""
    return _benchmark().simulate(seed, design=design).frame


FORMULA = "y ~ . + (0 + z1 + z2 + z3 + z4 | cluster)"


# ----------------------------------------------------------------- transform
def test_whitening_equals_dense_inverse_square_root(rng):
    sizes = np.array([1, 2, 3, 5, 7, 4, 2, 9])  # unequal: several padded buckets
    refs = rng.permutation(np.repeat(np.arange(sizes.size), sizes))
    N, q, c = refs.size, 3, 4
    Z = rng.standard_normal((N, q))
    M = rng.standard_normal((N, c))
    a = 2.7
    layout = cluster_layout(refs)
    assert len(layout.shapes) > 1
    gather = jnp.asarray(layout.gather)
    us, ds = svd_factors(pad_rows(jnp.asarray(Z), gather), layout.shapes)
    out = unpad_rows(whiten(pad_rows(jnp.asarray(M), gather), us, ds, a, layout.shapes), gather, N)
    ld = logdet(ds, a, layout.bucket_clusters, layout.n_clusters)
    tr = trace_inverse(ds, a, layout)
    for i in range(sizes.size):
        rows = np.flatnonzero(refs == i)
        S = a * Z[rows] @ Z[rows].T + np.eye(rows.size)
        w, v = np.linalg.eigh(S)
        root = v @ np.diag(w**-0.5) @ v.T
        np.testing.assert_allclose(np.asarray(out)[rows], root @ M[rows], atol=1e-10)
        assert abs(float(ld[i]) - np.linalg.slogdet(S)[1]) < 1e-10
        assert abs(float(tr[i]) - np.trace(np.linalg.inv(S))) < 1e-10


def test_padding_round_trip(rng):
    refs = rng.integers(0, 6, size=40)
    layout = cluster_layout(refs, 7)  # one empty cluster
    values = jnp.asarray(rng.standard_normal((40, 2)))
    back = unpad_rows(pad_rows(values, jnp.asarray(layout.gather)), jnp.asarray(layout.gather), 40)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(values))
    assert layout.sizes[6] == 0 and np.all(
        layout.cluster[layout.row_mask] == refs[layout.gather[layout.row_mask]]
    )


# ----------------------------------------------------------------- selection
@pytest.mark.parametrize("gram", [True, False], ids=["normal-equations", "rows"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_best_subset_matches_exhaustive_search(rng, k, gram, monkeypatch):
    monkeypatch.setattr(select, "gram_pays", lambda n, p: gram)
    N, p = 30, 8
    X = rng.standard_normal((N, p)) + 0.6 * rng.standard_normal((N, 1))  # correlated columns
    y = X[:, [1, 4, 6]] @ np.array([1.0, -0.8, 0.6]) + 0.7 * rng.standard_normal(N)
    F = np.ones((N, 1))
    problem = Problem(jnp.asarray(X), jnp.asarray(F), jnp.asarray(y), jnp.ones(N))
    fit = best_subset(problem, prepare(problem), jnp.asarray(k), K=3)
    chosen = set(np.asarray(fit.index)[np.asarray(fit.mask)].tolist())

    def rss(cols):
        A = np.column_stack([F, X[:, list(cols)]])
        r = y - A @ np.linalg.lstsq(A, y, rcond=None)[0]
        return r @ r

    best = min(itertools.combinations(range(p), k), key=rss)
    assert chosen == set(best)
    A = np.column_stack([F, X[:, sorted(chosen)]])
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    order = np.argsort(np.asarray(fit.index)[:k])
    np.testing.assert_allclose(np.asarray(fit.beta)[:k][order], coef[1:], atol=1e-8)
    np.testing.assert_allclose(np.asarray(fit.gamma), coef[:1], atol=1e-8)


@pytest.mark.parametrize("seed", [1, 3, 5])
def test_exact_support_recovery_on_the_issue_design(seed):
    fit = lmmjax.lmm(FORMULA, simulate(seed), method="sparse", k=[1, 10])
    assert set(fit.support) == {"x1", "x5", "x10"}
    assert fit.k == 3
    truth = pd.Series({"x1": 1.0, "x5": 5.0, "x10": 3.0})
    assert np.max(np.abs(fit.fixef[truth.index] - truth)) < 5 * np.max(fit.fixef_se[truth.index])
    assert isinstance(fit, Fit)


def _strong(seed, n=40, m=6, p=30):
    rng = np.random.default_rng(seed)
    N = n * m
    X = rng.standard_normal((N, p))
    g = np.repeat(np.arange(n), m)
    u = 1.5 * rng.standard_normal(n)
    beta = np.zeros(p)
    beta[[2, 7, 11, 20]] = [2.0, -1.5, 1.0, 2.5]
    y = 0.5 + X @ beta + u[g] + rng.standard_normal(N)
    df = pd.DataFrame(X, columns=[f"v{j}" for j in range(p)])
    df["g"], df["y"] = g, y
    return df


@pytest.mark.parametrize("criterion", ["bic", "cv"])
def test_k_is_chosen_by_the_criterion(criterion):
    fit = lmmjax.lmm("y ~ . + (1 | g)", _strong(4), method="sparse", k=[1, 8],
                     criterion=criterion, a_grid=[0.5, 2.0])  # fmt: skip
    truth = {"v2", "v7", "v11", "v20"}
    if criterion == "bic":  # consistent: exactly the truth
        assert fit.k == 4 and set(fit.support) == truth
    else:  # the CV curve's minimum over (a, k), or a smaller stable k at its a
        best = min(fit.cv, key=lambda r: r["loss"])
        assert best["a"] == fit.a and fit.k <= best["k"] and len(fit.cv) == 2 * 8
        assert truth <= set(fit.support) and fit.k <= 6
    fixed = lmmjax.lmm("y ~ . + (1 | g)", _strong(4), method="sparse", k=2, refit=False)
    assert fixed.k == 2 and set(fixed.support) <= {"v2", "v7", "v11", "v20"}


def test_lasso_selector_recovers_strong_signals():
    fit = lmmjax.lmm("y ~ . + (1 | g)", _strong(5), method="sparse", selector="lasso",
                     k=[1, 8], a_grid=[1.0])  # fmt: skip
    assert set(fit.support) == {"v2", "v7", "v11", "v20"}


def test_cross_validation_picks_a_sensible_a():
    # random intercepts with Psi / sigma^2 = 10: the working covariance is exact at a = 10
    rng = np.random.default_rng(11)
    n, m, p = 60, 6, 20
    g = np.repeat(np.arange(n), m)
    X = rng.standard_normal((n * m, p))
    y = X[:, 0] * 2.0 - X[:, 3] + np.sqrt(10.0) * rng.standard_normal(n)[g]
    y = y + rng.standard_normal(n * m)
    df = pd.DataFrame(X, columns=[f"x{j}" for j in range(p)]).assign(g=g, y=y)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    fit = lmmjax.lmm("y ~ . + (1 | g)", df, method="sparse", a_grid=grid, refit=False)
    assert fit.a in (1.0, 10.0, 100.0)
    curve = {r["a"]: r["loss"] for r in fit.cv}
    assert curve[10.0] < curve[0.1] < curve[0.01]
    assert min(curve, key=curve.get) == fit.a


def test_without_refit_the_working_model_is_reported():
    fit = lmmjax.lmm("y ~ . + (1 | g)", _strong(6), method="sparse", refit=False, a_grid=[2.0])
    assert fit.refit is None and fit.fixef_se.isna().all()
    vc = fit.varcorr
    assert np.isclose(vc["variance"].iloc[0], 2.0 * fit.sigma**2)
    assert fit.ranef()["g"].shape == (40, 1)
    d = fit.to_dict()
    assert d["refit"] is False and d["a"] == 2.0 and d["support"] == list(fit.support)


def test_refit_is_the_reml_fit_of_the_selected_columns():
    df = _strong(7)
    fit = lmmjax.lmm("y ~ . + (1 | g)", df, method="sparse", a_grid=[1.0])
    direct = lmmjax.lmm("y ~ " + " + ".join(fit.support) + " + (1 | g)", df)
    np.testing.assert_allclose(fit.fixef.to_numpy(), direct.fixef.to_numpy(), atol=1e-8)
    np.testing.assert_allclose(fit.fixef_se.to_numpy(), direct.fixef_se.to_numpy(), atol=1e-6)
    assert np.isclose(fit.sigma, direct.sigma)


def _grid_fits(supports, K=3):
    """A one-``a`` grid of fits whose rows (folds, then the whole data) hold ``supports``."""
    index = np.zeros((1, len(supports), len(supports[0]), K), dtype=np.int64)
    mask = np.zeros(index.shape, dtype=bool)
    for f, row in enumerate(supports):
        for c, cols in enumerate(row):
            index[0, f, c, : len(cols)] = cols
            mask[0, f, c, : len(cols)] = True
    zeros = np.zeros(index.shape)
    return Candidate(index, mask, zeros, zeros[..., :1], np.ones(index.shape[:3], bool))


def test_stability_keeps_the_best_candidate_of_stable_columns():
    # candidates k = 1, 2, 3 on the whole data (last row); four folds choose their own k
    full = [[4], [4, 7], [4, 7, 9]]
    folds = [[[4], [4, 7], [4, 7, 2]], [[4], [4, 9], [4, 9, 1]],
             [[7], [4, 7], [4, 7, 3]], [[4], [4, 6], [4, 9, 8]]]  # fmt: skip
    fits = _grid_fits([*[[*f] for f in folds], full])
    picks = np.array([2, 2, 1, 0])  # each fold's own choice: column 9 is in 1 fold of 4
    score = np.array([3.0, 2.0, 1.0])  # the criterion prefers k = 3 = {4, 7, 9}
    eligible = np.ones(3, bool)
    pick, dropped = _stable_choice(fits, 0, picks, score, eligible, 4, 10)
    assert (pick, dropped) == (1, 1)  # {4, 7}: 4 in every fold, 7 in two of four
    picks = np.array([2, 2, 1, 2])  # now 9 is in two folds of four: half is enough
    assert _stable_choice(fits, 0, picks, score, eligible, 4, 10) == (2, 0)
    eligible = np.array([False, False, True])  # nothing stable is eligible: the criterion's pick
    assert _stable_choice(fits, 0, np.array([0, 0, 0, 0]), score, eligible, 4, 10) == (2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["issue"])
def test_twenty_seeds_of_the_issue_design(design):
    exact = [set(lmmjax.lmm(FORMULA, simulate(seed, design), method="sparse",
                            k=[1, 10]).support) == {"x1", "x5", "x10"}
             for seed in range(20)]  # fmt: skip
    assert sum(exact) >= 19


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "word"),
    [({"selector": "ridge"}, "selector"), ({"k": 0}, "'k'"), ({"k": [5, 2]}, "'k'"),
     ({"a_grid": [1.0, -2.0]}, "a_grid"), ({"cv_folds": 1}, "cv_folds"),
     ({"k": 99}, "'k'"), ({"cv_folds": 50}, "cv_folds"), ({"refit": "yes"}, "refit")],
)  # fmt: skip
def test_bad_options_name_the_option(options, word):
    with pytest.raises(LmmInputError, match=word) as err:
        lmmjax.lmm("y ~ . + (1 | g)", _strong(1), method="sparse", **options)
    assert "\n" not in str(err.value)


def test_a_refit_reml_refuses_names_the_option():
    # 4 rows and 4 random effects per cluster: the selection runs, REML refuses the refit
    rng = np.random.default_rng(3)
    n, m, p = 12, 4, 15
    X = rng.standard_normal((n * m, p))
    Z = rng.standard_normal((n * m, 3))
    g = np.repeat(np.arange(n), m)
    b = rng.standard_normal((n, 3))
    y = 2.0 * X[:, 0] + np.sum(Z * b[g], axis=1) + rng.standard_normal(n * m)
    df = pd.DataFrame(X, columns=[f"x{j}" for j in range(p)])
    df = df.assign(z1=Z[:, 0], z2=Z[:, 1], z3=Z[:, 2], g=g, y=y)
    formula = "y ~ . + (1 + z1 + z2 + z3 | g)"
    with pytest.raises(LmmInputError, match="option 'refit'") as err:
        lmmjax.lmm(formula, df, method="sparse", k=[1, 3], cv_folds=3)
    assert "\n" not in str(err.value)
    fit = lmmjax.lmm(formula, df, method="sparse", k=[1, 3], cv_folds=3, refit=False)
    assert "x0" in fit.support and fit.refit is None


def test_several_grouping_factors_are_refused():
    df = _strong(1).assign(h=np.arange(240) % 7)
    with pytest.raises(LmmInputError, match="single grouping factor"):
        lmmjax.lmm("y ~ v0 + v1 + (1 | g) + (1 | h)", df, method="sparse")


# ----------------------------------------------------------------------- CLI
def _cli(tmp_path, sparse: str):
    _strong(2).to_csv(tmp_path / "data.csv", index=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "data: data.csv\nformula: y ~ . + (1 | g)\nmethod: sparse\noutput: out.json\n"
        f"sparse:\n{sparse}",
        encoding="utf-8",
    )
    return subprocess.run(
        [sys.executable, "-m", "lmmjax.fit", str(cfg), "--output", str(tmp_path / "out.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_cli_writes_the_json_result(tmp_path):
    proc = _cli(tmp_path, "  k: [1, 6]\n  a_grid: [0.5, 2.0]\n  cv_folds: 4\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["method"] == "sparse" and set(out["support"]) == {"v2", "v7", "v11", "v20"}
    assert out["k"] == 4 and out["a"] in (0.5, 2.0) and len(out["cv"]) == 2
    assert set(out["fixef"]) == {"(Intercept)", *out["support"]}
    assert out["varcorr"][-1]["group"] == "Residual" and out["fixef_se"]["v2"] > 0
    assert out["seconds"] > 0


@pytest.mark.parametrize(("section", "word"), [("  k: 0\n", "sparse.k"),
                                               ("  cv_folds: 100\n", "cv_folds")])  # fmt: skip
def test_cli_bad_input_exits_2(tmp_path, section, word):
    proc = _cli(tmp_path, section)
    assert proc.returncode == 2
    assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_benchmark_smallest_setting_runs_without_peers():
    res = _benchmark().recovery([1], "issue", peers=False, mixedlm_seeds=0, skscope_seeds=0)
    assert len(res) == 1 and res.loc[0, "seconds"] > 0 and res.loc[0, "l2"] < 1.0

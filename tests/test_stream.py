"""Streamed precompute (lmmjax.stream): Parquet row batches give the in-memory fit."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError
from lmmjax.linalg import build_structure, cross_products
from lmmjax.linalg.structure import _pairs, _pairs_by_products
from lmmjax.reml import fit_reml
from lmmjax.stream import StreamedModel, should_stream, stream_model

FORMULA = "y ~ x1 + x2 + f + (1 | g1) + (1 | g2)"


def crossed(n: int, m1: int, m2: int, seed: int = 0) -> pd.DataFrame:
    """Two crossed factors, two covariates, a three-level factor and a few missing values."""
    rng = np.random.default_rng(seed)
    g1, g2 = rng.integers(0, m1, n), rng.integers(0, m2, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    f = rng.choice(["lo", "mid", "hi"], n)
    y = 2.0 + 0.5 * x1 - 0.25 * x2 + 0.3 * (f == "hi") + rng.normal(size=n)
    y += 0.8 * rng.normal(size=m1)[g1] + 0.5 * rng.normal(size=m2)[g2]
    y[rng.choice(n, 7, replace=False)] = np.nan
    x1[rng.choice(n, 3, replace=False)] = np.nan
    return pd.DataFrame(
        {"y": y, "x1": x1, "x2": x2, "f": f, "g1": g1, "g2": [f"item{k:03d}" for k in g2]}
    )


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "crossed.parquet"
    df = crossed(30_000, 1500, 60)
    df.to_parquet(path, row_group_size=8_000)
    return path, df


@pytest.fixture(scope="module")
def fits(parquet):
    path, df = parquet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamed = stream_model(path, FORMULA, batch_rows=3_500)
    memory = build_model(df, FORMULA)
    return streamed, memory, fit_reml(streamed), fit_reml(memory), caught


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_missing_rows_are_removed_and_reported(fits):
    streamed, memory, _, _, caught = fits
    assert isinstance(streamed, StreamedModel)
    assert streamed.nobs == memory.nobs == 30_000 - streamed.n_dropped
    assert streamed.n_dropped == memory.n_dropped > 0
    messages = [str(w.message) for w in caught]
    assert any(f"removed {memory.n_dropped} of 30000 rows" in m for m in messages)


def test_streamed_sums_equal_the_in_memory_precompute(fits):
    streamed, memory, *_ = fits
    struct, xp = streamed.sufficient
    ref = build_structure(memory.terms)
    xref = cross_products(ref, np.column_stack([memory.X, memory.y]))
    assert struct.nobs == ref.nobs and struct.layout.q_rest == ref.layout.q_rest
    for name in ("G1", "C", "b_row", "b_lev", "pair_entry", "pair_group"):
        np.testing.assert_array_equal(getattr(struct, name).shape, getattr(ref, name).shape)
    for name in ("G1", "C", "b_val", "pair_val"):
        assert rel(getattr(struct, name), getattr(ref, name)) < 1e-12, name
    for got, want in zip(xp, xref, strict=True):
        assert rel(got, want) < 1e-12


def test_streamed_reml_equals_in_memory(fits):
    streamed, memory, a, b, _ = fits
    assert streamed.fixef_names == memory.fixef_names
    assert [t.levels for t in streamed.terms] == [t.levels for t in memory.terms]
    assert abs(a.objective - b.objective) <= 1e-8 * abs(b.objective)
    assert rel(a.beta, b.beta) < 1e-8
    assert rel(a.theta, b.theta) < 1e-8
    assert abs(a.sigma - b.sigma) <= 1e-8 * b.sigma
    assert rel(a.vcov_matrix, b.vcov_matrix) < 1e-8
    for got, want in zip(a.b, b.b, strict=True):
        assert rel(got, want) < 1e-6  # conditional modes: a solve away from theta


def test_lmm_streams_a_parquet_path(parquet, fits):
    """Through the API, with other batches (and row groups split differently): the same fit."""
    path, _ = parquet
    b = fits[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = lmmjax.lmm(FORMULA, str(path), stream=True, batch_rows=10_000)
    assert fit.nobs == b.nobs
    assert abs(fit.objective - b.objective) <= 1e-8 * abs(b.objective)
    assert rel(fit.beta, b.beta) < 1e-8


def test_pairs_by_products_equal_enumerated_pairs():
    rng = np.random.default_rng(5)
    n = 4000
    g1, g2 = rng.integers(0, 60, n), rng.integers(0, 25, n)
    x = rng.normal(size=n)
    df = pd.DataFrame({"y": rng.normal(size=n), "x": x, "g1": g1, "g2": g2})
    for form in ("y ~ x + (1 | g1) + (1 | g2)", "y ~ x + (x | g1) + (x | g2)"):
        struct = build_structure(build_model(df, form).terms, schur="sparse")
        args = (np.asarray(struct.b_row, np.int64), np.asarray(struct.b_lev, np.int64),
                np.asarray(struct.b_val), np.asarray(struct.wgroup, np.int64),
                struct.layout.n_wgroups, struct.layout.q_rest)  # fmt: skip
        want = _pairs(*args)
        got = _pairs_by_products(*args, chunk_entries=500)  # several chunks per group
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[2], want[2], rtol=1e-12, atol=1e-12)


def test_refusals(parquet, tmp_path):
    path, df = parquet
    with pytest.raises(LmmInputError, match="poly"):
        stream_model(path, "y ~ poly(x1, 2) + (1 | g1)")
    with pytest.raises(LmmInputError, match="one grouping column"):
        stream_model(path, "y ~ x1 + (1 | g1:g2)")
    with pytest.raises(LmmInputError, match="unknown column 'nope'"):
        stream_model(path, "y ~ nope + (1 | g1)")
    with pytest.raises(LmmInputError, match="batch_rows"):
        stream_model(path, FORMULA, batch_rows=0)
    with pytest.raises(LmmInputError, match="devices"):
        stream_model(path, FORMULA, devices=10_000)
    with pytest.raises(LmmInputError, match="method 'reml' or 'ml'"):
        lmmjax.lmm(FORMULA, str(path), method="map", stream=True)
    csv = tmp_path / "d.csv"
    df.head(50).to_csv(csv, index=False)
    with pytest.raises(LmmInputError, match="Parquet"):
        should_stream(str(csv), True)
    assert not should_stream(str(path), "auto")  # small: read into memory
    assert should_stream(str(path), True) and not should_stream(str(path), False)


def test_config_keys(parquet, tmp_path, capsys):
    from lmmjax.cli import run
    from lmmjax.config import validate_config

    path, _ = parquet
    base = {"data": str(path), "formula": FORMULA}
    for key, bad in (("stream", "sometimes"), ("batch_rows", 0), ("devices", "all")):
        with pytest.raises(LmmInputError, match=key):
            validate_config({**base, key: bad})
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(f"data: {path}\nformula: {FORMULA}\nstream: true\nbatch_rows: 5000\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(cfg, check=True) == 0
    assert "observations N = 29990 (10 rows with missing values removed)" in capsys.readouterr().out

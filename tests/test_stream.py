"""Streamed precompute (lmmjax.stream): Parquet row batches give the in-memory fit."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import lmmjax
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError
from lmmjax.linalg import build_structure, cross_products
from lmmjax.linalg.structure import _group_products, _pairs
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


def write_crossed(folder, n: int, m1: int, m2: int, row_group: int):
    """:func:`crossed` written to ``folder / crossed.parquet``: the path and the frame."""
    path = folder / "crossed.parquet"
    df = crossed(n, m1, m2)
    df.to_parquet(path, row_group_size=row_group)
    return path, df


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return write_crossed(tmp_path_factory.mktemp("stream"), 30_000, 1500, 60, 8_000)


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


@pytest.mark.parametrize("density", [0.0, 1.1], ids=["dense", "sparse"])
def test_group_products_equal_enumerated_pairs(density, monkeypatch):
    """Each Gram group's B_g B_g', lower triangle packed, holds the enumerated pairs."""
    import lmmjax.linalg.structure

    monkeypatch.setattr(lmmjax.linalg.structure, "SPARSE_CHUNK_DENSITY", density)
    rng = np.random.default_rng(5)
    n = 4000
    g1, g2 = rng.integers(0, 60, n), rng.integers(0, 25, n)
    df = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "g1": g1, "g2": g2})
    for form in ("y ~ x + (1 | g1) + (1 | g2)", "y ~ x + (x | g1) + (x | g2)"):
        struct = build_structure(build_model(df, form).terms, schur="sparse")
        lay = struct.layout
        args = (np.asarray(struct.b_row, np.int64), np.asarray(struct.b_lev, np.int64),
                np.asarray(struct.b_val), np.asarray(struct.wgroup, np.int64),
                lay.n_wgroups, lay.q_rest)  # fmt: skip
        entry, group, val = _pairs(*args)
        got = np.asarray(_group_products(*args, np.float64, chunk_entries=500))  # chunked
        want = np.zeros_like(got)
        a, b = entry // lay.q_rest, entry % lay.q_rest  # a >= b
        want[a * (a + 1) // 2 + b, group] = val
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


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
    with pytest.raises(LmmInputError, match="method 'reml', 'ml' or 'nuts'"):
        lmmjax.lmm(FORMULA, str(path), method="map", stream=True)
    csv = tmp_path / "d.csv"
    df.head(50).to_csv(csv, index=False)
    with pytest.raises(LmmInputError, match="Parquet"):
        should_stream(str(csv), True)
    assert not should_stream(str(path), "auto")  # small: read into memory
    assert should_stream(str(path), True) and not should_stream(str(path), False)
    with pytest.raises(LmmInputError, match="needs a Parquet file or directory, got DataFrame"):
        lmmjax.lmm(FORMULA, df, stream=True)


def test_auto_streams_parquet_above_the_threshold(parquet, monkeypatch):
    import lmmjax.stream

    path = str(parquet[0])
    monkeypatch.setattr(lmmjax.stream, "STREAM_ABOVE_BYTES", 1000)
    assert should_stream(path, "auto")
    assert not should_stream("bundled:sleepstudy", "auto")


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


def test_b_entries_accumulate_sparse_or_dense():
    """Merged keys, or the dense array they switch to, give B of all rows at once."""
    from lmmjax.linalg import BEntries, term_layouts
    from lmmjax.linalg.structure import b_entries

    rng = np.random.default_rng(2)
    n = 6000
    df = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n),
                       "g1": rng.integers(0, 40, n), "g2": rng.integers(0, 30, n)})  # fmt: skip
    terms = build_model(df, "y ~ 1 + (x | g1) + (1 | g2)").terms
    layouts = term_layouts(terms)
    refs, z = [t.refs for t in terms], [t.z for t in terms]
    want_key, want_val = b_entries(refs, z, layouts)
    for limit in (0.0, 1e9):  # never dense; dense once a tenth of the entries are seen
        acc = BEntries(layouts, dense_limit=limit)
        for rows in np.array_split(np.arange(n), 7):
            acc.add([r[rows] for r in refs], [zl[rows] for zl in z])
            acc._merge()
        assert (acc.dense is not None) == (limit > 0)
        key, val = acc.entries()
        np.testing.assert_array_equal(key, want_key)
        np.testing.assert_allclose(val, want_val, rtol=1e-13, atol=1e-13)


DEVICES = """
import sys, warnings
import jax, numpy as np
from lmmjax.reml import fit_reml
from lmmjax.stream import stream_model
warnings.simplefilter("ignore")
assert jax.local_device_count() == 4
out = {}
for devices in (1, 4):
    model = stream_model(sys.argv[1], sys.argv[2], batch_rows=4001, devices=devices)
    fit = fit_reml(model)
    out[devices] = np.concatenate([[fit.objective, fit.sigma], fit.beta, fit.theta])
print("reldiff", np.max(np.abs(out[1] - out[4]) / np.abs(out[1])))
"""


def run_with_devices(script: str, *args: str, count: int = 4) -> str:
    """The output of ``python -c script args`` with ``count`` simulated host devices."""
    # simulated devices exist on the host platform (also where a GPU is the default)
    flags = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={count}", "JAX_PLATFORMS": "cpu"}
    env = {**os.environ, **flags}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_rows_sharded_over_devices_give_the_same_fit(parquet):
    """Each batch's rows split over 4 (simulated) devices, partial sums reduced: the same fit."""
    out = run_with_devices(DEVICES, str(parquet[0]), FORMULA)
    assert float(out.split("reldiff")[1].split()[0]) < 1e-10


PROCESS = """
import json, pathlib, sys, warnings
import lmmjax.distributed
lmmjax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
import jax, lmmjax
warnings.simplefilter("ignore")
from lmmjax.stream import _fragments
fit = lmmjax.lmm(sys.argv[4], sys.argv[3], stream=True, batch_rows=4000)
frags = _fragments(pathlib.Path(sys.argv[3]), (jax.process_index(), 2))[1]
mine = sum(b.num_rows for f in frags for b in f.to_batches(columns=["y"]))
print("fit", json.dumps([fit.objective, fit.sigma, *fit.beta, *fit.theta, mine, fit.nobs,
                         jax.process_count(), fit.model.n_dropped]))
"""


@pytest.mark.slow
def test_two_processes_each_reading_half_give_the_same_fit(parquet, fits):
    """jax.distributed on localhost: each process reads half the row groups; sums are reduced."""
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # on the CPU: two processes on one GPU fail in NCCL ("Duplicate GPU detected")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, "-c", PROCESS, port, str(k), str(parquet[0]), FORMULA],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for k in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    one = fits[2]  # streamed by one process
    want = np.array([one.objective, one.sigma, *one.beta, *one.theta])
    read = []
    for out, _ in outs:
        got = json.loads(out.split("fit", 1)[1])
        assert got[-3:] == [one.nobs, 2, one.model.n_dropped]
        assert np.max(np.abs(np.array(got[:-4]) - want) / np.abs(want)) < 1e-10
        read.append(got[-4])
    assert read == [16_000, 14_000]  # two row groups of 8,000 and 8,000 + 6,000 rows


def test_summary_of_a_streamed_fit(fits):
    text = fits[2].summary()
    assert "(not available: the rows were streamed, not held)" in text
    assert f"Number of obs: {fits[3].nobs}, groups:  g1, 1500; g2, 60" in text


def test_distributed_environment_must_hold_integers(monkeypatch):
    from lmmjax.distributed import initialize

    monkeypatch.setenv("LMMJAX_NUM_PROCESSES", "two")
    with pytest.raises(LmmInputError, match="LMMJAX_NUM_PROCESSES must be an integer"):
        initialize("127.0.0.1:1")


def test_products_with_b_in_chunks_are_exact(monkeypatch):
    """Chunked products with B's entries (long B): the same objective, gradient and modes."""
    import jax
    import jax.numpy as jnp

    import lmmjax.linalg.blocked as blocked
    from lmmjax.reml.objective import estimates, profiled_objective

    rng = np.random.default_rng(4)
    n = 3000
    df = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n),
                       "g1": rng.integers(0, 150, n), "g2": rng.integers(0, 40, n)})  # fmt: skip
    model = build_model(df, "y ~ x + (x | g1) + (1 | g2)")
    struct = build_structure(model.terms, schur="sparse")
    xp = cross_products(struct, np.column_stack([model.X, model.y]))
    theta = jnp.asarray([0.7, 0.2, 0.4, 0.5])

    def run():
        value, grad = jax.jit(jax.value_and_grad(profiled_objective))(theta, struct, xp)
        modes = jax.jit(estimates)(theta, struct, xp).b
        return np.concatenate([[value], grad, *(np.ravel(b) for b in modes)])

    direct = run()
    monkeypatch.setattr(blocked, "B_CHUNK", 97)  # struct.b_val has a few thousand entries
    assert struct.b_val.shape[0] > 2 * blocked.B_CHUNK
    np.testing.assert_allclose(run(), direct, rtol=1e-11, atol=1e-12)


def test_directory_of_parquet_files(parquet, tmp_path, fits):
    """A directory: its Parquet files are the data (others left out); unreadable ones refused."""
    _, df = parquet
    folder = tmp_path / "parts"
    folder.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(len(df)), 3)):
        df.iloc[rows].to_parquet(folder / f"part-{k}.parquet", row_group_size=4_000)
    (folder / "README.txt").write_text("not data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stream_model(folder, FORMULA, batch_rows=6_000)
    assert model.nobs == fits[0].nobs
    struct, _ = model.sufficient
    assert rel(struct.G1, fits[0].sufficient[0].G1) == 0.0
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LmmInputError, match="cannot read Parquet data"):
        stream_model(folder, FORMULA)


def test_write_fitted_gives_the_in_memory_fitted_values(fits, tmp_path):
    from lmmjax.stream import write_fitted

    a, b = fits[2], fits[3]
    out = write_fitted(a, tmp_path / "fitted.parquet", batch_rows=4_500)
    got = pd.read_parquet(out)
    want_fitted = b.fitted().to_numpy()  # NaN on the rows removed, as the file
    want_resid = b.residuals().to_numpy()
    assert len(got) == len(want_fitted) == 30_000
    np.testing.assert_array_equal(np.isnan(got["fitted"]), np.isnan(want_fitted))
    ok = ~np.isnan(want_fitted)
    assert rel(got["fitted"][ok], want_fitted[ok]) < 1e-8
    assert rel(got["residual"][ok], want_resid[ok]) < 1e-8
    with pytest.raises(LmmInputError, match="write_fitted needs"):
        write_fitted(b, tmp_path / "no.parquet")


def test_contrasts_and_a_response_expression(parquet):
    """Sum coding of a factor (its levels known from the first pass), a transformed response."""
    path, df = parquet
    formula = "I(2 * y + x2) ~ x1 + f + (1 | g1) + (1 | g2)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = stream_model(path, formula, batch_rows=9_000, contrasts={"f": "sum"})
        memory = build_model(df, formula, contrasts={"f": "sum"})
    assert streamed.fixef_names == memory.fixef_names
    _, xp = streamed.sufficient
    struct = build_structure(memory.terms)
    want = cross_products(struct, np.column_stack([memory.X, memory.y]))
    for got, ref in zip(xp, want, strict=True):
        assert rel(got, ref) < 1e-12


def test_random_slopes_streamed(parquet):
    """A random slope on each factor: the same sums as in memory."""
    path, df = parquet
    formula = "y ~ x1 + (x1 | g1) + (x2 | g2)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        struct, xp = stream_model(path, formula, batch_rows=8_000).sufficient
        memory = build_model(df, formula)
    ref = build_structure(memory.terms)
    want = cross_products(ref, np.column_stack([memory.X, memory.y]))
    assert struct.layout.n_wgroups == ref.layout.n_wgroups
    assert struct.layout.dense_pairs == ref.layout.dense_pairs
    for name in ("G1", "C", "b_val", "pair_val"):
        assert rel(getattr(struct, name), getattr(ref, name)) < 1e-12, name
    for got, ref_part in zip(xp, want, strict=True):
        assert rel(got, ref_part) < 1e-12

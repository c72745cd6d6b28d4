"""Chains run as separate programs (``chain_method: parallel``) sample as vectorised chains do.

Each chain uses the same key, starting point and mass matrix whichever way it
runs; only the fusion of the arithmetic differs, so after a short warm-up the
draws agree to rounding (NUTS trajectories are chaotic: long runs drift apart
as statistically equivalent chains).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import lmmjax
from lmmjax.bayes.samplers import chain_lanes


def _draws(chain_method: str, marginalize: str, backend: str = "numpyro") -> np.ndarray:
    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy", method="nuts",
                     num_chains=3, num_warmup=10, num_samples=4, progress_bar=False,
                     chain_method=chain_method, marginalize=marginalize, seed=3,
                     backend=backend)  # fmt: skip
    stats = fit.idata.sample_stats
    assert stats["step_size"].shape == (3, 4) and stats["n_steps"].values.min() >= 1
    # gradients at once: the 3 vectorised chains, or as many lanes as cores (at most 3)
    at_once = 3 if chain_method == "vectorized" else min(3, len(os.sched_getaffinity(0)))
    assert fit.concurrent == at_once and fit.seconds_per_gradient() > 0
    post = fit.posterior
    assert post["beta"].shape[:2] == (3, 4)
    return np.concatenate([post[v].values.reshape(3, 4, -1)
                           for v in ("beta", "sigma", "r_Subject")], axis=-1)  # fmt: skip


@pytest.mark.parametrize(
    ("marginalize", "backend"), [("all", "numpyro"), ("none", "numpyro"), ("all", "blackjax")]
)
def test_parallel_chains_match_vectorised_chains(marginalize, backend):
    vec = _draws("vectorized", marginalize, backend)
    par = _draws("parallel", marginalize, backend)
    assert np.max(np.abs(vec - par)) < 1e-6 * np.max(np.abs(vec))
    # the chains differ from each other: each lane ran its own chain, in order
    assert np.min(np.abs(par[0] - par[1])) > 0


def test_auto_runs_chains_apart_on_a_cpu():
    assert chain_lanes(3, "auto") == [0, 1, 2]
    assert [list(lane) for lane in chain_lanes(3, "vectorized")] == [[0, 1, 2]]

"""Simulation-based calibration of the marginalised sampler on a tiny model (slow).

Parameters are drawn from the (data-independent) priors, data are simulated,
and the rank of each true value among thinned posterior draws is recorded.
A calibrated sampler gives uniform ranks (Talts et al., 2018); the check is a
chi-square test over 10 bins, for the fixed effect, both scales and one
recovered random effect (which checks the exact recovery too).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from lmmjax.bayes import NutsOptions, build_bayes_model
from lmmjax.bayes.recovery import recover_effects
from lmmjax.bayes.samplers import run_sampler
from lmmjax.design import build_model

PRIORS = {"beta": {"loc": 0.0, "scale": 1.0}, "sigma": {"scale": 1.0}, "sd": {"scale": 1.0}}


@pytest.mark.slow
def test_sbc_ranks_are_uniform():
    rng = np.random.default_rng(7)
    n_groups, per_group, reps, thin = 8, 3, 120, 5
    options = NutsOptions(num_warmup=300, num_samples=99 * thin, num_chains=1,
                               progress_bar=False)  # fmt: skip
    g = np.repeat(np.arange(n_groups), per_group)
    ranks = {"beta": [], "sigma": [], "sd": [], "b0": []}
    for rep in range(reps):
        beta, sigma, sd = rng.normal(), abs(rng.normal()), abs(rng.normal())
        b = rng.normal(scale=sd, size=n_groups)
        y = beta + b[g] + rng.normal(scale=sigma, size=g.size)
        model = build_model(pd.DataFrame({"y": y, "g": g}), "y ~ 1 + (1 | g)")
        bm = build_bayes_model(model, marginalize="all", priors=PRIORS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            draws = run_sampler(bm, options.model_copy(update={"seed": rep}))
        s = {k: v[0, ::thin] for k, v in draws.samples.items()}
        eff = recover_effects(s, bm.data, bm.spec, draws.keys["recovery"])[0]
        ranks["beta"].append(np.sum(s["beta"][:, 0] < beta))
        ranks["sigma"].append(np.sum(s["sigma"] < sigma))
        ranks["sd"].append(np.sum(s["sd_g"][:, 0] < sd))
        ranks["b0"].append(np.sum(np.asarray(eff)[:, 0, 0] < b[0]))
    for name, r in ranks.items():
        counts = np.bincount(np.asarray(r) // 10, minlength=10)
        p = scipy.stats.chisquare(counts).pvalue
        assert p > 1e-3, (name, counts, p)

"""Chains placed on a device mesh (``chain_method: sharded``) sample as vectorised chains do.

Run in a subprocess with two host devices (``--xla_force_host_platform_device_count``).
The sharded program computes the same arithmetic in another fusion, so draws
agree to rounding (1e-6 here after a short warm-up); NUTS trajectories are
chaotic, so long chains then drift apart as statistically equivalent runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import numpy as np, lmmjax, jax
assert jax.local_device_count() == 2
draws = {}
for cm in ("vectorized", "sharded"):
    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy", method="nuts",
                     num_chains=4, num_warmup=10, num_samples=3, progress_bar=False,
                     chain_method=cm, seed=3)
    draws[cm] = np.concatenate([fit.posterior[v].values.reshape(4, 3, -1)
                                for v in ("beta", "sigma", "r_Subject")], axis=-1)
print("maxdiff", np.max(np.abs(draws["vectorized"] - draws["sharded"])))
try:
    lmmjax.lmm("Reaction ~ Days + (1 | Subject)", "bundled:sleepstudy", method="nuts",
               num_chains=3, chain_method="sharded")
except lmmjax.LmmInputError as exc:
    print("error", exc)
"""


def test_sharded_chains_match_vectorised_chains():
    # simulated devices exist on the host platform (also where a GPU is the default)
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env = {**os.environ, **flags}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    diff = float(out.stdout.split("maxdiff")[1].split()[0])
    assert diff < 1e-6
    assert "num_chains (3) must be a multiple of the 2 local devices" in out.stdout

"""Cost of one gradient of the NUTS potential, per model and marginalisation, on this device.

Usage::

    python benchmarks/gradient_cost.py [--data-dir ../shared/data/bcogsci] [--repeats 20]
        [--paper-code PATH_TO_hamiltonian_lme_CHECKOUT]

For the paper's InstEval model and two cognitive data sets (eeg, dillonE1) it
prints the median time of one jitted value-and-gradient of lmmjax's potential
for every variant, each variant's ratio to ``none`` (measured in the same
run), and, for ``none``, the same model written out as a plain NumPyro model
(every effect a sample site, the likelihood a sum over rows), the peer any
NumPyro user would write. With ``--paper-code`` the paper's own model scripts
(a checkout of ``lll6924/hamiltonian_lme``; see ``paper_code.py``) are timed in
the same run, and ``paper / lmmjax`` is their ratio; without it the paper
column holds the issue's earlier measurement on this CPU, marked as such.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import potential_energy

from hmc_models import (
    COGNITIVE,
    INSTEVAL,
    INSTEVAL_GENERAL,
    build,
    gradient_ms,
    markdown,
    median_ms,
)
from paper_code import paper_gradient_ms

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bcogsci"
# median ms per value-and-gradient of the paper's code on this CPU (issue 8's table)
PAPER_MS = {
    ("insteval", "none"): 1.40, ("insteval", "u1"): 2.85, ("insteval", "u2"): 2.66,
    ("insteval", "u3"): 2.51, ("insteval", "all"): 13.3,
    ("eeg", "none"): 1.17, ("eeg", "M1"): 3.65, ("eeg", "M2"): 2.50,
    ("dillonE1", "none"): 0.48, ("dillonE1", "M1"): 0.52, ("dillonE1", "M2"): 0.57,
}  # fmt: skip


def written_out_ms(lmm_model, priors_scale: float, lognormal: bool, repeats: int) -> float:
    """The unmarginalised model written directly in NumPyro (uncorrelated unit effects)."""
    y = jnp.log(lmm_model.y) if lognormal else jnp.asarray(lmm_model.y)
    X = jnp.asarray(lmm_model.X)
    terms = [(jnp.asarray(t.refs), jnp.asarray(t.z), t.nlevels, t.d) for t in lmm_model.terms]

    def model():
        beta = numpyro.sample("beta", dist.Normal(0, priors_scale).expand([X.shape[1]]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        mu = X @ beta
        for k, (refs, z, m, d) in enumerate(terms):
            u = numpyro.sample(f"u{k}", dist.Normal(0, 1).expand([m, d]).to_event(2))
            mu = mu + jnp.sum(z * u[refs], axis=1)
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    params = {"beta": jnp.zeros(X.shape[1]), "sigma": jnp.zeros(())}
    params.update({f"u{k}": jnp.zeros((m, d)) for k, (_, _, m, d) in enumerate(terms)})
    vg = jax.jit(jax.value_and_grad(lambda p: potential_energy(model, (), {}, p)))
    return median_ms(vg, params, repeats=repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-insteval", action="store_true")
    p.add_argument(
        "--paper-code",
        type=Path,
        default=None,
        help="checkout of lll6924/hamiltonian_lme: time its models in this run",
    )
    args = p.parse_args(argv)
    cases = [] if args.skip_insteval else [(INSTEVAL, None), (INSTEVAL_GENERAL, None)]
    if args.data_dir.is_dir():
        cases += [(COGNITIVE["eeg"], args.data_dir), (COGNITIVE["dillonE1"], args.data_dir)]
    else:
        print(f"no data folder {args.data_dir}: cognitive models skipped", file=sys.stderr)
    print(f"device: {jax.devices()[0].device_kind}; float64; median of {args.repeats}")
    rows, none_ms = [], {}
    for spec, data_dir in cases:
        base = spec.model(data_dir)
        name = spec.name.replace("-general", "")
        for variant, marg in spec.variants.items():
            start = time.perf_counter()
            bm = build(spec, marg, lmm_model=base)
            setup = time.perf_counter() - start
            ms = gradient_ms(bm, args.repeats)
            none_ms.setdefault(name, ms if variant == "none" else None)
            row = {"model": name, "variant": variant, "lmmjax ms": ms, "setup s": setup}
            row["x none"] = ms / none_ms[name] if none_ms.get(name) else float("nan")
            row["written-out NumPyro ms"] = float("nan")
            if variant == "none":
                scale = 5.0 if name == "insteval" else 10.0
                row["written-out NumPyro ms"] = written_out_ms(
                    base, scale, spec.likelihood == "lognormal", args.repeats
                )
            if args.paper_code is not None:
                paper = paper_gradient_ms(args.paper_code, name, variant, data_dir, args.repeats)
                row["paper's code ms (this run)"] = paper
                row["paper / lmmjax"] = paper / ms
            else:
                row["paper's code ms (earlier run)"] = PAPER_MS.get((name, variant), float("nan"))
            rows.append(row)
            print(f"  {name:9s} {variant:8s} {ms:9.3f} ms  (setup {setup:.1f} s)", flush=True)
    import pandas as pd

    print(markdown(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

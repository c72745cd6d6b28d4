"""Table 2 of the HMC paper: ETH InstEval, NUTS with none, one or all classes marginalised.

Usage::

    python benchmarks/hmc_insteval.py [--quick] [--warmup 10000] [--samples 100000]
        [--seeds 1 2 3 4 5] [--backend numpyro|blackjax]
        [--variants none u1 u2 u3 all general] [--out benchmarks/results]

The paper's model (Lai, Sheldon & Domke 2024): ``y ~ N(alpha + beta service +
u1[s] + u2[d] + u3[dept], sigma)`` with every ``u ~ N(0, 1)`` (scales fixed at
1), ``alpha ~ N(0, 5)``, ``beta ~ N(0, 1)``, ``sigma ~ HalfNormal(1)``; one chain,
diagonal mass matrix, target acceptance 0.8, tree depth 12, float64. Variants
``none``, ``u1`` (students), ``u2`` (lecturers), ``u3`` (departments) and
``all`` (the eigendecomposition path), plus ``general``: free scales with
HalfNormal(1) priors, everything marginalised through the blocked
factorisation (the paper's method cannot marginalise that model).

Seconds cover building the model (and the eigendecomposition), compilation,
warm-up, sampling and recovery of the marginalised effects. ESS is averaged
within each parameter group; split-R-hat is counted over the first 1,000
draws. Writes ``insteval.csv`` and ``insteval.md`` into ``--out`` with the
paper's A40 seconds beside ours (those are for 10,000 + 100,000 iterations).
``--quick`` (500 + 1,000 iterations, one seed; ``general`` 100 + 100) finishes in
about 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import pandas as pd

from hmc_models import (
    INSTEVAL,
    INSTEVAL_GENERAL,
    PAPER_SECONDS,
    build,
    gradient_ms,
    markdown,
    measure,
    run_arguments,
)
from lmmjax.bayes import NutsOptions

VARIANTS = ("none", "u1", "u2", "u3", "all", "general")


def parse(argv=None) -> argparse.Namespace:
    def add(p):
        p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))

    return run_arguments(__doc__.splitlines()[0], (500, 1000), add, argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = f"{jax.devices()[0].device_kind} ({platform.node()})"
    print(f"InstEval, {args.backend}, {args.warmup} + {args.samples} iterations, on {device}")
    base = INSTEVAL.model()
    rows = []
    for variant in args.variants:
        model = INSTEVAL_GENERAL if variant == "general" else INSTEVAL
        ms = gradient_ms(build(model, model.variants[variant], lmm_model=base))
        print(f"  {variant:8s} potential + gradient {ms:8.3f} ms", flush=True)
        for seed in args.seeds:
            warm, samples = args.warmup, args.samples
            if variant == "general" and args.quick:
                warm, samples = 100, 100  # ~0.1 s per gradient on this CPU
            opts = NutsOptions(
                backend=args.backend, num_warmup=warm, num_samples=samples, num_chains=1,
                target_accept=0.8, max_tree_depth=12, seed=seed, progress_bar=False,
            )  # fmt: skip
            row = measure(model, variant, opts, lmm_model=base)
            row.update(warmup=warm, samples=samples, grad_ms_jit=ms)
            rows.append(row)
            pd.DataFrame(rows).to_csv(args.out / "insteval.csv", index=False)  # so far
            print(f"    seed {seed}: {row['seconds']:.1f} s, {row['ms_per_grad']:.3f} ms/grad, "
                  f"min ESS/s {row['ess_per_s_min']:.3g}", flush=True)  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "insteval.csv", index=False)
    table = summarise(frame)
    text = "\n".join([
        f"# InstEval (Table 2), {time.strftime('%Y-%m-%d')}",
        "",
        f"Device: {device}. Backend {args.backend}. Command: `python "
        f"benchmarks/hmc_insteval.py {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        f"Iterations: {args.warmup} warm-up + {args.samples} draws (general in --quick: "
        "100 + 100); the paper's A40 seconds are for 10,000 + 100,000.",
        "",
        markdown(table),
    ])  # fmt: skip
    (args.out / "insteval.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds per variant, ratios to ``none``, and the paper's seconds."""
    num = frame.drop(columns=["model"]).groupby("variant", sort=False).mean(numeric_only=True)
    out = pd.DataFrame(index=num.index)
    out["seconds"] = num["seconds"]
    if "none" in num.index:
        out["x faster than none"] = num.loc["none", "seconds"] / num["seconds"]
    out["ms/grad"] = num["ms_per_grad"]
    out["compile s"] = num["compile_s"]
    out["min ESS/s"] = num["ess_per_s_min"]
    out["min ESS/sampling s"] = num["ess_per_sampling_s_min"]
    if "none" in num.index:
        out["ESS/s vs none"] = num["ess_per_s_min"] / num.loc["none", "ess_per_s_min"]
    for col in [c for c in num.columns if c.startswith("ess_") and not c.startswith("ess_per")]:
        out[col.replace("ess_", "ESS ")] = num[col]
    out["divergences"] = num["divergences"]
    for col in [c for c in num.columns if c.startswith("rhat>")]:
        out[f"R-hat {col[4:]}"] = num[col]
    out["paper s (A40)"] = [PAPER_SECONDS.get(v, float("nan")) for v in num.index]
    return out.reset_index()


if __name__ == "__main__":
    sys.exit(main())

"""Figure 4 of the HMC paper: nine cognitive-science data sets, marginalised or not.

Usage::

    python benchmarks/hmc_cognitive.py [--data-dir ../shared/data/bcogsci] [--quick]
        [--warmup 10000] [--samples 100000] [--seeds 1 2 3 4 5]
        [--backend numpyro|blackjax] [--datasets dillonE1 eeg ...] [--out benchmarks/results]

Each model has correlated intercepts and slopes for its grouping factors, with
HalfNormal scales and LKJCholesky(2) correlations (priors as the paper's code,
in ``hmc_models.py``). Variants: ``none`` (every effect sampled), ``M1`` (the
subject class marginalised), ``M2`` (the item class) and ``all`` (both; the
paper cannot run it). One chain, NUTS defaults (target 0.8, tree depth 10).

Writes ``cognitive.csv`` (columns ``dataset, variant, seconds, iter_per_s,
ess_per_iter_mean, ess_per_iter_min, ess_per_s_min, divergences, max_rhat``,
plus costs), ``cognitive.md`` and ``cognitive.png`` (iterations per second and
ESS per iteration, marginalised against not) into ``--out``. The data are the
CSV files of the bcogsci R package; a missing folder exits with status 2.
``--quick`` runs 300 + 500 iterations with one seed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import pandas as pd

from hmc_models import (
    COGNITIVE,
    build,
    gradient_ms,
    markdown,
    measure,
    run_arguments,
    variants_of,
)
from lmmjax.bayes import NutsOptions

COLUMNS = ["dataset", "variant", "seconds", "iter_per_s", "ess_per_iter_mean",
           "ess_per_iter_min", "ess_per_s_min", "divergences", "max_rhat"]  # fmt: skip
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bcogsci"


def parse(argv=None) -> argparse.Namespace:
    def add(p):
        names = list(COGNITIVE)
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
        p.add_argument("--datasets", nargs="+", choices=names, default=names)

    return run_arguments(__doc__.splitlines()[0], (300, 500), add, argv)


def main(argv=None) -> int:
    args = parse(argv)
    if not args.data_dir.is_dir():
        print(
            f"hmc_cognitive: error: data folder {str(args.data_dir)!r} not found; it holds "
            "the CSV files of the bcogsci R package (df_dillonE1.csv, df_eeg_complete.csv, ...); "
            "pass it with --data-dir",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = f"{jax.devices()[0].device_kind} ({platform.node()})"
    print(f"cognitive data sets, {args.backend}, {args.warmup} + {args.samples} iterations, "
          f"on {device}")  # fmt: skip
    rows = []
    for name in args.datasets:
        spec = COGNITIVE[name]
        base = spec.model(args.data_dir)
        for variant in variants_of(spec):
            ms = gradient_ms(build(spec, spec.variants[variant], lmm_model=base))
            for seed in args.seeds:
                opts = NutsOptions(
                    backend=args.backend, num_warmup=args.warmup, num_samples=args.samples,
                    num_chains=1, seed=seed, progress_bar=False,
                )  # fmt: skip
                row = measure(spec, variant, opts, lmm_model=base)
                row.update(dataset=name, grad_ms_jit=ms)
                rows.append(row)
                pd.DataFrame(rows).to_csv(args.out / "cognitive-partial.csv", index=False)
                print(f"  {name:9s} {variant:4s} seed {seed}: {row['seconds']:6.1f} s, "
                      f"{ms:7.3f} ms/grad, ESS/iter min {row['ess_per_iter_min']:.3f}, "
                      f"ESS/s min {row['ess_per_s_min']:.3g}", flush=True)  # fmt: skip
    frame = pd.DataFrame(rows)
    extra = ["ess_per_sampling_s_min", "ms_per_grad", "grad_ms_jit", "compile_s", "warmup_s",
             "sampling_s", "seed"]  # fmt: skip
    frame[COLUMNS + extra].to_csv(args.out / "cognitive.csv", index=False)
    table = summarise(frame)
    text = "\n".join([
        f"# Cognitive-science data sets (Figure 4), {time.strftime('%Y-%m-%d')}",
        "",
        f"Device: {device}. Backend {args.backend}. Command: `python "
        f"benchmarks/hmc_cognitive.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
        f"Iterations: {args.warmup} warm-up + {args.samples} draws, one chain.",
        "",
        markdown(table),
    ])  # fmt: skip
    (args.out / "cognitive.md").write_text(text + "\n", encoding="utf-8")
    figure(table, args.out / "cognitive.png")
    print(text)
    return 0


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Means over seeds, and each variant's ESS/s against ``none`` on the same data."""
    cols = ["seconds", "compile_s", "iter_per_s", "ess_per_iter_mean", "ess_per_iter_min",
            "ess_per_s_min", "ess_per_sampling_s_min", "divergences", "max_rhat",
            "grad_ms_jit"]  # fmt: skip
    out = frame.groupby(["dataset", "variant"], sort=False)[cols].mean().reset_index()
    for col, label in [("ess_per_s_min", "ESS/s vs none"),
                       ("ess_per_sampling_s_min", "sampling ESS/s vs none")]:  # fmt: skip
        none = out[out.variant == "none"].set_index("dataset")[col]
        out[label] = out[col] / out["dataset"].map(none)
    return out


def figure(table: pd.DataFrame, path: Path) -> None:
    """Iterations per second and ESS per iteration by data set and variant, as the paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    datasets = list(dict.fromkeys(table["dataset"]))
    variants = list(dict.fromkeys(table["variant"]))
    width = 0.8 / max(1, len(variants))
    for ax, col, label in [(axes[0], "iter_per_s", "iterations per second"),
                           (axes[1], "ess_per_iter_mean", "ESS per iteration (mean)")]:  # fmt: skip
        for k, v in enumerate(variants):
            part = table[table.variant == v].set_index("dataset").reindex(datasets)
            xs = [i + k * width for i in range(len(datasets))]
            ax.bar(xs, part[col], width=width, label=v)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))], datasets, rotation=45)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

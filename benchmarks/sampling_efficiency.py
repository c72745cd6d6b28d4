"""ESS per second of marginalised against unmarginalised NUTS, measured in the same run.

Usage::

    python benchmarks/sampling_efficiency.py [DATA_DIR] [--datasets sleepstudy gg05_rc]
        [--chains 2] [--warmup 500] [--samples 1000] [--backend numpyro] [--seed 0]

``DATA_DIR`` holds the bcogsci CSV files (default ``/work/shared/data/bcogsci``);
they are read from there and never copied into the repository. sleepstudy is
bundled with lmmjax. For each data set and each ``marginalize`` choice (none,
each grouping factor alone, all) the same model, priors, seed and options
are sampled, and the table reports

* ``sample s``: wall time of the sampling phase (after warm-up and compilation);
* ``it/s``: post-warm-up iterations per second, all chains together;
* ``leapfrog``: mean leapfrog steps (gradient evaluations) per iteration;
* ``ESS/it``: the smallest bulk ESS over the fixed effects, sigma, the
  random-effect SDs and correlations, per post-warm-up iteration;
* ``ESS/s``: that smallest bulk ESS per second of sampling;

with divergences and the largest r_hat as a check that every run converged.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import lmmjax  # noqa: F401  (float64, compilation cache)
from lmmjax.bayes import NutsOptions, build_bayes_model, sample_model
from lmmjax.datasets import load_bundled
from lmmjax.design import build_model

DEFAULT_DIR = Path("/work/shared/data/bcogsci")


def _centre(values: pd.Series, high: str) -> np.ndarray:
    """+-0.5 sum coding of a two-level condition, ``high`` coded +0.5."""
    return np.where(values.astype(str) == high, 0.5, -0.5)


# name -> (file, formula, likelihood, categorical columns, data preparation)
DATASETS = {
    "gg05_rc": (
        "df_gg05_rc.csv", "RT ~ c_cond + (c_cond | subj) + (c_cond | item)", "lognormal",
        ["subj", "item"], lambda d: d.assign(c_cond=_centre(d["condition"], "objgap")),
    ),
    "gibsonwu": (
        "df_gibsonwu.csv", "rt ~ c_cond + (c_cond | subj) + (c_cond | item)", "lognormal",
        ["subj", "item"], lambda d: d.assign(c_cond=_centre(d["type"], "obj-ext")),
    ),
    "dillonE1": (
        "df_dillonE1.csv", "rt ~ c_int + (c_int | subj) + (c_int | item)", "lognormal",
        ["subj", "item"], lambda d: d.assign(c_int=_centre(d["int"], "high")),
    ),
    "stroop": (
        "df_stroop.csv", "RT ~ c_cond + (c_cond | subj)", "lognormal", ["subj"],
        lambda d: d.assign(c_cond=_centre(d["condition"], "Incongruent")),
    ),
    "eeg": (
        "df_eeg_complete.csv", "n400 ~ c_cloze + (c_cloze | subj) + (c_cloze | item)", "normal",
        ["subj", "item"], lambda d: d.assign(c_cloze=d["cloze"] - d["cloze"].mean()),
    ),
}  # fmt: skip


def load(name: str, data_dir: Path):
    """(model, likelihood) of one benchmark data set."""
    if name == "sleepstudy":
        df = load_bundled("sleepstudy")
        return build_model(df, "Reaction ~ Days + (Days | Subject)", ["Subject"]), "normal"
    file, formula, likelihood, categorical, prep = DATASETS[name]
    path = data_dir / file
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the bcogsci data directory as DATA_DIR")
    return build_model(prep(pd.read_csv(path)), formula, categorical), likelihood


def modes(model) -> list:
    groups = list(dict.fromkeys(t.group for t in model.terms))
    out: list = ["none"]
    if len(groups) > 1:
        out += [[g] for g in groups]
    return out + ["all"]


def measure(model, likelihood, marginalize, options) -> dict:
    bm = build_bayes_model(model, marginalize=marginalize, likelihood=likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sample_model(bm, options)
        table = fit.posterior_summary()
    ess = float(table["ess_bulk"].min())
    iters = options.num_chains * options.num_samples
    return {
        "marginalize": marginalize if isinstance(marginalize, str) else "+".join(marginalize),
        "warmup s": fit.warmup_seconds,
        "sample s": fit.sampling_seconds,
        "it/s": iters / fit.sampling_seconds,
        "leapfrog": float(np.asarray(fit.idata.sample_stats["n_steps"]).mean()),
        "min ESS": ess,
        "worst": str(table["ess_bulk"].idxmin()),
        "ESS/it": ess / iters,
        "ESS/s": ess / fit.sampling_seconds,
        "div": fit.divergences,
        "max r_hat": fit.max_rhat(),
    }


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--datasets", nargs="+", default=["sleepstudy", "gg05_rc"],
                        choices=["sleepstudy", *DATASETS])  # fmt: skip
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--backend", default="numpyro", choices=["numpyro", "blackjax"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = NutsOptions(
        backend=args.backend, num_warmup=args.warmup, num_samples=args.samples,
        num_chains=args.chains, seed=args.seed, progress_bar=False,
    )  # fmt: skip
    rows = []
    for name in args.datasets:
        model, likelihood = load(name, args.data_dir)
        for marg in modes(model):
            row = {"data": name, **measure(model, likelihood, marg, options)}
            rows.append(row)
            print(f"{name:>10} {row['marginalize']:>12}: ESS/s {row['ESS/s']:8.1f}, "
                  f"ESS/it {row['ESS/it']:.3f}, it/s {row['it/s']:8.1f}", flush=True)  # fmt: skip
    table = pd.DataFrame(rows)
    for name in args.datasets:  # speed-up against the unmarginalised run of the same data
        sel = table["data"] == name
        base = table.loc[sel & (table["marginalize"] == "none"), "ESS/s"].iloc[0]
        table.loc[sel, "vs none"] = table.loc[sel, "ESS/s"] / base
    print(f"\n{args.backend} NUTS, {args.chains} chains x {args.samples} draws after "
          f"{args.warmup} warm-up, seed {args.seed}")  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return table


if __name__ == "__main__":
    main()

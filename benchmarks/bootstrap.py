"""Parametric bootstrap of sleepstudy ``Reaction ~ Days + (Days | Subject)``: lmmjax against lme4.

Usage::

    python benchmarks/bootstrap.py [--nsim 1000] [--skip-lme4]

lmmjax: ``fit.bootstrap(nsim)``, every refit in one vmapped, compiled L-BFGS
(timed in a fresh process: the first call includes compilation, the second
reuses it). lme4: ``bootMer(m, FUN, nsim)`` with the fixed effects, variance
components and sigma, timed inside R in the same run. Prints seconds and the
ratio ``lme4 / lmmjax``, and both sets of 95% percentile intervals.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmmjax

DATA = Path(__file__).resolve().parents[1] / "lmmjax" / "datasets" / "sleepstudy.csv"
FORMULA = "Reaction ~ Days + (Days | Subject)"

R_SCRIPT = """
suppressMessages(library(lme4))
s <- read.csv("{data}")
m <- lmer({formula}, s)
f <- function(x) c(fixef(x), sigma = sigma(x), getME(x, "theta"))
set.seed(1)
t <- system.time(b <- bootMer(m, f, nsim = {nsim}))[["elapsed"]]
cat("seconds", t, "\\n")
print(t(apply(b$t, 2, quantile, c(0.025, 0.975), na.rm = TRUE)))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsim", type=int, default=1000)
    p.add_argument("--skip-lme4", action="store_true")
    args = p.parse_args(argv)
    fit = lmmjax.lmm(FORMULA, str(DATA), ddf="none")
    start = time.perf_counter()
    draws = fit.bootstrap(args.nsim, seed=1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    fit.bootstrap(args.nsim, seed=2)
    second = time.perf_counter() - start
    print(f"lmmjax: {args.nsim} refits in {first:.2f} s (compile included), "
          f"{second:.2f} s compiled")  # fmt: skip
    print(draws.quantile([0.025, 0.975]).T.to_string())
    r = None if args.skip_lme4 else shutil.which("Rscript")
    if r is None:
        print("lme4: skipped (no Rscript, or --skip-lme4)")
        return 0
    script = R_SCRIPT.format(data=DATA, formula=FORMULA, nsim=args.nsim)
    out = subprocess.run([r, "-e", script], capture_output=True, text=True, check=True).stdout
    seconds = float(out.split("seconds", 1)[1].split()[0])
    print(f"lme4 bootMer: {args.nsim} refits in {seconds:.2f} s")
    print(out.split("\n", 1)[1])
    print(f"| tool | seconds | lme4 / tool |\n|---|---|---|\n| lme4 bootMer | {seconds:.2f} | 1 |\n"
          f"| lmmjax, first call (compile included) | {first:.2f} | {seconds / first:.1f} |\n"
          f"| lmmjax, compiled | {second:.2f} | {seconds / second:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

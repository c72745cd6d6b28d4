"""What a user waits for: import, a fresh-process fit, a new model in an open session, NUTS.

Usage::

    python benchmarks/latency.py [--skip-lme4] [--skip-nuts] [--repeats 3]

Measured in one run on this machine, each lmmjax number beside lme4's
(``Rscript`` with lme4, when installed):

* ``import``: a fresh ``python -c "import lmmjax"`` against ``import jax``
  alone and ``Rscript -e "library(lme4)"``;
* CLI fit of ``configs/sleepstudy.yaml`` in a fresh process, with the
  persistent compile cache warm (second run) and cold (an empty cache
  directory), against a whole ``Rscript`` that reads the same CSV and calls
  ``lmer``; then Penicillin and Pastes configs, fitted once each in a fresh
  process whose cache only the sleepstudy run has filled;
* new models in one open session, after one fit of sleepstudy: the bundled
  lme4 data sets and formulas below, each fitted once (compile included),
  against ``lmer`` in one R session;
* NUTS on sleepstudy, 4 chains x (1000 + 1000), whole process, marginalised
  and not, with an empty compile cache and again with it warm.

The import and CLI rows run lmmjax and lme4 alternately, so that a
change in the machine's load falls on both sides. Ratios ``lmmjax / lme4``
below 1 mean lmmjax is faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "lmmjax" / "datasets"
# (data set, formula): the bundled lme4 data sets, several formulas each
MODELS = [
    ("Dyestuff", "Yield ~ 1 + (1 | Batch)"),
    ("Dyestuff2", "Yield ~ 1 + (1 | Batch)"),
    ("Pastes", "strength ~ 1 + (1 | batch/cask)"),
    ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("sleepstudy", "Reaction ~ Days + (1 | Subject)"),
    ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),
    ("sleepstudy", "Reaction ~ 1 + (Days | Subject)"),
    ("Pastes", "strength ~ 1 + (1 | sample)"),
]


# configs fitted by the CLI after only sleepstudy has filled the cache: (config, CSV, formula)
OTHER_CLI = [
    ("penicillin_crossed", "Penicillin.csv", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("pastes_nested", "Pastes.csv", "strength ~ 1 + (1 | batch/cask)"),
]


def _run(cmd, env=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    return time.perf_counter() - start


def _median(fn, repeats: int) -> float:
    return float(np.median([fn() for _ in range(repeats)]))


def _paired(ours, theirs, repeats: int) -> tuple[float, float | None]:
    """Medians of ``ours`` and ``theirs`` (None: not run), the two run alternately.

    Alternating keeps a change in the machine's load (other work shares it)
    from falling on one side of a ratio.
    """
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        if theirs is not None:
            b.append(theirs())
    return float(np.median(a)), (float(np.median(b)) if b else None)


def _session_script() -> str:
    lines = [
        "import time, lmmjax",
        "from lmmjax.datasets import load_data",
        "lmmjax.lmm('Reaction ~ Days + (Days | Subject)', load_data('bundled:sleepstudy'))",
    ]
    for name, formula in MODELS:
        lines += [
            f"d = load_data('bundled:{name}')",
            "t = time.perf_counter()",
            f"lmmjax.lmm({formula!r}, d)",
            "print(time.perf_counter() - t)",
        ]
    return "\n".join(lines)


def _r_session_script() -> str:
    lines = [
        "suppressMessages(library(lme4))",
        f"s <- read.csv('{DATA / 'sleepstudy.csv'}')",
        "invisible(lmer(Reaction ~ Days + (Days | Subject), s))",
    ]
    for name, formula in MODELS:
        lines += [
            f"d <- read.csv('{DATA / (name + '.csv')}')",
            f"t <- system.time(suppressMessages(lmer({formula}, d)))[['elapsed']]",
            "cat(t, '\\n')",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-lme4", action="store_true")
    p.add_argument("--skip-nuts", action="store_true")
    args = p.parse_args(argv)
    r = None if args.skip_lme4 else shutil.which("Rscript")
    py = sys.executable
    rows = []

    def row(what, ours, theirs=None):
        rows.append((what, ours, theirs))
        ratio = f"{ours / theirs:.2f}" if theirs else ""
        peer = f"{theirs:.3f}" if theirs else ""
        print(f"| {what} | {ours:.3f} | {peer} | {ratio} |", flush=True)

    print("| what | lmmjax s | lme4 s | lmmjax / lme4 |\n|---|---|---|---|")
    jax_import = _median(lambda: _run([py, "-c", "import jax"]), args.repeats)
    row("import jax (fresh process)", jax_import)
    r_lib = (lambda: _run([r, "-e", "suppressMessages(library(lme4))"])) if r else None
    row("import lmmjax / Rscript -e library(lme4)",
        *_paired(lambda: _run([py, "-c", "import lmmjax"]), r_lib, args.repeats))  # fmt: skip
    r_script = None
    if r:
        script = (f"suppressMessages(library(lme4)); s <- read.csv('{DATA / 'sleepstudy.csv'}'); "
                  "invisible(lmer(Reaction ~ Days + (Days | Subject), s))")  # fmt: skip
        r_script = lambda: _run([r, "-e", script])  # noqa: E731
    cli = [py, "-m", "lmmjax.fit", "configs/sleepstudy.yaml", "--output", os.devnull]
    _run(cli)  # warm the persistent cache
    warm, r_fit = _paired(lambda: _run(cli), r_script, args.repeats)
    row("CLI sleepstudy fit, fresh process, cache warm", warm, r_fit)

    def cold():
        with tempfile.TemporaryDirectory() as tmp:
            return _run(cli, env={**os.environ, "LMMJAX_CACHE_DIR": tmp})

    cold_fit, r_cold = _paired(cold, r_script, args.repeats)
    row("CLI sleepstudy fit, fresh process, cache cold", cold_fit, r_cold)
    # other data sets and formulas, in a fresh cache that only a sleepstudy CLI run has filled:
    # small models share padded programs (lmmjax.linalg.small), so these are never seen shapes
    # that need no compiling
    for config, data, formula in OTHER_CLI:
        r_other = None
        if r:
            script = (f"suppressMessages(library(lme4)); d <- read.csv('{DATA / data}'); "
                      f"invisible(lmer({formula}, d))")  # fmt: skip
            r_other = _median(lambda script=script: _run([r, "-e", script]), args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "LMMJAX_CACHE_DIR": tmp}
            _run(cli, env=env)
            other = [py, "-m", "lmmjax.fit", f"configs/{config}.yaml", "--output", os.devnull]
            ours = _run(other, env=env)  # first run of this config: nothing of its own cached
        row(f"CLI {config} fit, fresh process, cache holding only sleepstudy's programs", ours,
            r_other)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # new models in one session, nothing cached
        env = {**os.environ, "LMMJAX_CACHE_DIR": tmp}
        out = subprocess.run([py, "-c", _session_script()], check=True, capture_output=True,
                             text=True, env=env, cwd=ROOT).stdout.split()  # fmt: skip
    ours = [float(x) for x in out]
    theirs = [None] * len(ours)
    if r:
        res = subprocess.run([r, "-e", _r_session_script()], check=True, capture_output=True,
                             text=True).stdout.split()  # fmt: skip
        theirs = [float(x) for x in res]
    for (name, formula), a, b in zip(MODELS, ours, theirs, strict=True):
        row(f"new model in session: {name} `{formula}`", a, b)
    med_r = float(np.median(theirs)) if r else None
    row("new model in session: median", float(np.median(ours)), med_r)
    if not args.skip_nuts:
        for marg in ("all", "none"):
            code = ("import lmmjax; lmmjax.lmm('Reaction ~ Days + (Days | Subject)', "
                    "'bundled:sleepstudy', method='nuts', num_chains=4, num_warmup=1000, "
                    f"num_samples=1000, progress_bar=False, marginalize={marg!r})")  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "LMMJAX_CACHE_DIR": tmp}
                row(f"NUTS sleepstudy 4 x (1000 + 1000), {marg}, whole process, cache cold",
                    _run([py, "-c", code], env=env))  # fmt: skip
                row(f"NUTS sleepstudy 4 x (1000 + 1000), {marg}, whole process, cache warm",
                    _run([py, "-c", code], env=env))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

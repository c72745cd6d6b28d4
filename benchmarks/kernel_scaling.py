"""How the NUTS potential scales with N for none, one and all classes marginalised.

Usage::

    python benchmarks/kernel_scaling.py [--sizes 10000 100000 1000000]
                                        [--levels 1000 50] [--repeats 5] [--quick]

Synthetic data with two crossed factors ``a`` (M1 levels) and ``b`` (M2
levels), levels fixed as N grows: ``y ~ x + (1 | a) + (1 | b)``. For each N
and each choice of ``marginalize`` it times one evaluation of the HMC
potential plus its gradient (compiled, data passed as an argument, best of
``--repeats``), the operation NUTS repeats at every leapfrog step:

* ``none``: every effect sampled; the likelihood is a sum over rows (gathers);
* ``one``: ``a`` integrated out (block-diagonal Woodbury, no dense step);
* ``all``: both integrated out (blocked Cholesky with an M2 x M2 dense block).

It prints the times, the ratio of each to ``none`` at the same N, and the
growth from one N to the next next to the growth of N. ``--quick`` runs a
small case (N = 1e3, 1e4 with 100 and 10 levels) to check that it works.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import pandas as pd

import lmmjax  # noqa: F401  (float64, compilation cache)
from lmmjax.bayes import build_bayes_model
from lmmjax.design import build_model

MODES = {"none": "none", "one": ["a"], "all": "all"}


def synthetic(n: int, m1: int, m2: int, rng) -> pd.DataFrame:
    """Two crossed factors, every level used."""
    a = rng.permutation(np.concatenate([np.arange(m1), rng.integers(0, m1, n - m1)]))
    b = rng.permutation(np.concatenate([np.arange(m2), rng.integers(0, m2, n - m2)]))
    x = rng.normal(size=n)
    y = (1.0 + 0.5 * x + rng.normal(0, 0.7, m1)[a] + rng.normal(0, 0.4, m2)[b]
         + rng.normal(size=n))  # fmt: skip
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


def best_of(fn, repeats: int, min_seconds: float = 0.5) -> float:
    """Fastest of at least ``repeats`` calls, repeating until ``min_seconds`` have passed.

    On a shared machine single calls are sometimes stalled by other processes
    (by ~10 ms here); the minimum over many calls measures the kernel itself.
    """
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def time_potential(model, marginalize, repeats: int) -> tuple[float, float, int]:
    """(seconds per potential+gradient, compile seconds, number of parameters)."""
    bm = build_bayes_model(model, marginalize=marginalize)
    params = jax.tree.map(lambda a: a[0], bm.init_params(jax.random.PRNGKey(0), 1))
    vg = jax.jit(jax.value_and_grad(bm.potential))
    start = time.perf_counter()
    jax.block_until_ready(vg(params, bm.data))
    compile_s = time.perf_counter() - start
    npar = sum(int(np.size(v)) for v in params.values())
    return best_of(lambda: vg(params, bm.data), repeats), compile_s, npar


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--levels", type=int, nargs=2, default=[1000, 50])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.levels, args.repeats = [1_000, 10_000], [100, 10], 3
    m1, m2 = args.levels
    rng = np.random.default_rng(1)
    rows = []
    for n in args.sizes:
        model = build_model(synthetic(n, m1, m2, rng), "y ~ x + (1 | a) + (1 | b)")
        row = {"N": n}
        for mode, marg in MODES.items():
            row[mode], row[f"{mode}_compile"], row[f"{mode}_npar"] = time_potential(
                model, marg, args.repeats
            )
        rows.append(row)
        print(f"N = {n}: " + ", ".join(f"{m} {row[m] * 1e3:.3f} ms" for m in MODES), flush=True)

    print(f"\nPotential + gradient per evaluation, two crossed factors with {m1} and {m2} "
          f"levels; JAX {jax.__version__} on {jax.default_backend()}, "
          f"fastest of >= {args.repeats} calls")  # fmt: skip
    head = f"{'N':>9} {'N x':>5} " + " ".join(f"{m + ' ms':>10} {'x':>6}" for m in MODES)
    head += f" {'one/none':>9} {'all/none':>9}"
    print(head)
    prev = None
    for row in rows:
        line = f"{row['N']:>9} {row['N'] / prev['N'] if prev else 1:>5.0f} "
        for m in MODES:
            growth = row[m] / prev[m] if prev else 1.0
            line += f"{row[m] * 1e3:>10.3f} {growth:>6.2f} "
        line += f"{row['one'] / row['none']:>9.2f} {row['all'] / row['none']:>9.2f}"
        print(line)
        prev = row
    print(
        "\n'x' columns: growth from the previous N (compare with 'N x'); parameters sampled: "
        + ", ".join(f"{m} {rows[0][m + '_npar']}" for m in MODES)
    )
    return rows


if __name__ == "__main__":
    main()

"""How the REML engine scales with N at a fixed number of levels.

Usage::

    python benchmarks/reml_scaling.py [--sizes 10000 100000 1000000] [--levels 1000 100]

Synthetic data with two crossed factors. For each N it times

* ``precompute``: the theta-free O(N) pass that builds the blocked system
  (segment sums over rows, the sparsity pattern of the Schur complement);
* ``eval``: one profiled REML objective and its autodiff gradient (compiled).

and prints each time with its ratio to the smallest N next to the ratio of
the N's. The profiled objective touches the N rows only in the precompute:
per evaluation it works on level-sized arrays, so its cost grows with N
only while new pairs of levels keep appearing, and is bounded by
``M1 * M2^2``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import lmmjax  # noqa: F401  (float64, compilation cache)
from lmmjax.design import build_model
from lmmjax.linalg import build_structure, cross_products
from lmmjax.reml import profiled_objective


def synthetic(n, m1, m2, rng):
    a = rng.integers(0, m1, n)
    b = rng.integers(0, m2, n)
    x = rng.normal(size=n)
    y = (1.0 + 0.5 * x + rng.normal(0, 0.7, m1)[a] + rng.normal(0, 0.4, m2)[b]
         + rng.normal(size=n))  # fmt: skip
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--levels", type=int, nargs=2, default=[1000, 100])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    m1, m2 = args.levels
    vg = jax.jit(jax.value_and_grad(lambda th, s, xp: profiled_objective(th, s, xp, True)))
    theta = jnp.array([0.7, 0.4])
    rows = []
    for n in args.sizes:
        model = build_model(synthetic(n, m1, m2, rng), "y ~ x + (1 | a) + (1 | b)")
        Xy = np.column_stack([model.X, model.y])
        pre = best_of(lambda m=model, a=Xy: cross_products(build_structure(m.terms), a).gram, 2)
        struct = build_structure(model.terms)
        xp = cross_products(struct, Xy)
        jax.block_until_ready(vg(theta, struct, xp))  # compile for this shape
        ev = best_of(lambda s=struct, x=xp: vg(theta, s, x), args.repeats)
        rows.append((n, pre, ev, int(struct.pair_entry.shape[0])))
    n0, pre0, ev0, _ = rows[0]
    print(f"\nTwo crossed factors with {m1} and {m2} levels; JAX on {jax.default_backend()}")
    print(f"{'N':>10} {'N ratio':>8} {'precompute s':>13} {'ratio':>7} "
          f"{'eval s':>9} {'ratio':>7} {'Schur pairs':>12}")  # fmt: skip
    for n, pre, ev, pairs in rows:
        print(f"{n:>10} {n / n0:>8.0f} {pre:>13.4f} {pre / pre0:>7.1f} "
              f"{ev:>9.5f} {ev / ev0:>7.2f} {pairs:>12}")  # fmt: skip


if __name__ == "__main__":
    main()

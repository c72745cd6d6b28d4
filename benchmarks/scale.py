"""REML on N rows streamed from Parquet: precompute and fit time, peak memory, truth.

The model is ``y ~ x1 + x2 + (1 | g1) + (1 | g2)`` with crossed factors of
1e5 and 1e3 levels, simulated once and written to ``--dir`` as one Parquet
file per million rows (reused when present). The fit streams the files
(:mod:`lmmjax.stream`) and reports the wall time of the precompute and of the
fit, the peak resident memory of the process (``resource.getrusage``; the data
are written by a child process, so its memory is not counted) and the
estimates against the simulated truth. With ``--compare`` (default up to
N = 1e7) the same model is then fitted in memory from the same files and the
two fits compared. With ``--log-density`` the marginalised NUTS potential
(every class integrated out, read from the same streamed sums) and its
gradient are evaluated at the simulated truth and timed, so that runs with
rows over several devices can be compared with one device's. With ``--nuts K``
NUTS samples the same streamed model (every class marginalised; K warm-up
iterations and K draws per chain, ``--nuts-chains``) and the posterior means
are reported against the truth and the REML fit.

Usage::

    python benchmarks/scale.py --n 1e6
    python benchmarks/scale.py --n 1e7            # streamed, then in memory
    python benchmarks/scale.py --n 1e8 --no-compare
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python benchmarks/scale.py --n 2e6 --devices 4 --no-compare --log-density
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

M1, M2 = 100_000, 1_000
BETA = (1.0, 0.5, -0.3)  # intercept, x1, x2
SD1, SD2, SIGMA = 0.6, 0.4, 1.0
CHUNK = 1_000_000
FORMULA = "y ~ x1 + x2 + (1 | g1) + (1 | g2)"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def generate(n: int, folder: Path, seed: int = 2026) -> None:
    """Write ``n`` rows to ``folder`` in files of ``CHUNK`` rows (skipped when done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "_done"
    if done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    effects = np.random.default_rng(seed)
    b1, b2 = SD1 * effects.normal(size=M1), SD2 * effects.normal(size=M2)
    for k, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        rng = np.random.default_rng([seed, k])
        g1 = rng.integers(0, M1, m, dtype=np.int32)
        g2 = rng.integers(0, M2, m, dtype=np.int32)
        x1, x2 = rng.normal(size=m), rng.normal(size=m)
        y = BETA[0] + BETA[1] * x1 + BETA[2] * x2 + b1[g1] + b2[g2] + SIGMA * rng.normal(size=m)
        table = pa.table({"y": y, "x1": x1, "x2": x2, "g1": g1, "g2": g2})
        pq.write_table(table, folder / f"part-{k:05d}.parquet", row_group_size=CHUNK)
    done.write_text(str(n))


def sums_only(n: int, seed: int = 7) -> dict:
    """Fit ``y ~ 1 + (1 | g1) + (1 | g2)`` at N rows from simulated sums, no rows written.

    Each (g1, g2) cell gets a Poisson(N / 1e8) count of rows; its sum of y and
    within-cell sum of squares are drawn from their exact distributions, so the
    sums over cells are those of N simulated rows. The level-sized structure
    (``B``, the Schur products, ``C``, the Grams) is the one the streamed fit of
    N rows of the main benchmark builds; only reading the rows is skipped.
    """
    import pandas as pd

    from lmmjax.design import build_model
    from lmmjax.linalg import BEntries, RowSums, term_layouts
    from lmmjax.reml import fit_reml
    from lmmjax.stream import from_sums

    rng = np.random.default_rng(seed)
    b1, b2 = SD1 * rng.normal(size=M1), SD2 * rng.normal(size=M2)
    levels = {"g1": np.arange(M1), "g2": np.resize(np.arange(M2), M1)}  # every level once
    proto = build_model(pd.DataFrame({"y": rng.normal(size=M1), **levels}),
                        "y ~ 1 + (1 | g1) + (1 | g2)", drop_aliased=False)  # fmt: skip
    rss0 = peak_rss_gib()
    start = time.perf_counter()
    bent = BEntries(term_layouts(proto.terms))
    first, rest = np.zeros((M1, 1, 2)), np.zeros((M2, 2))
    yy = 0.0
    chunk = 5_000
    for lo in range(0, M1, chunk):
        cnt = rng.poisson(n / (M1 * M2), (chunk, M2)).astype(float)
        mu = BETA[0] + b1[lo : lo + chunk, None] + b2[None, :]
        sy = cnt * mu + np.sqrt(cnt) * SIGMA * rng.normal(size=cnt.shape)
        within = SIGMA**2 * rng.chisquare(np.maximum(cnt - 1, 1)) * (cnt > 1)
        yy += float(np.sum(np.divide(sy**2, cnt, out=np.zeros_like(sy), where=cnt > 0) + within))
        first[lo : lo + chunk, 0] = np.stack([cnt.sum(1), sy.sum(1)], axis=1)
        rest += np.stack([cnt.sum(0), sy.sum(0)], axis=1)
        key = np.flatnonzero(cnt.reshape(-1) > 0)
        bent.add_entries(key + lo * M2, cnt.reshape(-1)[key, None])
    nobs = int(rest[:, 0].sum())
    gram = np.array([[nobs, rest[:, 1].sum()], [rest[:, 1].sum(), yy]])
    sums = RowSums(first[:, :, :1].reshape(M1, 1, 1).copy(), np.diag(rest[:, 0]), first, rest, gram)
    model = from_sums(proto, sums, bent, nobs)
    pre_s = time.perf_counter() - start
    rss_pre = peak_rss_gib()
    start = time.perf_counter()
    fit = fit_reml(model)
    fit_s = time.perf_counter() - start
    out = {"n": nobs, "sums_s": pre_s, "fit_s": fit_s, "lbfgs_evaluations": fit.log.fevals,
           "peak_rss_gib": {"before": rss0, "after_sums": rss_pre, "after_fit": peak_rss_gib()},
           "gram_groups": model.sufficient[0].layout.n_wgroups,
           "b_entries": int(model.sufficient[0].b_row.size), "fit": summary(fit)}  # fmt: skip
    print(f"sums only, N = {nobs:.3e}: simulated sums and structure {pre_s:.1f} s, "
          f"fit {fit_s:.1f} s ({fit.log.fevals} evaluations), peak RSS {peak_rss_gib():.2f} "
          f"GiB (before {rss0:.2f}, after the structure {rss_pre:.2f}); "
          f"{out['gram_groups']} Gram groups, "
          f"{out['b_entries']:,} entries of B")  # fmt: skip
    f = out["fit"]
    print(f"  intercept {f['beta'][0]:.4f} ({BETA[0]}); sd g1 {f['sd']['g1']:.4f} ({SD1}), "
          f"g2 {f['sd']['g2']:.4f} ({SD2}); sigma {f['sigma']:.4f} ({SIGMA})")  # fmt: skip
    return out


def summary(fit) -> dict:
    sd = [float(np.sqrt(c[0, 0])) for c in fit.covariances()]
    names = [t.group for t in fit.model.terms]
    return {
        "objective": float(fit.objective),
        "beta": [float(b) for b in fit.beta],
        "theta": [float(t) for t in fit.theta],
        "sigma": float(fit.sigma),
        "sd": dict(zip(names, sd, strict=True)),
        "converged": bool(fit.converged),
    }


def log_density(model, repeats: int = 3) -> dict:
    """The marginalised NUTS potential and its gradient at the simulated truth, timed.

    The unconstrained point is ``beta``, ``log sigma`` and the terms' log-SDs:
    the same in every run, so that runs over several devices compare exactly.
    """
    import jax

    from lmmjax.bayes import build_bayes_model

    bm = build_bayes_model(model, marginalize="all")
    point = {"beta": np.asarray(BETA), "sigma": np.log(SIGMA), "sd_g1": np.log([SD1]),
             "sd_g2": np.log([SD2])}  # fmt: skip
    run = jax.jit(jax.value_and_grad(lambda p, d: bm.potential(p, d)))
    start = time.perf_counter()
    jax.block_until_ready(run(point, bm.data))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        value, grad = jax.block_until_ready(run(point, bm.data))
    each = (time.perf_counter() - start) / repeats
    flat = np.concatenate([np.ravel(grad[k]) for k in sorted(grad)])
    return {
        "potential": float(value), "gradient": [float(g) for g in flat],
        "gradient_sites": sorted(grad), "first_call_s": first, "per_gradient_s": each,
    }  # fmt: skip


def nuts(model, draws: int, chains: int) -> dict:
    """NUTS from the streamed sums (every class marginalised): time, gradients, posterior."""
    from lmmjax.bayes import fit_nuts

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_nuts(model, marginalize="all", num_warmup=draws, num_samples=draws,
                       num_chains=chains, seed=0, progress_bar=False)  # fmt: skip
    table = fit.posterior_summary()
    return {
        "seconds": time.perf_counter() - start, "warmup_s": fit.warmup_seconds,
        "sampling_s": fit.sampling_seconds, "compile_s": fit.compile_seconds,
        "recovery_s": fit.recovery_seconds, "grad_evals": fit.grad_evals,
        "seconds_per_gradient": fit.seconds_per_gradient(), "divergences": fit.divergences,
        "mean": {k: float(v) for k, v in table["mean"].items()},
        "ess_bulk_min": float(table["ess_bulk"].min()), "r_hat_max": float(fit.max_rhat()),
        "peak_rss_gib": peak_rss_gib(),
    }  # fmt: skip


def rel(a, b) -> float:
    a, b = np.atleast_1d(np.asarray(a, float)), np.atleast_1d(np.asarray(b, float))
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=float, default=1e6, help="rows (1e6, 1e7, 1e8, ...)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lmmjax_scale"),
                        help="where the data are written once and reused")  # fmt: skip
    parser.add_argument("--batch-rows", type=int, default=1_000_000)
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                        help="also fit in memory (default: when N <= 1e7)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sums-only", action="store_true",
                        help="no rows: simulate the sums of y ~ 1 + (1 | g1) + (1 | g2) at N "
                        "and fit (the level-sized memory of N rows)")  # fmt: skip
    parser.add_argument("--log-density", action="store_true",
                        help="the marginalised NUTS potential at the truth")  # fmt: skip
    parser.add_argument("--nuts", type=int, default=0, metavar="K",
                        help="also NUTS from the streamed sums, K warm-up and K draws")  # fmt: skip
    parser.add_argument("--nuts-chains", type=int, default=1)
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n = int(args.n)
    if args.sums_only:
        res = sums_only(n)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"scale_sums_n{n:.0e}.json".replace("+", "")).write_text(json.dumps(res))
        return 0
    folder = args.dir / f"n{n}"
    if args.generate_only:
        generate(n, folder)
        return 0
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--n", str(n), "--dir", str(args.dir),
                    "--generate-only"], check=True)  # fmt: skip
    gen_s = time.perf_counter() - start

    import lmmjax
    from lmmjax.reml import fit_reml
    from lmmjax.stream import stream_model

    devices = args.devices if args.devices == "auto" else int(args.devices)
    rss0 = peak_rss_gib()
    start = time.perf_counter()
    model = stream_model(folder, FORMULA, batch_rows=args.batch_rows, devices=devices)
    pre_s = time.perf_counter() - start
    rss_pre = peak_rss_gib()
    start = time.perf_counter()
    fit = fit_reml(model)
    fit_s = time.perf_counter() - start
    rss_fit = peak_rss_gib()
    struct = model.sufficient[0]
    held = ("b_row", "b_lev", "b_val", "pair_entry", "pair_group", "pair_val", "C", "G1")
    stored = sum(np.asarray(getattr(struct, name)).nbytes for name in held)
    res = {
        "n": n, "batch_rows": args.batch_rows, "devices": str(devices),
        "generate_s": gen_s, "precompute_s": pre_s, "fit_s": fit_s,
        "peak_rss_gib": {"after_import": rss0, "after_precompute": rss_pre, "after_fit": rss_fit},
        "structure_gib": stored / 2**30,
        "schur_numbers": int(struct.pair_val.size), "gram_groups": struct.layout.n_wgroups,
        "lbfgs_evaluations": fit.log.fevals,
        "truth": {"beta": list(BETA), "sd": {"g1": SD1, "g2": SD2}, "sigma": SIGMA},
        "streamed": summary(fit), "lmmjax": lmmjax.__version__,
    }  # fmt: skip
    print(f"N = {n:.0e}: data {gen_s:.1f} s (written once, reused), precompute {pre_s:.1f} s, "
          f"fit {fit_s:.1f} s ({fit.log.fevals} evaluations), peak RSS {rss_fit:.2f} GiB "
          f"(after import {rss0:.2f}, after precompute {rss_pre:.2f})")  # fmt: skip
    lay = struct.layout
    form = "dense B" if lay.dense_b else "per-group products" if lay.dense_pairs else "pairs"
    print(f"  Schur complement from {form} ({lay.n_wgroups} Gram groups, "
          f"{struct.pair_val.size:,} numbers); level-sized structure "
          f"{stored / 2**30:.2f} GiB")  # fmt: skip
    s = res["streamed"]
    print(f"  beta {np.round(s['beta'], 4)} (truth {BETA}); sd g1 {s['sd']['g1']:.4f} "
          f"({SD1}), g2 {s['sd']['g2']:.4f} ({SD2}); sigma {s['sigma']:.4f} ({SIGMA})")  # fmt: skip
    if args.log_density:
        dens = res["log_density"] = log_density(model)
        print(f"  marginalised NUTS potential at the truth {dens['potential']:.10e}; "
              f"gradient {np.round(dens['gradient'], 6)}; {dens['per_gradient_s']:.3f} s per "
              f"evaluation ({dens['first_call_s']:.1f} s the first, compiling)")  # fmt: skip
    if args.nuts:
        post = res["nuts"] = nuts(model, args.nuts, args.nuts_chains)
        print(f"  NUTS ({args.nuts_chains} chain(s), {args.nuts} + {args.nuts}): "
              f"{post['seconds']:.1f} s (compile {post['compile_s']:.1f}, warm-up "
              f"{post['warmup_s']:.1f}, sampling {post['sampling_s']:.1f}), "
              f"{post['grad_evals']} gradients, "
              f"{post['seconds_per_gradient'] * 1e3:.0f} ms each, peak RSS "
              f"{post['peak_rss_gib']:.2f} GiB; posterior means "
              + ", ".join(f"{k} {v:.4f}" for k, v in post["mean"].items()))  # fmt: skip
    compare = args.compare if args.compare is not None else n <= 10_000_000
    if compare:
        import pandas as pd

        from lmmjax.design import build_model

        start = time.perf_counter()
        frame = pd.read_parquet(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memory = fit_reml(build_model(frame, FORMULA))
        mem_s = time.perf_counter() - start
        m = summary(memory)
        res["in_memory"] = {**m, "seconds": mem_s, "peak_rss_gib": peak_rss_gib()}
        res["agreement"] = {
            "objective": rel(s["objective"], m["objective"]),
            "beta": rel(s["beta"], m["beta"]),
            "theta": rel(s["theta"], m["theta"]),
            "sigma": rel(s["sigma"], m["sigma"]),
        }
        print(f"  in memory: {mem_s:.1f} s, peak RSS {peak_rss_gib():.2f} GiB; max relative "
              "difference streamed vs in memory: "
              + ", ".join(f"{k} {v:.1e}" for k, v in res["agreement"].items()))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.devices == "auto" else f"_devices{devices}"
    path = args.out / f"scale_n{n:.0e}{tag}.json".replace("+", "")
    path.write_text(json.dumps(res, indent=2))
    print(f"  written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

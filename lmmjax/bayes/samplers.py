"""NUTS over the shared potential: NumPyro (default) and BlackJAX backends.

Both backends sample the same log density, NumPyro's ``potential_energy`` of
:func:`lmmjax.bayes.model.lmm_model` as a function of the unconstrained
parameters, with the data pytree passed as an argument of the compiled
functions (never closed over as a constant). Chains are vectorised with
``vmap``; seeds are reproducible: one ``jax.random`` key per run is split
into initialisation, warm-up, sampling and recovery keys.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import constrain_fn, potential_energy

from lmmjax.bayes.model import BayesModel, BayesSpec, lmm_model
from lmmjax.cache import compiled, memo
from lmmjax.options import NutsOptions

__all__ = ["Draws", "run_sampler"]


@dataclass
class Draws:
    """Posterior draws and per-draw sampler statistics.

    Attributes
    ----------
    samples : dict of str to numpy.ndarray
        Constrained sample sites, shape (chains, draws, ...).
    stats : dict of str to numpy.ndarray
        ``diverging``, ``tree_depth``, ``n_steps``, ``step_size``,
        ``acceptance_rate``, ``energy`` and ``lp`` (log joint density), shape
        (chains, draws).
    warmup_seconds, sampling_seconds : float
        Wall time of the two phases (warm-up includes compilation). When the
        phases are not timed separately, ``warmup_seconds`` is NaN and
        ``sampling_seconds`` covers both.
    keys : dict
        The recovery key (``"recovery"``) derived from the seed.
    """

    samples: dict
    stats: dict
    warmup_seconds: float
    sampling_seconds: float
    keys: dict = field(default_factory=dict)


def _keys(seed: int) -> dict:
    k_init, k_warm, k_sample, k_rec = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"init": k_init, "warmup": k_warm, "sample": k_sample, "recovery": k_rec}


def _tree_depth(n_steps: np.ndarray) -> np.ndarray:
    """Number of trajectory doublings from the number of leapfrog steps."""
    n = np.maximum(np.asarray(n_steps, dtype=np.int64), 1)
    return (np.floor(np.log2(n)) + 1).astype(np.int64)


# ---------------------------------------------------------------------------------
# NumPyro
# ---------------------------------------------------------------------------------


def _numpyro_mcmc(spec: BayesSpec, s: NutsOptions, shapes):
    """A cached ``numpyro.infer.MCMC`` (its compiled kernels are reused across runs)."""
    from numpyro.infer import MCMC, NUTS

    def build():
        kernel = NUTS(
            partial(lmm_model, spec=spec), target_accept_prob=s.target_accept,
            max_tree_depth=s.max_tree_depth, dense_mass=s.dense_mass,
        )  # fmt: skip
        return MCMC(
            kernel, num_warmup=s.num_warmup, num_samples=s.num_samples,
            num_chains=s.num_chains, chain_method="vectorized",
            progress_bar=s.progress_bar, jit_model_args=True,
        )  # fmt: skip

    key = ("numpyro.MCMC", spec, s.num_warmup, s.num_samples, s.num_chains, s.target_accept,
           s.max_tree_depth, s.dense_mass, s.progress_bar, s.time_phases, shapes)  # fmt: skip
    return memo(key, build)


def _shapes(data) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(data))


def run_numpyro(bm: BayesModel, s: NutsOptions) -> Draws:
    """NumPyro NUTS with vectorised chains."""
    keys = _keys(s.seed)
    init = bm.init_params(keys["init"], s.num_chains)
    if s.num_chains == 1:
        init = jax.tree.map(lambda a: a[0], init)
    mcmc = _numpyro_mcmc(bm.spec, s, _shapes(bm.data))
    fields = ("diverging", "num_steps", "adapt_state.step_size", "accept_prob", "energy",
              "potential_energy")  # fmt: skip
    start = time.perf_counter()
    warm = float("nan")
    if s.time_phases:
        mcmc.warmup(keys["warmup"], bm.data, init_params=init, collect_warmup=False)
        adapted = jax.block_until_ready(mcmc.post_warmup_state)
        warm = time.perf_counter() - start
        # the first sampling run compiles the sampling loop; time a second, identical one
        mcmc.run(keys["sample"], bm.data, extra_fields=fields)
        jax.block_until_ready(mcmc.get_samples())
        mcmc.post_warmup_state = adapted
        start = time.perf_counter()
        mcmc.run(keys["sample"], bm.data, extra_fields=fields)
    else:  # one compiled loop for warm-up and sampling
        mcmc.run(keys["warmup"], bm.data, init_params=init, extra_fields=fields)
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    sampling = time.perf_counter() - start
    extra = mcmc.get_extra_fields(group_by_chain=True)
    n_steps = np.asarray(extra["num_steps"])
    stats = {
        "diverging": np.asarray(extra["diverging"], dtype=bool),
        "tree_depth": _tree_depth(n_steps),
        "n_steps": n_steps.astype(np.int64),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "energy": np.asarray(extra["energy"]),
        "lp": -np.asarray(extra["potential_energy"]),
    }
    samples = {k: np.asarray(v) for k, v in samples.items()}
    return Draws(samples, stats, warm, sampling, keys)


# ---------------------------------------------------------------------------------
# BlackJAX
# ---------------------------------------------------------------------------------


def _logdensity(spec: BayesSpec, data):
    model = partial(lmm_model, spec=spec)
    return lambda params: -potential_energy(model, (data,), {}, params)


def _bj_warmup(keys, init, data, *, spec, num_steps, dense, target, depth):
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    logdensity = _logdensity(spec, data)

    def one(key, position):
        adapt = blackjax.window_adaptation(
            blackjax.nuts, logdensity, is_mass_matrix_diagonal=not dense,
            target_acceptance_rate=target, adaptation_info_fn=get_filter_adapt_info_fn(),
            max_num_doublings=depth,
        )  # fmt: skip
        (state, params), _ = adapt.run(key, position, num_steps=num_steps)
        return state, params["step_size"], params["inverse_mass_matrix"]

    return jax.vmap(one)(keys, init)


def _bj_sample(keys, states, step_size, inv_mass, data, *, spec, num_steps, depth):
    import blackjax

    logdensity = _logdensity(spec, data)

    def one(key, state, eps, imm):
        kernel = blackjax.nuts(logdensity, eps, imm, max_num_doublings=depth)

        def body(st, k):
            st, info = kernel.step(k, st)
            out = (st.position, info.is_divergent, info.num_trajectory_expansions,
                   info.num_integration_steps, info.acceptance_rate, info.energy,
                   st.logdensity)  # fmt: skip
            return st, out

        return jax.lax.scan(body, state, jax.random.split(key, num_steps))

    return jax.vmap(one)(keys, states, step_size, inv_mass)


def _constrain_all(positions, data, spec):
    model = partial(lmm_model, spec=spec)
    return jax.vmap(lambda p: constrain_fn(model, (data,), {}, p))(positions)


def _chunks(n: int, progress: bool) -> list[int]:
    """Chunk lengths for the sampling loop: ~10 equal chunks when showing progress."""
    if not progress or n < 20:
        return [n]
    size = next(c for c in range(math.ceil(n / 10), n + 1) if n % c == 0)
    return [size] * (n // size)


def run_blackjax(bm: BayesModel, s: NutsOptions) -> Draws:
    """BlackJAX NUTS after Stan-style window adaptation, chains vectorised with vmap."""
    from tqdm.auto import tqdm

    keys = _keys(s.seed)
    init = bm.init_params(keys["init"], s.num_chains)
    spec, data = bm.spec, bm.data
    bar = tqdm(total=s.num_warmup + s.num_samples, disable=not s.progress_bar, desc="warmup")
    start = time.perf_counter()
    wkeys = jax.random.split(keys["warmup"], s.num_chains)
    warmup, _ = compiled(
        _bj_warmup, wkeys, init, data, spec=spec, num_steps=max(s.num_warmup, 1),
        dense=s.dense_mass, target=s.target_accept, depth=s.max_tree_depth,
    )  # fmt: skip
    states, eps, imm = warmup(wkeys, init, data)
    jax.block_until_ready(states)
    warm = time.perf_counter() - start
    bar.update(s.num_warmup)
    bar.set_description("sample")
    chunks = _chunks(s.num_samples, s.progress_bar)
    # compiled ahead, so that with time_phases the sampling time excludes compilation
    step, _ = compiled(_bj_sample, wkeys, states, eps, imm, data, spec=spec,
                       num_steps=chunks[0], depth=s.max_tree_depth)  # fmt: skip
    start = time.perf_counter()
    outs = []
    for i, n in enumerate(chunks):
        ckeys = jax.random.split(jax.random.fold_in(keys["sample"], i), s.num_chains)
        states, out = step(ckeys, states, eps, imm, data)
        outs.append(jax.block_until_ready(out))
        bar.update(n)
    bar.close()
    sampling = time.perf_counter() - start
    out = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *outs)
    positions, div, depth, n_steps, acc, energy, lp = out
    flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), positions)
    constrain, _ = compiled(_constrain_all, flat, data, spec=spec)
    constrained = constrain(flat, data)
    samples = {
        k: np.asarray(v).reshape(s.num_chains, s.num_samples, *v.shape[1:])
        for k, v in constrained.items()
        if k in positions
    }
    stats = {
        "diverging": np.asarray(div, dtype=bool),
        "tree_depth": np.asarray(depth, dtype=np.int64),
        "n_steps": np.asarray(n_steps, dtype=np.int64),
        "step_size": np.broadcast_to(np.asarray(eps)[:, None], div.shape).copy(),
        "acceptance_rate": np.asarray(acc),
        "energy": np.asarray(energy),
        "lp": np.asarray(lp),
    }
    return Draws(samples, stats, warm, sampling, keys)


def run_sampler(bm: BayesModel, settings: NutsOptions) -> Draws:
    """Run NUTS with the backend named in ``settings``.

    Parameters
    ----------
    bm : BayesModel
    settings : NutsOptions

    Returns
    -------
    Draws
    """
    if settings.backend == "numpyro":
        return run_numpyro(bm, settings)
    if settings.backend == "blackjax":
        return run_blackjax(bm, settings)
    raise ValueError(f"unknown backend {settings.backend!r}; use 'numpyro' or 'blackjax'")

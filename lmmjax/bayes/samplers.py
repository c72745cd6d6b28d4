"""NUTS over the shared potential: NumPyro (default) and BlackJAX backends.

Both backends sample the same log density, NumPyro's ``potential_energy`` of
:func:`lmmjax.bayes.model.lmm_model` as a function of the unconstrained
parameters, with the data pytree passed as an argument of the compiled
functions (never closed over as a constant). Chains run side by side or
vectorised with ``vmap`` (:func:`chain_lanes`); seeds are reproducible: a
NumPy generator seeded by the run's seed draws the initialisation, warm-up,
sampling and recovery keys (:func:`_keys`).

Small models compile the sampler without XLA's LLVM optimisation passes
(:data:`lmmjax.cache.QUICK_COMPILE`) when the run is predicted to be short:
``(num_warmup + num_samples) * QUICK_STEPS * t`` below ``QUICK_SECONDS``, with
``t`` the cost model's seconds per gradient (:func:`lmmjax.bayes.auto.gradient_seconds`).
When chains were vectorised, on Orthodont (``all``, 4 chains x 2,000
iterations) that halved the compile (20.4 -> 10.2 s) and doubled the
per-gradient cost (0.09 -> 0.18 ms): the fit went from 28.9 to 22.0 s. With
one unbatched program per chain over a flat position vector the compile
barely shrinks (sleepstudy and Orthodont, 2 chains x 300 iterations: 0-0.6 s,
within the noise) while the gradient still costs 1.5-2x, and at 4 x 2,000
iterations Orthodont took 7.2 s quick against 5.7 s optimised; so only runs
predicted under a quarter of a second (and the recovery's draws) compile quickly.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import constrain_fn, potential_energy

from lmmjax.bayes.auto import gradient_seconds
from lmmjax.bayes.model import BayesModel, BayesSpec, lmm_model, user_beta
from lmmjax.cache import compile_seconds, compiled
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
        Wall time of the two phases, each without compilation.
    compile_seconds : float
        Time spent tracing and compiling the sampler's programs (both phases).
    grad_evals : dict
        ``{"warmup": n, "sampling": n}``: leapfrog steps (gradient evaluations)
        summed over chains and iterations.
    keys : dict
        The recovery key (``"recovery"``) derived from the seed.
    concurrent : int
        Gradients evaluated at once: the chains of a vectorised step, or the
        lanes run side by side on threads.
    """

    samples: dict
    stats: dict
    warmup_seconds: float
    sampling_seconds: float
    compile_seconds: float = 0.0
    grad_evals: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    concurrent: int = 1


class _Phase:
    """Times a block: wall seconds and the compile seconds spent inside it."""

    def __enter__(self) -> _Phase:
        self.start, self.compile0 = time.perf_counter(), compile_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.compile = compile_seconds() - self.compile0
        self.seconds = time.perf_counter() - self.start - self.compile


QUICK_STEPS = 32  # gradients per iteration assumed by the quick-compile rule
QUICK_SECONDS = 0.25  # predicted sampling seconds below which the sampler compiles quickly


def predicted_seconds(bm: BayesModel, gradients: float) -> float:
    """The cost model's seconds for a program that costs about ``gradients`` gradients.

    Infinite for streamed data (``bm.moments``): large by construction, and the
    cost model's count of ``B``'s pairs reads the rows.
    """
    spec, model = bm.spec, bm.model
    if bm.moments is not None:
        return math.inf
    t = gradient_seconds(model.terms, spec.marginal, model.nobs, spec.p, fast=spec.fast,
                         row_sigma=spec.sigma_model is not None)  # fmt: skip
    return gradients * t


def quick_compile(bm: BayesModel, gradients: float) -> bool:
    """Whether a program that costs about ``gradients`` gradients is quick to compile.

    True when :func:`predicted_seconds` is below :data:`QUICK_SECONDS`.
    """
    return predicted_seconds(bm, gradients) < QUICK_SECONDS


def _sampler_gradients(s: NutsOptions) -> float:
    """The gradients the quick-compile rule assumes for a sampler's run."""
    return (s.num_warmup + s.num_samples) * QUICK_STEPS


def _raw_keys(rng: np.random.Generator, *lead: int) -> np.ndarray:
    """Raw keys of JAX's default random implementation, ``lead`` of them, drawn by ``rng``."""
    shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
    return rng.integers(0, 2**32, size=(*lead, *shape), dtype=np.uint32)


def _keys(seed: int, num_chains: int) -> dict:
    """The run's random keys, drawn with NumPy from ``seed``.

    ``init`` seeds the starting points, ``warmup`` holds one key per chain,
    ``sample`` seeds BlackJAX's per-chunk keys and ``recovery`` the recovered
    effects. Splitting a JAX key eagerly would compile small programs (0.2-0.4 s
    of each fit, none of them worth the persistent cache).
    """
    rng = np.random.default_rng(seed)
    return {"init": _raw_keys(rng), "warmup": _raw_keys(rng, num_chains),
            "sample": _raw_keys(rng), "recovery": _raw_keys(rng)}  # fmt: skip


def _tree_depth(n_steps: np.ndarray) -> np.ndarray:
    """Number of trajectory doublings from the number of leapfrog steps."""
    n = np.maximum(np.asarray(n_steps, dtype=np.int64), 1)
    return (np.floor(np.log2(n)) + 1).astype(np.int64)


# ---------------------------------------------------------------------------------
# NumPyro
# ---------------------------------------------------------------------------------


def _sites(bm: BayesModel) -> tuple:
    """The sample sites as ``((name, shape), ...)`` in tree order (sorted names)."""
    shapes = bm.site_shapes()
    return tuple((name, tuple(shapes[name])) for name in sorted(shapes))


def _ravel(tree: dict, sites: tuple) -> np.ndarray:
    """Sites (any leading axes) -> one flat position vector per leading index (NumPy)."""
    parts = []
    for name, shape in sites:
        a = np.asarray(tree[name])
        parts.append(a.reshape(*a.shape[: a.ndim - len(shape)], math.prod(shape)))
    return np.concatenate(parts, axis=-1)


def _unravel(flat, sites: tuple) -> dict:
    """Flat position vectors (any leading axes; NumPy or JAX) -> the sites."""
    out, start = {}, 0
    for name, shape in sites:
        size = math.prod(shape)
        out[name] = flat[..., start : start + size].reshape(*flat.shape[:-1], *shape)
        start += size
    return out


def _nuts_kernels(spec: BayesSpec, data, *, sites, num_warmup, target, depth, dense):
    """NumPyro's functional NUTS kernels over the potential of one flat position vector.

    A flat vector instead of a dict of sites: NumPyro's tree building and
    leapfrog act on every leaf of the position, so one leaf means fewer
    operations (a 41-dimensional stand-in potential compiled in 1.42 s flat,
    2.03 s as 7 sites, and stepped in 6 against 10 us).

    ``hmc()`` keeps the warm-up schedule and tree depth, set by ``init_kernel``,
    in its closure: trace ``init`` before ``sample_kernel`` (the callers do, as
    part of their own program; a separate abstract trace of ``init`` here cost
    0.5-0.9 s of tracing per sleepstudy fit).
    """
    from numpyro.infer.hmc import hmc

    model = partial(lmm_model, spec=spec)

    def gen(d):
        return lambda z: potential_energy(model, (d,), {}, _unravel(z, sites))

    init_kernel, sample_kernel = hmc(potential_fn_gen=gen, algo="NUTS")

    def init(z, key, inverse_mass):
        return init_kernel(
            z, num_warmup, inverse_mass_matrix=inverse_mass, target_accept_prob=target,
            dense_mass=dense, max_tree_depth=depth, model_args=(data,), rng_key=key,
        )  # fmt: skip

    return init, sample_kernel


def _inverse_mass(bm: BayesModel, num_chains: int, dense: bool) -> np.ndarray:
    """Each chain's starting inverse mass matrix, :meth:`BayesModel.inverse_mass_guess`.

    Flattened as the positions (:func:`_ravel`); ``(chains, D)``, or
    ``(chains, D, D)`` diagonal with ``dense``. NumPy, like every start a lane picks.
    """
    flat = _ravel(bm.inverse_mass_guess(), _sites(bm))
    flat = np.diag(flat) if dense else flat
    return np.ascontiguousarray(np.broadcast_to(flat, (num_chains, *flat.shape)))


def _nuts_state_shapes(init_params, keys, *, num_warmup, target, depth, dense, vectorize):
    """Shapes and dtypes of the chains' NUTS state, without tracing the potential.

    The state's structure depends on the positions' shapes alone, so NumPyro's
    ``init_kernel`` over a stand-in quadratic potential gives it (tracing the
    model's potential for this cost 0.7 s on sleepstudy). ``_nuts_run``'s
    ``lax.cond`` checks that its initial state has exactly these types.
    """
    from numpyro.infer.hmc import hmc

    def stand_in(z):
        return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(z))

    init_kernel, _ = hmc(potential_fn=stand_in, algo="NUTS")

    def init(z, key):
        return init_kernel(z, num_warmup, target_accept_prob=target, dense_mass=dense,
                           max_tree_depth=depth, rng_key=key)  # fmt: skip

    return jax.eval_shape(jax.vmap(init) if vectorize else init, init_params, keys)


def _nuts_run(state, starts, keys, start, n, data, *, spec, sites, num_warmup, target, depth,
              dense, buffer, vectorize=True):  # fmt: skip
    """``n`` NUTS transitions of every chain, from ``starts`` when ``start``.

    ``starts`` holds the chains' initial flat positions (:func:`_ravel` over
    ``sites``) and inverse mass matrices;
    with ``vectorize``, every array has a leading axis of chains, otherwise
    the program runs one chain (a while loop over a batch of one chain costs
    batching rules: tracing dillonE1's program took 5.7 s, 3.8 s of it in them).

    ``n`` and ``start`` are traced, so one program serves initialisation,
    warm-up, sampling and every progress-bar chunk; the first ``min(n,
    buffer)`` positions and statistics are written into arrays of ``buffer`` steps.
    """
    opts = dict(sites=sites, num_warmup=num_warmup, target=target, depth=depth, dense=dense)
    init, sample_kernel = _nuts_kernels(spec, data, **opts)
    positions, inverse_mass = starts
    over = jax.vmap if vectorize else (lambda f: f)
    state = jax.lax.cond(start, lambda: over(init)(positions, keys, inverse_mass), lambda: state)
    step = over(lambda st: sample_kernel(st, model_args=(data,)))

    def record(st):
        return (st.z, st.diverging, st.num_steps, st.adapt_state.step_size, st.accept_prob,
                st.energy, st.potential_energy)  # fmt: skip

    out0 = jax.tree.map(lambda a: jnp.zeros((buffer, *a.shape), a.dtype), record(state))

    def body(i, carry):
        st, out = carry
        st = step(st)
        out = jax.tree.map(lambda b, v: b.at[i].set(v, mode="drop"), out, record(st))
        return st, out

    return jax.lax.fori_loop(0, n, body, (state, out0))


def _chain_sharding():
    """Chains (the leading axis) split over a mesh of every local device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.local_devices()), ("chains",))
    return NamedSharding(mesh, PartitionSpec("chains"))


def _shard_chains(init, keys, data, num_chains: int):
    """Chains' starting points and keys along the device mesh; the data on every device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from lmmjax.errors import LmmInputError

    n = jax.local_device_count()
    if num_chains % n:
        raise LmmInputError(
            f"chain_method 'sharded': num_chains ({num_chains}) must be a multiple of the "
            f"{n} local devices"
        )
    chains = _chain_sharding()
    replicated = NamedSharding(chains.mesh, PartitionSpec())
    return (jax.device_put(init, chains), jax.device_put(keys, chains),
            jax.device_put(data, replicated))  # fmt: skip


def chain_lanes(num_chains: int, chain_method: str) -> list:
    """The chains of each program run: one vectorised lane (an index array), or one per chain.

    ``"auto"`` is ``"parallel"`` on a CPU and ``"vectorized"`` elsewhere. On a
    CPU a vectorised batch of chains costs the sum of their gradients (the
    dense factorisations are LAPACK calls, one per chain) and every iteration
    waits for the chain with the longest trajectory, so chains run as
    separate programs, one per core at a time: dillonE1 with both classes
    marginalised, 500 values and gradients of one chain took 0.14-0.16 s, of
    two chains on two threads 0.15-0.18 s, of four vectorised chains 0.62-0.65 s
    (LAPACK on one thread, see :func:`_over_lanes`).
    """
    if chain_method == "auto":
        chain_method = "parallel" if jax.default_backend() == "cpu" else "vectorized"
    if chain_method == "parallel":
        return list(range(num_chains))
    return [np.arange(num_chains)]


def _lane_of(tree, lane):
    """A lane's part of every chain's arrays: all of them, or one chain's slice."""
    return jax.tree.map(lambda a: a[lane], tree) if isinstance(lane, int) else tree


def _at_once(lanes: list) -> int:
    """Gradients evaluated at once: a vectorised lane's chains, or the lanes run side by side."""
    return _workers(len(lanes)) if isinstance(lanes[0], int) else len(lanes[0])


def _workers(lanes: int) -> int:
    """Threads that run lanes at once: one per core this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(lanes, cores))


def _over_lanes(fn, lanes: list) -> list:
    """``[fn(lane) for lane in lanes]``, the lanes run on a pool of :func:`_workers` threads.

    JAX releases the interpreter lock while a compiled program runs, so the
    lanes' programs run side by side on the cores. The LAPACK that JAX calls
    on a CPU (SciPy's OpenBLAS) is held to one thread meanwhile: its threads
    fought the lanes' (dillonE1 as in :func:`chain_lanes`, 500 gradients of
    two chains on two threads took 0.47-0.71 s with OpenBLAS's own two
    threads, 0.15 s with one) and gain nothing on blocks this small.
    """
    if len(lanes) == 1:
        return [fn(lanes[0])]
    from threadpoolctl import threadpool_limits

    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(_workers(len(lanes))) as pool,
    ):
        return list(pool.map(fn, lanes))


def _interleave(step, lanes: int, chunks: list[int], workers: int) -> tuple[list, list]:
    """Run every lane through ``chunks`` in order, the lanes interleaved on ``workers`` threads.

    ``step(k, state, n)`` advances lane ``k`` by ``n`` iterations from
    ``state`` (None: the lane's start) and returns the new state and that
    chunk's records. A free thread takes, of the lanes that no thread holds,
    the one with the fewest chunks done, so that the lanes advance together
    and finish within about one chunk of each other. Run lane by lane, four
    chains on two cores left a core idle while the last chain of each phase
    finished (dillonE1: 0.2-1.4 s per phase). With ``workers == 1`` the lanes
    run one after another in this thread.

    Returns
    -------
    outs : list of lists
        Per lane, each chunk's records.
    seconds : list of numpy.ndarray
        Per lane, each chunk's wall time.
    """
    states, outs = [None] * lanes, [[] for _ in range(lanes)]
    seconds = [np.zeros(len(chunks)) for _ in range(lanes)]
    if workers <= 1:
        for k in range(lanes):
            for i, n in enumerate(chunks):
                start = time.perf_counter()
                states[k], out = step(k, states[k], n)
                outs[k].append(out)
                seconds[k][i] = time.perf_counter() - start
        return outs, seconds
    from threadpoolctl import threadpool_limits

    cond, busy, errors = threading.Condition(), set(), []

    def worker():
        while True:
            with cond:
                while True:
                    free = [k for k in range(lanes) if k not in busy and len(outs[k]) < len(chunks)]
                    if free or errors or all(len(o) == len(chunks) for o in outs):
                        break
                    cond.wait()
                if not free or errors:
                    cond.notify_all()
                    return
                k = min(free, key=lambda j: (len(outs[j]), j))
                busy.add(k)
                i = len(outs[k])
            try:
                start = time.perf_counter()
                state, out = step(k, states[k], chunks[i])
                took = time.perf_counter() - start
            except BaseException as exc:  # noqa: BLE001  (raised again in the caller's thread)
                with cond:
                    errors.append(exc)
                    busy.discard(k)
                    cond.notify_all()
                return
            with cond:
                states[k] = state
                outs[k].append(out)
                seconds[k][i] = took
                busy.discard(k)
                cond.notify_all()

    with threadpool_limits(limits=1, user_api="blas"):  # see _over_lanes
        threads = [
            threading.Thread(target=worker, name=f"lmmjax-chain-{w}") for w in range(workers)
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException as exc:  # Ctrl-C: the threads stop after their current chunk
            with cond:
                errors.append(exc)
                cond.notify_all()
            for t in threads:
                t.join()
            raise
    if errors:
        raise errors[0]
    return outs, seconds


def run_numpyro(bm: BayesModel, s: NutsOptions) -> Draws:
    """NumPyro's NUTS kernel driven by one compiled loop, over lanes of chains.

    NumPyro's ``MCMC`` compiles one loop for warm-up and another for sampling
    and initialises chains with many small eager operations; on sleepstudy
    those compilations were most of a fit's time. Here the same kernels run in
    a loop whose length is an argument, so warm-up, sampling and every
    progress-bar chunk share one program; it is vectorised over the chains of
    a lane (:func:`chain_lanes`), and every lane runs the same program.
    """
    from tqdm.auto import tqdm

    keys = _keys(s.seed, s.num_chains)
    spec, data = bm.spec, bm.data
    sites = _sites(bm)
    init = _ravel(bm.init_params(keys["init"], s.num_chains), sites)
    starts = (init, _inverse_mass(bm, s.num_chains, s.dense_mass))
    ckeys = keys["warmup"]
    if s.chain_method == "sharded":
        starts, ckeys, data = _shard_chains(starts, ckeys, data, s.num_chains)
    lanes = chain_lanes(s.num_chains, s.chain_method)
    vectorize = not isinstance(lanes[0], int)
    lane_starts = [_lane_of((starts, ckeys), c) for c in lanes]  # a sharded placement is kept
    opts = dict(spec=spec, sites=sites, num_warmup=s.num_warmup, target=s.target_accept,
                depth=s.max_tree_depth, dense=s.dense_mass)  # fmt: skip
    split = s.progress_bar or len(lanes) > _workers(len(lanes))  # chunks to interleave lanes
    warm_chunks = _chunks(s.num_warmup, split) if s.num_warmup else []
    sample_chunks = _chunks(s.num_samples, split)
    buffer = max([*warm_chunks, *sample_chunks])
    bar = tqdm(
        total=(s.num_warmup + s.num_samples) * s.num_chains,
        unit="draw",
        disable=not s.progress_bar,
        desc="warmup",
    )  # draws of all chains
    first_starts, first_keys = lane_starts[0]
    shapes = _nuts_state_shapes(first_starts[0], first_keys, num_warmup=s.num_warmup,
                                target=s.target_accept, depth=s.max_tree_depth,
                                dense=s.dense_mass, vectorize=vectorize)  # fmt: skip
    state0 = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    if s.chain_method == "sharded":
        state0 = jax.device_put(state0, _chain_sharding())
    flag = np.asarray(True)
    quick = quick_compile(bm, _sampler_gradients(s))
    chunks = [*warm_chunks, *sample_chunks]
    with _Phase() as phase:  # compiled here, once for every lane
        run, _ = compiled(_nuts_run, state0, first_starts, first_keys, flag, np.asarray(1),
                          data, buffer=buffer, quick=quick, vectorize=vectorize,
                          **opts)  # fmt: skip
        lock = threading.Lock()

        def step(k, state, n):
            """Lane ``k`` advanced ``n`` steps from ``state`` (None: its start), and the records."""
            lane_start, lane_keys = lane_starts[k]
            state, out = run(state0 if state is None else state, lane_start, lane_keys,
                             np.asarray(state is None), np.asarray(n), data)  # fmt: skip
            out = jax.tree.map(lambda a: np.asarray(a)[:n], out)  # no program
            with lock:
                bar.update(n * (len(lane_keys) if vectorize else 1))
                if bar.n >= s.num_warmup * s.num_chains:
                    bar.set_description("sample")
            return state, out

        outs, seconds = _interleave(step, len(lanes), chunks, _workers(len(lanes)))
    bar.close()
    # the two phases overlap across lanes: the wall time split by their chunks' shares
    nwarm = len(warm_chunks)
    warm_share = sum(sec[:nwarm].sum() for sec in seconds) / max(sum(sec.sum() for sec in seconds),
                                                                 1e-300)  # fmt: skip
    warm_seconds, sample_seconds = phase.seconds * warm_share, phase.seconds * (1 - warm_share)
    warm_steps = sum(int(np.sum(out[2])) for lane in outs for out in lane[:nwarm])
    per_lane = [jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *lane[nwarm:])
                for lane in outs]  # fmt: skip
    if vectorize:  # (draws, chains, ...) -> (chains, draws, ...)
        out = jax.tree.map(lambda a: np.swapaxes(a, 0, 1), per_lane[0])
    else:
        out = jax.tree.map(lambda *xs: np.stack(xs), *per_lane)
    positions, div, n_steps, eps, acc, energy, pe = out
    samples = _constrained_samples(_unravel(positions, sites), data, spec, quick)
    stats = {
        "diverging": np.asarray(div, dtype=bool),
        "tree_depth": _tree_depth(n_steps),
        "n_steps": np.asarray(n_steps, dtype=np.int64),
        "step_size": np.asarray(eps),
        "acceptance_rate": np.asarray(acc),
        "energy": np.asarray(energy),
        "lp": -np.asarray(pe),
    }
    grads = {"warmup": warm_steps, "sampling": int(np.sum(n_steps))}
    return Draws(samples, stats, warm_seconds, sample_seconds, phase.compile, grads, keys,
                 _at_once(lanes))  # fmt: skip


# ---------------------------------------------------------------------------------
# BlackJAX
# ---------------------------------------------------------------------------------


def _logdensity(spec: BayesSpec, data):
    model = partial(lmm_model, spec=spec)
    return lambda params: -potential_energy(model, (data,), {}, params)


def _bj_warmup(keys, init, data, *, spec, num_steps, dense, target, depth, vectorize=True):
    import blackjax
    from blackjax.adaptation.base import get_filter_adapt_info_fn

    logdensity = _logdensity(spec, data)

    def one(key, position):
        adapt = blackjax.window_adaptation(
            blackjax.nuts, logdensity, is_mass_matrix_diagonal=not dense,
            target_acceptance_rate=target, max_num_doublings=depth,
            adaptation_info_fn=get_filter_adapt_info_fn(info_keys={"num_integration_steps"}),
        )  # fmt: skip
        (state, params), info = adapt.run(key, position, num_steps=num_steps)
        steps = jnp.sum(info.info.num_integration_steps)
        return state, params["step_size"], params["inverse_mass_matrix"], steps

    return (jax.vmap(one) if vectorize else one)(keys, init)


def _bj_sample(keys, states, step_size, inv_mass, data, *, spec, num_steps, depth,
               vectorize=True):  # fmt: skip
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

    return (jax.vmap(one) if vectorize else one)(keys, states, step_size, inv_mass)


def _constrain_all(positions, data, spec):
    """Constrained sites of every draw; fixed effects on the user's scale when centred."""
    model = partial(lmm_model, spec=spec)
    out = jax.vmap(lambda p: constrain_fn(model, (data,), {}, p))(positions)
    if spec.intercept >= 0:
        out["beta"] = user_beta(out["beta"], data.x_shift, spec.intercept)
    return out


def _constrained_samples(positions, data, spec, quick: bool = False) -> dict:
    """Unconstrained positions (chains, draws, ...) -> constrained sample sites, same shape."""
    chains, draws = jax.tree.leaves(positions)[0].shape[:2]
    flat = jax.tree.map(lambda a: np.asarray(a).reshape(-1, *a.shape[2:]), positions)
    constrain, _ = compiled(_constrain_all, flat, data, spec=spec, quick=quick)
    return {
        k: np.asarray(v).reshape(chains, draws, *v.shape[1:])
        for k, v in constrain(flat, data).items()
        if k in positions
    }


def _chunks(n: int, split: bool) -> list[int]:
    """Chunk lengths for the sampling loop: ~10 equal chunks when ``split``, else one.

    Split to show progress, and to interleave more lanes than threads (:func:`_interleave`).
    """
    if not split or n < 20:
        return [n]
    size = next(c for c in range(math.ceil(n / 10), n + 1) if n % c == 0)
    return [size] * (n // size)


def run_blackjax(bm: BayesModel, s: NutsOptions) -> Draws:
    """BlackJAX NUTS after Stan-style window adaptation, over the lanes of :func:`chain_lanes`."""
    from tqdm.auto import tqdm

    keys = _keys(s.seed, s.num_chains)
    init = bm.init_params(keys["init"], s.num_chains)
    spec, data = bm.spec, bm.data
    bar = tqdm(total=(s.num_warmup + s.num_samples) * s.num_chains, unit="draw",
               disable=not s.progress_bar, desc="warmup")  # fmt: skip
    # NumPy, as every key and start a lane picks: indexing a JAX array would compile
    # small programs in the lanes' threads at once, whose summed compile times the
    # phases' wall times cannot absorb
    wkeys = keys["warmup"]
    lanes = chain_lanes(s.num_chains, s.chain_method)
    vectorize = not isinstance(lanes[0], int)
    width = len(lanes[0]) if vectorize else 1

    quick = quick_compile(bm, _sampler_gradients(s))
    opts = dict(spec=spec, depth=s.max_tree_depth, quick=quick, vectorize=vectorize)
    lock = threading.Lock()
    with _Phase() as warm:
        warmup, _ = compiled(_bj_warmup, _lane_of(wkeys, lanes[0]), _lane_of(init, lanes[0]), data,
                             num_steps=max(s.num_warmup, 1), dense=s.dense_mass,
                             target=s.target_accept, **opts)  # fmt: skip

        def warm_lane(c):
            out = jax.block_until_ready(warmup(_lane_of(wkeys, c), _lane_of(init, c), data))
            with lock:
                bar.update(s.num_warmup * width)
            return out

        adapted = _over_lanes(warm_lane, lanes)
    bar.set_description("sample")
    chunks = _chunks(s.num_samples, s.progress_bar)
    with _Phase() as sample:
        states, eps, imm, _ = adapted[0]
        step, _ = compiled(_bj_sample, _lane_of(wkeys, lanes[0]), states, eps, imm, data,
                           num_steps=chunks[0], **opts)  # fmt: skip

        chunk_keys = _raw_keys(np.random.default_rng(keys["sample"]), len(chunks), s.num_chains)

        def sample_lane(lane):
            c, (states, eps, imm, _) = lane
            outs = []
            for i, n in enumerate(chunks):
                ckeys = chunk_keys[i]
                states, out = step(_lane_of(ckeys, c), states, eps, imm, data)
                outs.append(jax.tree.map(np.asarray, out))
                with lock:
                    bar.update(n * width)
            return jax.tree.map(lambda *xs: np.concatenate(xs, axis=int(vectorize)),
                                *outs)  # fmt: skip

        per_lane = _over_lanes(sample_lane, list(zip(lanes, adapted, strict=True)))
    bar.close()
    if vectorize:  # (chains, draws, ...) already
        out = per_lane[0]
    else:
        out = jax.tree.map(lambda *xs: np.stack(xs), *per_lane)
    positions, div, depth, n_steps, acc, energy, lp = out
    eps = np.stack([np.asarray(a[1]) for a in adapted]) if not vectorize else adapted[0][1]
    warm_steps = sum(int(np.sum(a[3])) for a in adapted)
    samples = _constrained_samples(positions, data, spec, quick)
    stats = {
        "diverging": np.asarray(div, dtype=bool),
        "tree_depth": np.asarray(depth, dtype=np.int64),
        "n_steps": np.asarray(n_steps, dtype=np.int64),
        "step_size": np.broadcast_to(np.asarray(eps)[:, None], div.shape).copy(),
        "acceptance_rate": np.asarray(acc),
        "energy": np.asarray(energy),
        "lp": np.asarray(lp),
    }
    grads = {"warmup": warm_steps, "sampling": int(np.sum(n_steps))}
    return Draws(samples, stats, warm.seconds, sample.seconds, warm.compile + sample.compile,
                 grads, keys, _at_once(lanes))  # fmt: skip


def run_sampler(bm: BayesModel, options: NutsOptions) -> Draws:
    """Run NUTS with the backend named in ``options``.

    Parameters
    ----------
    bm : BayesModel
    options : NutsOptions

    Returns
    -------
    Draws
    """
    if options.backend == "numpyro":
        return run_numpyro(bm, options)
    if options.backend == "blackjax":
        return run_blackjax(bm, options)
    raise ValueError(f"unknown backend {options.backend!r}; use 'numpyro' or 'blackjax'")

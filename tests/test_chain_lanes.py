"""Chains run as separate programs (``chain_method: parallel``) sample as vectorised chains do.

Each chain uses the same key, starting point and mass matrix whichever way it
runs; only the fusion of the arithmetic differs, so after a short warm-up the
draws agree to rounding (NUTS trajectories are chaotic: long runs drift apart
as statistically equivalent chains).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import lmmjax
from lmmjax.bayes.samplers import chain_lanes


def _draws(chain_method: str, marginalize: str, backend: str = "numpyro") -> np.ndarray:
    fit = lmmjax.lmm("Reaction ~ Days + (Days | Subject)", "bundled:sleepstudy", method="nuts",
                     num_chains=3, num_warmup=10, num_samples=4, progress_bar=False,
                     chain_method=chain_method, marginalize=marginalize, seed=3,
                     backend=backend)  # fmt: skip
    stats = fit.idata.sample_stats
    assert stats["step_size"].shape == (3, 4) and stats["n_steps"].values.min() >= 1
    # gradients at once: the 3 vectorised chains, or as many lanes as cores (at most 3)
    at_once = 3 if chain_method == "vectorized" else min(3, len(os.sched_getaffinity(0)))
    assert fit.concurrent == at_once and fit.seconds_per_gradient() > 0
    post = fit.posterior
    assert post["beta"].shape[:2] == (3, 4)
    return np.concatenate([post[v].values.reshape(3, 4, -1)
                           for v in ("beta", "sigma", "r_Subject")], axis=-1)  # fmt: skip


@pytest.mark.parametrize(
    ("marginalize", "backend"), [("all", "numpyro"), ("none", "numpyro"), ("all", "blackjax")]
)
def test_parallel_chains_match_vectorised_chains(marginalize, backend):
    vec = _draws("vectorized", marginalize, backend)
    par = _draws("parallel", marginalize, backend)
    assert np.max(np.abs(vec - par)) < 1e-6 * np.max(np.abs(vec))
    # the chains differ from each other: each lane ran its own chain, in order
    assert np.min(np.abs(par[0] - par[1])) > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an accelerator vectorises")
def test_auto_runs_chains_apart_on_a_cpu():
    assert chain_lanes(3, "auto") == [0, 1, 2]
    assert [list(lane) for lane in chain_lanes(3, "vectorized")] == [[0, 1, 2]]


def _counting_step(log):
    """A lane's state is the list of chunk sizes it ran; ``log`` records the order of calls."""

    def step(k, state, n):
        state = [] if state is None else state
        log.append(k)
        return [*state, n], (k, n)

    return step


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_interleaved_lanes_run_every_chunk_in_order(workers):
    from lmmjax.bayes.samplers import _interleave

    log, chunks = [], [3, 3, 5, 5, 5]
    outs, seconds = _interleave(_counting_step(log), 4, chunks, workers)
    assert [[n for _, n in lane] for lane in outs] == [chunks] * 4
    assert all(k == lane for lane, recs in enumerate(outs) for k, _ in recs)
    assert sorted(log) == sorted(list(range(4)) * len(chunks))
    assert all(sec.shape == (len(chunks),) and (sec >= 0).all() for sec in seconds)
    if workers > 1:  # lanes advance together: no lane is two chunks ahead of another's start
        done = dict.fromkeys(range(4), 0)
        for k in log:
            done[k] += 1
            assert done[k] - min(done.values()) <= workers
    else:  # one after another, in this thread
        assert log == sorted(log)


def test_an_error_in_one_lane_is_raised_and_stops_the_others():
    from lmmjax.bayes.samplers import _interleave

    calls = []

    def step(k, state, n):
        calls.append(k)
        if k == 2:
            raise RuntimeError("lane 2 failed")
        return state, None

    with pytest.raises(RuntimeError, match="lane 2 failed"):
        _interleave(step, 4, [1] * 10, 2)
    assert len(calls) < 4 * 10  # the other lanes stopped too


def test_an_interrupt_stops_the_lanes_after_their_current_chunks(monkeypatch):
    import threading
    import time

    from lmmjax.bayes.samplers import _interleave

    calls = []

    def step(k, state, n):
        calls.append(k)
        time.sleep(0.01)
        return state, None

    join = threading.Thread.join
    interrupted = []

    def join_once(self, timeout=None):
        if not interrupted:  # Ctrl-C while the caller waits for the lanes
            interrupted.append(True)
            time.sleep(0.05)
            raise KeyboardInterrupt
        return join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", join_once)
    with pytest.raises(KeyboardInterrupt):
        _interleave(step, 4, [1] * 200, 2)
    monkeypatch.setattr(threading.Thread, "join", join)
    assert not [t for t in threading.enumerate() if t.name.startswith("lmmjax-chain")]
    assert len(calls) < 4 * 200

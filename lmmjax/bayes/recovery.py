"""Exact recovery of marginalised random effects, one Gaussian draw per posterior draw.

Given a posterior draw of ``(beta, sigma, Sigma, b_sampled)``, the marginalised
classes have the Gaussian conditional given by
:func:`lmmjax.linalg.conditional_moments` (or :func:`lmmjax.linalg.eigen_moments`
on the fast path), drawn from the same factorisation as the potential. The
draws are mapped with ``jax.lax.map`` over the posterior, one at a time or in
vectorised batches (on a CPU a batch's rules cost compile time and gain little
on small problems; see :data:`lmmjax.bayes.fit.LOOP_SECONDS`).
"""

from __future__ import annotations

import jax
import numpy as np

from lmmjax.bayes.marginal import (
    KernelData,
    relative_factors,
    residual_products,
    row_scaled_products,
)
from lmmjax.bayes.model import (
    BayesSpec,
    cov_factors_from_params,
    effects_from_params,
    log_sigma_from_params,
)
from lmmjax.cache import compiled
from lmmjax.linalg import (
    conditional_moments,
    eigen_moments,
    factor_entries,
)

__all__ = ["draw_effects", "recover_effects"]


def draw_effects(params, data: KernelData, spec: BayesSpec, key) -> tuple:
    """Every term's random effects ``b_l`` (M_l, d_l) for one posterior draw.

    Sampled classes are returned as they are; marginalised classes are drawn
    exactly from their Gaussian conditional.

    Parameters
    ----------
    params : mapping
        Constrained sample sites of one draw.
    data : KernelData
    spec : BayesSpec
    key : jax.random key

    Returns
    -------
    tuple of arrays (M_l, d_l), in model term order
    """
    factors = cov_factors_from_params(params, spec)
    effects = effects_from_params(params, factors, spec)
    if not any(spec.marginal):
        return effects
    beta = params["beta"]
    sub = tuple(c for c, m in zip(factors, spec.marginal, strict=True) if m)
    if spec.sigma_model is not None:  # row-scaled system, absolute factors, unit SD
        log_sigma = log_sigma_from_params(params, data, spec)
        struct, xp = row_scaled_products(beta, effects, data, log_sigma)
        draw = conditional_moments(struct, sub, xp, 1.0, key=key).draw
    elif spec.fast:
        sigma = params["sigma"]
        scale = params["sd_shared"] if spec.shared_scale else 1.0
        rot = data.eig.products.residual(beta)
        return eigen_moments(data.struct, data.eig, scale / sigma, rot, sigma, key=key).draw
    else:
        sigma, xp = params["sigma"], residual_products(beta, effects, data)
        lambdas = relative_factors(sub, sigma)
        draw = conditional_moments(data.struct, lambdas, xp, sigma, key=key).draw
    drawn = iter(draw)
    return tuple(next(drawn) if m else b for b, m in zip(effects, spec.marginal, strict=True))


def _recover(samples, key, data, spec, batch_size, draws):
    """Effects of ``samples`` (padded to whole batches); draw i uses the i-th split of ``key``."""
    n = jax.tree.leaves(samples)[0].shape[0]
    keys = jax.random.split(key, draws)[np.arange(n) % draws]
    batch = None if batch_size == 1 else batch_size  # 1: a plain loop, not vmapped
    return jax.lax.map(
        lambda xs: draw_effects(xs[0], data, spec, xs[1]), (samples, keys), batch_size=batch
    )


def _default_batch(data: KernelData, spec: BayesSpec, budget: float = 2.5e8) -> int:
    """Draws per batch so that the per-draw dense blocks stay within ``budget`` bytes."""
    dense = factor_entries(data.struct) if data.struct is not None and not spec.fast else 0
    nobs = data.y.shape[0]
    n_effects = sum(m * d for m, d in zip(spec.nlevels, spec.d, strict=True))
    per_draw = 8.0 * (dense + 4 * nobs + 4 * n_effects)
    return int(max(1, min(256, budget // per_draw)))


def recover_effects(samples, data: KernelData, spec: BayesSpec, key, batch_size: int | None = None,
                    quick: bool = False):  # fmt: skip
    """Random effects of every term for every draw.

    Parameters
    ----------
    samples : mapping of str to array
        Constrained sample sites with one leading draw axis (chains flattened).
    data : KernelData
    spec : BayesSpec
    key : jax.random key
        One key for the whole posterior; draw i uses the i-th split.
    batch_size : int, optional
        Draws vectorised at once (memory grows with it; 1: one after another);
        by default :func:`_default_batch`.
    quick : bool
        Compile without LLVM passes (small models, where compiling dominates).

    Returns
    -------
    tuple of numpy.ndarray (n_draws, M_l, d_l)
    """
    n = jax.tree.leaves(samples)[0].shape[0]
    if batch_size is None:
        batch_size = _default_batch(data, spec)
    batch = max(1, min(batch_size, n))
    # whole batches only: padded with repeats of the first draws, cut off afterwards
    # (lax.map's separate remainder batch has been seen to stall XLA on the CPU); on the
    # host, as the key's split inside the program: eager JAX would compile small programs
    idx = np.arange(-(-n // batch) * batch) % n
    args = (jax.tree.map(lambda a: np.asarray(a)[idx], dict(samples)), key, data)
    run, _ = compiled(_recover, *args, spec=spec, batch_size=batch, draws=n, quick=quick)
    return tuple(np.asarray(e)[:n] for e in run(*args))

"""Exact recovery of marginalised random effects, one Gaussian draw per posterior draw.

Given a posterior draw of ``(beta, sigma, Sigma, b_sampled)``, the marginalised
classes have the Gaussian conditional (in spherical coordinates, ``b = Lambda u``)

    u | y ~ N(A^{-1} Lambda' Z' r, sigma^2 A^{-1}),   A = Lambda' Z' Z Lambda + I,

drawn as ``u = L^{-T} (L^{-1} c + sigma e)`` with ``e ~ N(0, I)`` from the same
blocked factor as the potential. In the eigen fast path
``A = Q diag(1 + s^2 lam / sigma^2) Q'`` gives the draw in O(D^2).
The draws are mapped with ``jax.lax.map`` (batched ``vmap``) over the posterior.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from lmmjax.bayes.marginal import KernelData, residual, tzt
from lmmjax.bayes.model import BayesSpec, chols_from_params, effects_from_params
from lmmjax.linalg import (
    blocked_to_terms,
    factorize,
    lambda_zt,
    solve_lower,
    solve_upper,
)

__all__ = ["draw_effects", "recover_effects"]


def _draw_blocked(r, sigma, chols, data: KernelData, key) -> list:
    """Marginalised terms' effects ``b_l`` (M_l, d_l) through the blocked factor."""
    struct = data.struct
    lambdas = tuple(c / sigma for c in chols)
    factor = factorize(struct, lambdas)
    c1, c2 = lambda_zt(struct, lambdas, r)
    w1, w2 = solve_lower(struct, factor, c1, c2)
    k1, k2 = jax.random.split(key)
    e1 = jax.random.normal(k1, w1.shape, w1.dtype)
    e2 = jax.random.normal(k2, w2.shape, w2.dtype)
    u1, u2 = solve_upper(struct, factor, w1 + sigma * e1, w2 + sigma * e2)
    us = blocked_to_terms(struct, u1, u2)
    return [jnp.einsum("ac,mck->ma", lam, u) for lam, u in zip(lambdas, us, strict=True)]


def _draw_eigen(r, sigma, scale, data: KernelData, spec: BayesSpec, key) -> list:
    """Every term's effects through the precomputed eigendecomposition."""
    eig = data.eig
    c = eig.Q.T @ tzt(r, data, spec.nlevels)
    s2lam = scale**2 * eig.lam
    e = jax.random.normal(key, c.shape, c.dtype)
    v = scale**2 * c / (sigma**2 + s2lam) + scale * e / jnp.sqrt(1.0 + s2lam / sigma**2)
    u = eig.Q @ v
    out, start = [], 0
    for t, m, d in zip(eig.T, spec.nlevels, spec.d, strict=True):
        out.append(u[start : start + m * d].reshape(m, d) @ t.T)
        start += m * d
    return out


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
    chols = chols_from_params(params, spec)
    effects = effects_from_params(params, chols, spec)
    if not any(spec.marginal):
        return effects
    r = residual(params["beta"], effects, data)
    sigma = params["sigma"]
    if spec.fast:
        scale = params["sd_shared"] if spec.shared_scale else 1.0
        return tuple(_draw_eigen(r, sigma, scale, data, spec, key))
    sub = tuple(c for c, m in zip(chols, spec.marginal, strict=True) if m)
    drawn = iter(_draw_blocked(r, sigma, sub, data, key))
    return tuple(next(drawn) if m else b for b, m in zip(effects, spec.marginal, strict=True))


@partial(jax.jit, static_argnames=("spec", "batch_size"))
def _recover(samples, data, key, spec, batch_size):
    n = jax.tree.leaves(samples)[0].shape[0]
    keys = jax.random.split(key, n)
    return jax.lax.map(
        lambda xs: draw_effects(xs[0], data, spec, xs[1]), (samples, keys), batch_size=batch_size
    )


def _default_batch(data: KernelData, spec: BayesSpec, budget: float = 2.5e8) -> int:
    """Draws per batch so that the per-draw dense blocks stay within ``budget`` bytes."""
    q_rest = data.struct.layout.q_rest if data.struct is not None else 0
    nobs = data.y.shape[0]
    n_effects = sum(m * d for m, d in zip(spec.nlevels, spec.d, strict=True))
    per_draw = 8.0 * (q_rest * q_rest + 4 * nobs + 4 * n_effects)
    return int(max(1, min(256, budget // per_draw)))


def recover_effects(samples, data: KernelData, spec: BayesSpec, key, batch_size: int | None = None):
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
        Draws vectorised at once (memory grows with it); by default as many as
        keep the per-draw dense blocks within about 250 MB.

    Returns
    -------
    tuple of arrays (n_draws, M_l, d_l)
    """
    n = jax.tree.leaves(samples)[0].shape[0]
    if batch_size is None:
        batch_size = _default_batch(data, spec)
    return _recover(dict(samples), data, key, spec, max(1, min(batch_size, n)))

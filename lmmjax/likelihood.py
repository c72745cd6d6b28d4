"""Profiled REML/ML objectives (lme4's penalised least squares) and their pieces."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmmjax.linalg import Structure, factorize, logdet, make_lambdas, solve_lower
from lmmjax.linalg.blocked import Factor, first_left, logdet_and_quad, rest_left


class PLS(NamedTuple):
    """Penalised least-squares solution at one theta.

    Attributes
    ----------
    factor : Factor
        Blocked Cholesky factor of ``A(theta)``.
    logdet_A : scalar
    Lxy : (p + 1, p + 1)
        Lower Cholesky factor of the Schur complement of ``[X y]``: its top-left
        block is ``R_X'`` and its last diagonal entry is the root of the
        penalised residual sum of squares.
    V1, V2 : blocked ``L^{-1} Lambda' Z' [X y]``
    """

    factor: Factor
    logdet_A: jax.Array
    Lxy: jax.Array
    V1: jax.Array
    V2: jax.Array


def nobs(struct: Structure) -> int:
    """Number of observations (static)."""
    return struct.refs[0].shape[0]


def solve_pls(theta: jax.Array, struct: Structure) -> PLS:
    """Factor ``A(theta)`` and the appended ``[X y]`` system.

    Parameters
    ----------
    theta : array
        Covariance parameters in lme4's order.
    struct : Structure
        Built with X and y appended.
    """
    layout = struct.layout
    lambdas = make_lambdas(theta, layout)
    factor = factorize(struct, lambdas)
    U1 = first_left(struct.ZtXy1, lambdas[0])
    U2 = rest_left(struct.ZtXy_rest, lambdas, layout) if layout.has_rest else struct.ZtXy_rest
    V1, V2 = solve_lower(struct, factor, U1, U2)
    gram = struct.XytXy - jnp.einsum("mak,mal->kl", V1, V1) - V2.T @ V2
    return PLS(factor, logdet(factor), jnp.linalg.cholesky(gram), V1, V2)


def profiled_criterion(logdet_A, Lxy, n: int, p: int, reml: bool) -> jax.Array:
    """lme4's REML criterion or ML deviance (-2 log-likelihood).

    Parameters
    ----------
    logdet_A : scalar
        ``log|A(theta)|``.
    Lxy : array (p + 1, p + 1)
        Lower Cholesky factor of the ``[X y]`` Schur complement (see :class:`PLS`).
    n, p : int
        Observations and fixed effects.
    reml : bool
    """
    r2 = Lxy[p, p] ** 2
    if reml:
        nmp = n - p
        ldx = 2.0 * jnp.sum(jnp.log(jnp.diagonal(Lxy)[:p]))
        return logdet_A + ldx + nmp * (1.0 + jnp.log(2.0 * jnp.pi * r2 / nmp))
    return logdet_A + n * (1.0 + jnp.log(2.0 * jnp.pi * r2 / n))


def profiled_objective(theta: jax.Array, struct: Structure, reml: bool = True) -> jax.Array:
    """The profiled REML criterion (``reml=True``) or deviance as a function of theta.

    Comparable with lme4's ``REMLcrit()`` and ``deviance()``. Equal to
    the criterion of :func:`solve_pls`'s solution but never factors the dense block
    itself: :func:`lmmjax.linalg.blocked.logdet_and_quad` gives the
    log-determinant and quadratic forms with a cheaper gradient.
    """
    layout = struct.layout
    n, p = nobs(struct), layout.p
    lambdas = make_lambdas(theta, layout)
    U1 = first_left(struct.ZtXy1, lambdas[0])
    U2 = rest_left(struct.ZtXy_rest, lambdas, layout) if layout.has_rest else struct.ZtXy_rest
    logdet_A, quad = logdet_and_quad(struct, lambdas, U1, U2)
    Lxy = jnp.linalg.cholesky(struct.XytXy - quad)
    return profiled_criterion(logdet_A, Lxy, n, p, reml)


class Estimates(NamedTuple):
    """Everything a fit reports that follows from theta by one PLS solution."""

    objective: jax.Array
    beta: jax.Array  # (p,)
    sigma: jax.Array
    vcov: jax.Array  # (p, p)
    b: tuple  # per term (M_l, d_l) conditional modes


def estimates(theta: jax.Array, struct: Structure, reml: bool = True) -> Estimates:
    """Fixed effects, sigma, their covariance and the conditional modes at theta."""
    from lmmjax.linalg import blocked_to_terms, solve_upper

    layout = struct.layout
    n, p = nobs(struct), layout.p
    pls = solve_pls(theta, struct)
    Lxx, lyx, r = pls.Lxy[:p, :p], pls.Lxy[p, :p], pls.Lxy[p, p]
    beta = jax.scipy.linalg.solve_triangular(Lxx.T, lyx, lower=False)
    sigma = jnp.abs(r) / jnp.sqrt(n - p if reml else n)
    Linv = jax.scipy.linalg.solve_triangular(Lxx, jnp.eye(p, dtype=Lxx.dtype), lower=True)
    vcov = sigma**2 * Linv.T @ Linv
    # conditional modes: u = L^{-T} L^{-1} Lambda' Z' (y - X beta), b = Lambda u
    coef = jnp.concatenate([-beta, jnp.ones(1, dtype=beta.dtype)])
    u1, u2 = solve_upper(struct, pls.factor, (pls.V1 @ coef)[..., None], (pls.V2 @ coef)[:, None])
    b = tuple(
        jnp.einsum("ac,mc->ma", lam, u_l[..., 0])
        for lam, u_l in zip(pls.factor.lambdas, blocked_to_terms(struct, u1, u2), strict=True)
    )
    objective = profiled_criterion(pls.logdet_A, pls.Lxy, n, p, reml)
    return Estimates(objective, beta, sigma, vcov, b)

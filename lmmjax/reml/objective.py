"""The profiled REML criterion and ML deviance (lme4's penalised least squares).

Everything is a function of theta and two pytrees built once per fit: the
Z-only :class:`~lmmjax.linalg.Structure` and the
:class:`~lmmjax.linalg.CrossProducts` of ``M = [X y]``. With
``V = I + Z Lambda Lambda' Z'``, :func:`lmmjax.linalg.gls_gram` gives
``log|V|`` and ``M' V^{-1} M``; the lower Cholesky factor of the latter holds
``R_X'`` in its top-left block and the root of the penalised residual sum of
squares in its last diagonal entry.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmmjax.cache import compiled
from lmmjax.linalg import (
    CrossProducts,
    SmallLayout,
    SmallSystem,
    Structure,
    build_structure,
    cholesky,
    closed_form_fits,
    conditional_moments,
    cross_products,
    gls_gram,
    make_lambdas,
    small_derivatives,
    small_system,
    tri_solve,
)
from lmmjax.precision import float_dtype

__all__ = [
    "Estimates",
    "beta_vcov",
    "blocked_problem",
    "deviance",
    "least_squares_shift",
    "small_problem",
    "estimates",
    "nfixed",
    "profiled_criterion",
    "profiled_objective",
    "small_vcov_pieces",
    "vcov_pieces",
    "weighted_problem",
]


def profiled_criterion(logdet_A, Lxy, n, p, reml: bool) -> jax.Array:
    """lme4's REML criterion or ML deviance (-2 log-likelihood).

    Parameters
    ----------
    logdet_A : scalar
        ``log|A(theta)|`` (equal to ``log|V|``).
    Lxy : array (k, k)
        Lower Cholesky factor of ``[X y]' V^{-1} [X y]``, y last; any columns
        between X's and y are padding with unit diagonal.
    n, p : int or scalar array
        Observations and (true) fixed effects.
    reml : bool
    """
    r2 = Lxy[-1, -1] ** 2
    if reml:
        nmp = n - p
        ldx = 2.0 * jnp.sum(jnp.log(jnp.diagonal(Lxy)[:-1]))
        return logdet_A + ldx + nmp * (1.0 + jnp.log(2.0 * jnp.pi * r2 / nmp))
    return logdet_A + n * (1.0 + jnp.log(2.0 * jnp.pi * r2 / n))


def _profiled(theta, struct: Structure, xp: CrossProducts, reml: bool):
    lambdas = make_lambdas(theta, struct)
    logdet_A, gram = gls_gram(struct, lambdas, xp)
    Lxy = cholesky(gram)
    return lambdas, Lxy, profiled_criterion(logdet_A, Lxy, struct.nobs, nfixed(struct, gram), reml)


def nfixed(struct, gram):
    """The number of fixed effects: a small system's (its X may be padded) or the Gram's."""
    return struct.p if isinstance(struct, SmallSystem) else gram.shape[0] - 1


def profiled_objective(
    theta: jax.Array, struct: Structure, xp: CrossProducts, reml: bool = True
) -> jax.Array:
    """The profiled REML criterion (``reml=True``) or deviance as a function of theta.

    Comparable with lme4's ``REMLcrit()`` and ``deviance()``.
    """
    return _profiled(theta, struct, xp, reml)[2]


class Estimates(NamedTuple):
    """Everything a fit reports that follows from theta by one solution."""

    objective: jax.Array
    beta: jax.Array  # (p,)
    sigma: jax.Array
    vcov: jax.Array  # (p, p)
    b: tuple  # per term (M_l, d_l) conditional modes


def estimates(
    theta: jax.Array, struct: Structure, xp: CrossProducts, reml: bool = True
) -> Estimates:
    """Fixed effects, sigma, their covariance and the conditional modes at theta."""
    lambdas, Lxy, objective = _profiled(theta, struct, xp, reml)
    n, p = struct.nobs, nfixed(struct, Lxy)
    Lxx, lyx, r = Lxy[:-1, :-1], Lxy[-1, :-1], Lxy[-1, -1]
    beta = tri_solve(Lxx, lyx[:, None], transpose=True)[:, 0]
    sigma = jnp.abs(r) / jnp.sqrt(n - p if reml else n)
    eye = jnp.eye(Lxx.shape[0], dtype=Lxx.dtype)
    Linv = tri_solve(Lxx, eye)  # p x p: the covariance is reported
    vcov = sigma**2 * Linv.T @ Linv
    b = conditional_moments(struct, lambdas, xp.residual(beta), sigma).mean
    return Estimates(objective, beta, sigma, vcov, b)


def _parts(varpar, struct: Structure, xp: CrossProducts):  # or a SmallSystem and its products
    theta, sigma = varpar[:-1], varpar[-1]
    logdet_a, gram = gls_gram(struct, make_lambdas(theta, struct), xp)
    L = jnp.linalg.cholesky(gram)
    return theta, sigma, logdet_a, L


def deviance(varpar, struct: Structure, xp: CrossProducts, nobs, reml: bool):
    """-2 log-likelihood (REML or ML) at ``varpar = (theta, sigma)``, beta profiled out."""
    _, sigma, logdet_a, L = _parts(varpar, struct, xp)
    p = nfixed(struct, L)
    r2 = L[-1, -1] ** 2
    if reml:  # padded columns of a small system have unit diagonal: log 1 = 0
        ldx = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)[:-1]))
        return logdet_a + ldx + (nobs - p) * jnp.log(2 * jnp.pi * sigma**2) + r2 / sigma**2
    return logdet_a + nobs * jnp.log(2 * jnp.pi * sigma**2) + r2 / sigma**2


def beta_vcov(varpar, struct: Structure, xp: CrossProducts):
    """``sigma^2 (X' V^-1 X)^-1`` at ``varpar``."""
    _, sigma, _, L = _parts(varpar, struct, xp)
    Linv = tri_solve(L[:-1, :-1], jnp.eye(L.shape[0] - 1, dtype=L.dtype))
    return sigma**2 * Linv.T @ Linv


def vcov_pieces(varpar, struct, xp, nobs, reml: bool):
    """Satterthwaite's pieces at ``varpar``: the deviance's Hessian ``H``, ``Cov(beta)`` ``C``
    and its Jacobian ``J`` (p, p, k) in ``varpar`` (:mod:`lmmjax.reml.inference`).
    """
    # reverse over reverse: the Schur block's log-det has a custom VJP, no forward mode
    H = jax.jacrev(jax.grad(deviance))(varpar, struct, xp, nobs, reml)
    C = beta_vcov(varpar, struct, xp)
    J = jax.jacrev(beta_vcov)(varpar, struct, xp)  # (p, p, k)
    return H, C, J


def weighted_problem(model) -> tuple[list, np.ndarray, float]:
    """The unweighted problem that prior weights and offsets reduce to, as lme4 does.

    With ``W = diag(w)`` the rows of ``y - offset``, ``X`` and every ``z`` are
    scaled by ``sqrt(w)``, which leaves an ordinary LMM; the criterion of the
    original data is that of the scaled data minus ``sum(log w)`` (the
    Jacobian of the scaling), for REML and ML alike.

    Returns
    -------
    terms : list of Term
        The (scaled) random-effect terms.
    M : array (N, p + 1)
        The (scaled) ``[X, y - offset]``.
    shift : float
        Add to the scaled problem's criterion: ``-sum(log w)``, or 0.
    """
    y = model.y if model.offset is None else model.y - model.offset
    if model.weights is None:
        return list(model.terms), np.column_stack([model.X, y]), 0.0
    sw = np.sqrt(model.weights)
    terms = [replace(t, z=t.z * sw[:, None]) for t in model.terms]
    M = np.column_stack([model.X, y]) * sw[:, None]
    return terms, M, -float(np.sum(np.log(model.weights)))


def least_squares_shift(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[X, y - X b0]`` with ``b0`` the least-squares coefficients, and ``b0``.

    The profiled criterion, sigma, Cov(beta) and the conditional modes are
    unchanged and beta is ``b0`` plus the shifted fit's; but ``y' V^{-1} y``
    no longer cancels against ``y' V^{-1} X beta``, which in float32 lost
    most digits of a response with a large mean (a criterion 760 below the
    float64 minimum for ``y`` shifted by 1000).
    """
    X = M[:, :-1]
    b0 = np.linalg.lstsq(X, M[:, -1], rcond=None)[0] if X.shape[1] else np.zeros(0)
    return np.column_stack([X, M[:, -1] - X @ b0]), b0


def _columns(model, for_fit: bool) -> tuple[list, np.ndarray, float, np.ndarray]:
    """:func:`weighted_problem` and ``b0``: y shifted by least squares for a float32 fit, else 0."""
    terms, M, shift = weighted_problem(model)
    if for_fit and np.dtype(float_dtype()) == np.float32:
        M, b0 = least_squares_shift(M)
        return terms, M, shift, b0
    return terms, M, shift, np.zeros(M.shape[1] - 1)


def blocked_problem(model, *, for_fit: bool = False):
    """The blocked :class:`~lmmjax.linalg.Structure` of a model and the cross products of [X y].

    Returns
    -------
    struct, xp, shift, b0
        ``shift`` as in :func:`weighted_problem` (0 for a streamed model, whose
        sums were precomputed from its batches). With ``for_fit``, in float32,
        y is shifted by :func:`least_squares_shift` and ``b0`` is to be added
        to the fitted beta (zeros otherwise): such products serve the fit
        only, not methods that fix beta (profiles).
    """
    if getattr(model, "sufficient", None) is not None:
        struct, xp = model.sufficient
        return struct, xp, 0.0, np.zeros(xp.gram.shape[0] - 1)
    terms, M, shift, b0 = _columns(model, for_fit)
    struct = build_structure(terms, dtype=float_dtype())
    M = jnp.asarray(M, dtype=struct.dtype)
    products, _ = compiled(cross_products, struct, M)  # one program, not one per operation
    return struct, products(struct, M), shift, b0


def small_problem(model):
    """The padded dense system of a small model (:mod:`lmmjax.linalg.small`), or None.

    For models with at most ``lmmjax.linalg.small.MAX_Q`` random effects whose rows are in
    memory; their compiled programs are shared by every model of the same
    padded sizes, where the blocked structure would compile its own.

    Returns
    -------
    (system, products, layout, shift, b0) or None
        ``b0`` as in :func:`blocked_problem` with ``for_fit`` (the system
        serves the fit, Satterthwaite's derivatives and condVar, which do not
        depend on it).
    """
    if getattr(model, "sufficient", None) is not None:
        return None
    terms, M, shift, b0 = _columns(model, for_fit=True)
    system = small_system(terms, M, float_dtype(), pad_fixed=True)
    return None if system is None else (*system, shift, b0)


def padded(layout: SmallLayout | None, theta) -> np.ndarray:
    """Theta as a program on ``layout``'s system takes it (unchanged without one)."""
    return np.asarray(theta, dtype=float) if layout is None else layout.pad(theta)


def small_vcov_pieces(varpar, system: SmallSystem, xp, reml: bool):
    """:func:`vcov_pieces` of a small model's padded system, in closed form.

    The same ``H``, ``C`` and ``J`` from :func:`lmmjax.linalg.small_derivatives`:
    with ``rho = r^2`` and ``c = n - p`` (REML) or ``n`` (ML),

        d = log|A| [+ log|X' V^-1 X|, REML] + c log(2 pi sigma^2) + rho / sigma^2,

    so ``H`` needs the first and second derivatives of ``log|A|``,
    ``log|X' V^-1 X|`` and ``log rho`` only. Beyond the closed form's sizes
    (:func:`lmmjax.linalg.small.closed_form_fits`), :func:`vcov_pieces`.
    """
    if not closed_form_fits(varpar.shape[0] - 1, system, xp):
        return vcov_pieces(varpar, system, xp, system.nobs, reml)
    theta, sigma = varpar[:-1], varpar[-1]
    der = small_derivatives(theta, system, xp)
    n = system.n
    c = n - system.p if reml else n
    rho, delta = der.r2, der.grad[2]  # delta: d log rho
    d2_rho = rho * (der.hess[2] + jnp.outer(delta, delta))
    s2 = sigma**2
    h_tt = (der.hess[0] + der.hess[1] if reml else der.hess[0]) + d2_rho / s2
    h_ts = -2.0 * rho * delta / (s2 * sigma)
    h_ss = -2.0 * c / s2 + 6.0 * rho / s2**2
    H = jnp.block([[h_tt, h_ts[:, None]], [h_ts[None, :], h_ss[None, None]]])
    C = s2 * der.fixed_inv
    J = jnp.concatenate([s2 * jnp.moveaxis(der.fixed_inv_jac, 0, -1),
                         (2.0 * sigma * der.fixed_inv)[..., None]], axis=-1)  # fmt: skip
    return H, C, J

"""Empirical Bayes for ``Theta = (lambda, b, A)`` by the Laplace approximation of the evidence.

``beta`` and ``gamma`` are Gaussian given the variances, so they are integrated
out exactly: with ``V = I + Z Lambda Lambda' Z'`` and ``P = X'V^{-1}X + lambda D``
(both from one :func:`lmmjax.linalg.gls_gram` of ``[X y]``),

    log p(y | sigma^2, Sigma, lambda) = -(N - p_u)/2 log(2 pi sigma^2) - 1/2 log|V|
        - 1/2 log|P| + p_pen/2 log(lambda) - (y'V^{-1}y - c'P^{-1}c) / (2 sigma^2),

``c = X'V^{-1}y``, ``p_u`` the columns with a flat prior (their improper
constant does not depend on Theta). Only the variance parameters
``phi = (log sigma^2, chol(Sigma_l) with log diagonals)`` are integrated by
Laplace's method: with ``l(phi)`` the log of the above plus the log priors of
``sigma^2`` and ``Sigma_l`` (normalised inverse-Wishart with
``eta_l = kappa_l - d_l - 1``, ``Phi_l = kappa_l A_l``) plus the log Jacobian
of ``phi``,

    log p(y | Theta) ~ l(phi*) + k/2 log(2 pi) - 1/2 log|-H(phi*)|,

``H`` from :func:`jax.hessian` at the mode ``phi*`` of ``l``, found by
damped Newton steps from the EM estimate. The inverse-Wishart is proper only
for ``eta_l > d_l - 1``, i.e. ``b_l > 2 d_l / (m_l + 2 d_l)``, so ``"auto"``
searches ``b_l`` above that bound.

The outer search maximises the Laplace value over the ``"auto"`` entries of
``(log lambda, b, log A)`` by Nelder-Mead (a derivative-free search: the
criterion's gradient would need third derivatives of ``l``).

Default ``A``: ``"auto"`` is ``a D``, a multiple of a fixed diagonal
``D_j = s^2 / (2 L d mean(z_j^2))`` (``s^2`` the least-squares residual
variance, ``L`` terms, ``d`` effects per level), with the one scale ``a``
chosen by empirical Bayes. Why not ``a I``: it forces one prior variance on
effects of different units (in the cubic growth model the intercept's and the
``t^3`` slope's scales differ by orders of magnitude), which would shrink some
of them towards a meaningless value. Why not a free diagonal: with ``d`` free
scales the criterion is maximised at ``b -> 1`` (``Sigma = A``, a diagonal
covariance fitted by type-II ML, every correlation shrunk to zero), which is
what we observed on the cubic model. ``a D`` is ``a I`` on standardised
random-effect columns. A number ``a`` in the options means ``a I``, a list
the diagonal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.optimize
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import multigammaln

from lmmjax.cache import compiled
from lmmjax.em.em import run_em_at, start_params
from lmmjax.em.objective import EmData, Hyper, Params, kappas
from lmmjax.errors import LmmInputError
from lmmjax.linalg import gls_gram
from lmmjax.options import MapOptions

__all__ = [
    "HyperSpec",
    "b_lower_bound",
    "choose_hyper",
    "laplace_at",
    "laplace_value",
    "log_marginal",
    "resolve_hyper",
]


@dataclass(frozen=True)
class HyperSpec:
    """The hyperparameters per term, ``None`` where chosen by empirical Bayes.

    Attributes
    ----------
    lam : float or None
    b : list of (float or None)
        One per term.
    A : list of (numpy.ndarray or None)
        Diagonal of each term's ``A``.
    A_start : list of numpy.ndarray
        Starting (or fixed) diagonals.
    groups : list of str
        Each term's grouping factor.
    """

    lam: float | None
    b: list
    A: list
    A_start: list
    groups: list


def _per_term(value, terms, name: str) -> list:
    """Spread a single value or a mapping by grouping factor over the terms."""
    if not isinstance(value, dict):
        return [value] * len(terms)
    groups = list(dict.fromkeys(t.group for t in terms))
    unknown = [k for k in value if k not in groups]
    if unknown:
        raise LmmInputError(
            f"option '{name}': unknown grouping factor {unknown[0]!r}; "
            f"the model's factors are {', '.join(groups)}"
        )
    return [value.get(t.group, "auto") for t in terms]


def resolve_hyper(model, opts: MapOptions) -> HyperSpec:
    """Check the options against the model and spread them over its terms.

    Raises
    ------
    LmmInputError
        For an unknown grouping factor in ``b`` or ``A`` or an ``A`` whose length
        is not the factor's number of random effects.
    """
    bs = [None if v == "auto" else float(v) for v in _per_term(opts.b, model.terms, "b")]
    X, y = model.X, model.y
    res = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    scale = max(float(np.var(res)), 1e-12 * max(float(np.var(y)), 1.0))
    As, starts = [], []
    for t, a in zip(model.terms, _per_term(opts.A, model.terms, "A"), strict=True):
        moment = 0.5 * scale / (len(model.terms) * t.d * np.maximum(np.mean(t.z**2, axis=0), 1e-12))
        if a == "auto":
            As.append(None)
            starts.append(moment)
        elif isinstance(a, list):
            if len(a) != t.d:
                raise LmmInputError(
                    f"option 'A': factor {t.group!r} has {t.d} random effects "
                    f"({', '.join(t.names)}) but A has {len(a)} values"
                )
            As.append(np.asarray(a, dtype=float))
            starts.append(As[-1])
        else:
            As.append(np.full(t.d, float(a)))
            starts.append(As[-1])
    lam = None if opts.lam == "auto" else float(opts.lam)
    return HyperSpec(lam, bs, As, starts, [t.group for t in model.terms])


def b_lower_bound(d: int, m: int) -> float:
    """Smallest ``b`` with a proper inverse-Wishart: ``eta > d - 1`` iff ``b > 2d / (m + 2d)``."""
    return 2.0 * d / (m + 2.0 * d)


# ------------------------------------------------------------ the criterion
def _unpack(phi: jax.Array, dims: tuple[int, ...]):
    """``phi -> (sigma^2, [L_l])`` with ``L_l`` lower triangular, positive diagonal."""
    s2 = jnp.exp(phi[0])
    k, chols, logdiags = 1, [], []
    for d in dims:
        n = d * (d + 1) // 2
        rows, cols = np.tril_indices(d)
        L = jnp.zeros((d, d), phi.dtype).at[rows, cols].set(phi[k : k + n])
        logdiag = jnp.diagonal(L)
        L = L - jnp.diag(logdiag) + jnp.diag(jnp.exp(logdiag))
        chols.append(L)
        logdiags.append(logdiag)
        k += n
    return s2, chols, logdiags


def pack(params: Params) -> np.ndarray:
    """``(sigma^2, Sigma_l) -> phi``, the inverse of :func:`_unpack`."""
    out = [np.log(float(params.sigma2))]
    for S in params.covs:
        L = np.linalg.cholesky(np.asarray(S, dtype=float))
        L[np.diag_indices_from(L)] = np.log(np.diag(L))
        out.extend(L[np.tril_indices(L.shape[0])])
    return np.asarray(out)


def _iw_logpdf(L: jax.Array, kappa, A: jax.Array) -> jax.Array:
    """IW log density at ``Sigma = L L'``, ``eta = kappa - d - 1``, ``Phi = kappa A``."""
    d = L.shape[0]
    nu = kappa - d - 1.0
    logdet_phi = d * jnp.log(kappa) + jnp.sum(jnp.log(A))
    logdet_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
    tr = kappa * jnp.sum(solve_triangular(L, jnp.diag(jnp.sqrt(A)), lower=True) ** 2)
    return (
        0.5 * nu * logdet_phi - 0.5 * nu * d * jnp.log(2.0) - multigammaln(0.5 * nu, d)
        - 0.5 * (nu + d + 1.0) * logdet_s - 0.5 * tr
    )  # fmt: skip


def log_marginal(phi: jax.Array, data: EmData, hyper: Hyper) -> jax.Array:
    """``l(phi)``: log p(y, phi | Theta) with beta and gamma integrated out, plus the log Jacobian.

    A term with ``b_l = 0`` has a flat prior on ``Sigma_l``; the prior of a term
    with ``b_l`` at or below :func:`b_lower_bound` is improper, which the
    Laplace value reports as NaN.
    """
    dims = tuple(a.shape[0] for a in hyper.A)
    s2, chols, logdiags = _unpack(phi, dims)
    sigma = jnp.sqrt(s2)
    logdet_v, G = gls_gram(data.struct, tuple(L / sigma for L in chols), data.xp)
    n, p = data.X.shape
    on = hyper.lam > 0
    lam = jnp.where(on, hyper.lam, 1.0)
    pen = jnp.where(on, data.pen, 0.0)
    Lp = jnp.linalg.cholesky(G[:p, :p] + jnp.diag(lam * pen))
    w = solve_triangular(Lp, G[:p, p], lower=True)
    quad = G[p, p] - w @ w
    p_pen = jnp.sum(pen)
    loglik = (
        -0.5 * (n - (p - p_pen)) * jnp.log(2 * jnp.pi * s2) - 0.5 * logdet_v
        - jnp.sum(jnp.log(jnp.diagonal(Lp))) + 0.5 * p_pen * jnp.log(lam) - 0.5 * quad / s2
    )  # fmt: skip
    prior = -hyper.s0 / s2
    jac = phi[0]
    for L, logdiag, A, b, kappa in zip(
        chols, logdiags, hyper.A, hyper.b, kappas(hyper, data.nlevels), strict=True
    ):
        d = L.shape[0]
        iw = _iw_logpdf(L, jnp.where(b > 0, kappa, 2.0 * d + 1.0), A)
        prior = prior + jnp.where(b > 0, iw, 0.0)
        jac = jac + d * jnp.log(2.0) + jnp.sum((d + 1.0 - jnp.arange(d)) * logdiag)
    return loglik + prior + jac


def _value_grad_hess(phi, data, hyper):
    value, grad = jax.value_and_grad(log_marginal)(phi, data, hyper)
    return value, grad, jax.hessian(log_marginal)(phi, data, hyper)


def _mode(phi0: np.ndarray, data: EmData, hyper: Hyper, maxiter: int = 100):
    """Damped Newton ascent to the mode of :func:`log_marginal`; returns ``(phi*, l*, H*)``."""
    phi = jnp.asarray(phi0, data.X.dtype)
    vgh, _ = compiled(_value_grad_hess, phi, data, hyper)
    val, _ = compiled(log_marginal, phi, data, hyper)
    f, g, H = (np.asarray(a, dtype=float) for a in vgh(phi, data, hyper))
    for _ in range(maxiter):
        if not np.all(np.isfinite(g)):
            return phi, np.nan, H
        neg = -0.5 * (H + H.T)
        mu = 0.0
        while True:
            try:
                chol = np.linalg.cholesky(neg + mu * np.eye(len(g)))
                break
            except np.linalg.LinAlgError:
                mu = max(2 * mu, 1e-6 * max(1.0, float(np.max(np.abs(np.diag(neg))))))
        step = scipy.linalg.cho_solve((chol, True), g)
        t = 1.0
        while t > 1e-10:
            cand = phi + t * jnp.asarray(step, phi.dtype)
            fc = float(val(cand, data, hyper))
            if np.isfinite(fc) and fc >= f - 1e-12 * abs(f):
                break
            t *= 0.5
        else:
            break
        phi = cand
        f_new, g, H = (np.asarray(a, dtype=float) for a in vgh(phi, data, hyper))
        done = abs(float(f_new) - float(f)) <= 1e-12 * max(1.0, abs(float(f))) and mu == 0.0
        f = f_new
        if done or np.max(np.abs(g)) < 1e-8:
            break
    return phi, float(f), H


def laplace_value(phi_star, f_star: float, H: np.ndarray) -> float:
    """``l(phi*) + k/2 log(2 pi) - 1/2 log|-H|`` (NaN when ``-H`` is not positive definite)."""
    sign, logdet = np.linalg.slogdet(-0.5 * (H + H.T))
    if sign <= 0 or not np.isfinite(f_star):
        return float("nan")
    return float(f_star + 0.5 * len(phi_star) * np.log(2 * np.pi) - 0.5 * logdet)


def _proper(hyper: Hyper, data: EmData) -> bool:
    """Whether every term's inverse-Wishart prior is proper or flat (``b = 0``)."""
    return all(
        float(b) == 0.0 or float(b) > b_lower_bound(a.shape[0], float(m))
        for b, a, m in zip(hyper.b, hyper.A, data.nlevels, strict=True)
    )


def laplace_at(data: EmData, hyper: Hyper, params: Params) -> float | None:
    """The Laplace log marginal likelihood at ``hyper``, Newton started from ``params``.

    None when some inverse-Wishart prior is improper (``0 < b_l <= 2d/(m+2d)``).
    """
    if not _proper(hyper, data):
        return None
    phi, f, H = _mode(pack(params), data, hyper)
    value = laplace_value(phi, f, H)
    return value if np.isfinite(value) else None


# ------------------------------------------------------------ the search
def _to_hyper(spec: HyperSpec, free: np.ndarray, data: EmData, s0: float) -> Hyper:
    """Map the free vector (log lambda, logit b, log A entries for the 'auto' ones) to Hyper."""
    k = 0
    dtype = data.X.dtype
    if spec.lam is None:
        lam, k = float(np.exp(free[0])), 1
    else:
        lam = spec.lam
    bs, As = [], []
    for b, m, a in zip(spec.b, data.nlevels, spec.A_start, strict=True):
        if b is None:
            lo = b_lower_bound(len(a), float(m))
            b, k = lo + (1 - lo) / (1 + np.exp(-free[k])), k + 1
        bs.append(jnp.asarray(b, dtype))
    for a, a0 in zip(spec.A, spec.A_start, strict=True):
        if a is None:
            a, k = np.exp(free[k]) * a0, k + 1
        As.append(jnp.asarray(a, dtype))
    return Hyper(jnp.asarray(lam, dtype), tuple(bs), tuple(As), jnp.asarray(s0, dtype))


def _start_free(spec: HyperSpec) -> np.ndarray:
    free = [0.0] if spec.lam is None else []
    free += [0.0 for b in spec.b if b is None]
    free += [0.0 for a in spec.A if a is None]
    return np.asarray(free, dtype=float)


def choose_hyper(data: EmData, spec: HyperSpec, s0: float, opts: MapOptions):
    """Hyperparameters: the fixed ones as given, the ``"auto"`` ones maximising the Laplace value.

    Returns
    -------
    hyper : Hyper
    laplace : float or None
        The Laplace log marginal at the chosen hyperparameters (None when
        nothing was searched; :func:`lmmjax.em.fit.fit_map` computes it then).
    search : dict
        ``evaluations`` of the criterion and ``seconds`` spent, empty when none.
    """
    free0 = _start_free(spec)
    if free0.size == 0:
        return _to_hyper(spec, free0, data, s0), None, {}
    start = time.perf_counter()
    hyper0 = _to_hyper(spec, free0, data, s0)
    params = start_params(data, [np.diag(a) for a in spec.A_start])
    trace = run_em_at(data, hyper0, params, maxiter=min(opts.maxiter, 500), tol=1e-8)
    state = {"phi": pack(trace.params), "n": 0}

    def objective(free):
        state["n"] += 1
        if np.any(np.abs(free) > 15):
            return 1e300
        hyper = _to_hyper(spec, free, data, s0)
        phi, f, H = _mode(state["phi"], data, hyper)
        value = laplace_value(phi, f, H)
        if not np.isfinite(value):
            return 1e300
        state["phi"] = np.asarray(phi)
        return -value

    simplex = free0 + np.vstack([np.zeros(free0.size), np.eye(free0.size)])
    res = scipy.optimize.minimize(
        objective, free0, method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-4,
                 "maxfev": 200 * free0.size},
    )  # fmt: skip
    hyper = _to_hyper(spec, res.x, data, s0)
    search = {
        "evaluations": state["n"],
        "seconds": time.perf_counter() - start,
        "converged": bool(res.success),
    }
    return hyper, float(-res.fun), search

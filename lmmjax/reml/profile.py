"""Profile-likelihood confidence intervals, as lme4's ``confint(m, method = "profile")``.

lme4 profiles the ML deviance (a REML fit is refitted by ML first) in the
parameters it reports: the random-effect standard deviations and
correlations, sigma, and the fixed effects. For one parameter held at ``x``
the deviance is minimised over all the others, giving ``D(x)``; the signed
root ``zeta(x) = sign(x - x_hat) sqrt(D(x) - D_hat)`` crosses ``+-c``, with
``c^2`` the chi-square(1) quantile of the level, at the interval's ends.

lme4 evaluates ``zeta`` on a grid and interpolates with splines; here each end
is a root of ``zeta(x) -+ c``, bracketed from a Wald step and then found by
Brent's method. Every evaluation of ``zeta`` is a small L-BFGS-B run on one
compiled value-and-gradient, started from the previous point's optimum:

* variance parameters: the deviance with beta profiled out,
  ``log|A| + n log(2 pi sigma^2) + r^2 / sigma^2``
  (:func:`lmmjax.reml.objective.deviance`), in ``s = (sd, cor, sigma)``; the
  free ones are optimised as ``log sd``, ``atanh cor``, ``log sigma``, and
  ``Lambda_l = diag(sd) chol(R) / sigma`` for a term with correlations ``R``;
* a fixed effect ``beta_j = b``: sigma and the other fixed effects profiled
  out in closed form, ``log|A| + n (1 + log(2 pi rss / n))`` with ``rss`` from
  the Cholesky factor of ``[X y]' V^-1 [X y]`` with column ``j`` moved next to
  ``y``; minimised over theta.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.special

from lmmjax.cache import compiled
from lmmjax.linalg import device_array, gls_gram, make_lambdas
from lmmjax.reml.objective import deviance
from lmmjax.terms import unique_group_names

__all__ = ["profile_confint", "sdcor_layout"]


class TermLayout(NamedTuple):
    """Where one term's SDs, correlations and theta entries sit (hashable, static)."""

    d: int
    sd: tuple[int, ...]  # positions of the d SDs in s
    cor: tuple[tuple[int, int, int], ...]  # (a, b, position) for a < b
    rows: tuple[int, ...]  # theta's entries of Lambda
    cols: tuple[int, ...]


def sdcor_layout(terms) -> tuple[tuple[TermLayout, ...], list[str], np.ndarray]:
    """The ``s = (sd, cor, ..., sigma)`` vector of a model's terms.

    Returns
    -------
    layout : tuple of TermLayout
    names : list of str
        ``sd_<effect>|<group>``, ``cor_<effect>.<effect>|<group>`` and ``sigma``, as
        :func:`lmmjax.reml.bootstrap.parameter_vector` names them.
    is_cor : numpy.ndarray of bool
    """
    layout, names, is_cor, k = [], [], [], 0
    for group, t in zip(unique_group_names(terms), terms, strict=True):
        sd = tuple(range(k, k + t.d))
        names += [f"sd_{n}|{group}" for n in t.names]
        is_cor += [False] * t.d
        k += t.d
        cor = []
        for a in range(t.d):
            for b in range(a + 1, t.d):
                cor.append((a, b, k))
                names.append(f"cor_{t.names[a]}.{t.names[b]}|{group}")
                is_cor.append(True)
                k += 1
        rows, cols = t.theta_index()
        layout.append(TermLayout(t.d, sd, tuple(cor), tuple(map(int, rows)),
                                 tuple(map(int, cols))))  # fmt: skip
    return tuple(layout), [*names, "sigma"], np.array([*is_cor, False])


def sdcor_to_varpar(s, layout) -> jax.Array:
    """``(theta, sigma)`` from ``s = (sd, cor, ..., sigma)``."""
    sigma = s[-1]
    thetas = []
    for t in layout:
        R = jnp.eye(t.d, dtype=s.dtype)
        for a, b, pos in t.cor:
            R = R.at[a, b].set(s[pos]).at[b, a].set(s[pos])
        lam = s[jnp.asarray(t.sd)][:, None] * jnp.linalg.cholesky(R) / sigma
        thetas.append(lam[jnp.asarray(t.rows), jnp.asarray(t.cols)])
    return jnp.concatenate([*thetas, sigma[None]])


def _natural(u, x, mask, is_cor):
    s = jnp.where(is_cor, jnp.tanh(u), jnp.exp(u))
    return jnp.where(mask, x, s)


def _varpar_objective(u, x, mask, is_cor, struct, xp, nobs, *, layout):
    """ML deviance (beta profiled) with ``s[mask] = x`` and the rest free in ``u``."""
    varpar = sdcor_to_varpar(_natural(u, x, mask, is_cor), layout)
    return deviance(varpar, struct, xp, nobs, reml=False)


def _varpar_value_grad(u, x, mask, is_cor, struct, xp, nobs, *, layout):
    return jax.value_and_grad(_varpar_objective)(
        u, x, mask, is_cor, struct, xp, nobs, layout=layout
    )


def _varpar_hessian(s, struct, xp, nobs, *, layout):
    f = lambda s: deviance(sdcor_to_varpar(s, layout), struct, xp, nobs, reml=False)  # noqa: E731
    return jax.hessian(f)(s)


def _fixed_objective(theta, b, perm, struct, xp):
    """ML deviance with ``beta_j = b`` (``perm`` moves column j next to y), the rest profiled."""
    logdet_A, gram = gls_gram(struct, make_lambdas(theta, struct), xp)
    L = jnp.linalg.cholesky(gram[perm][:, perm])
    w = jnp.stack([-b, jnp.ones_like(b)])
    rss = jnp.sum((L[-2:, -2:].T @ w) ** 2)
    n = struct.nobs
    return logdet_A + n * (1.0 + jnp.log(2.0 * jnp.pi * rss / n))


def _fixed_value_grad(theta, b, perm, struct, xp):
    return jax.value_and_grad(_fixed_objective)(theta, b, perm, struct, xp)


class _Profile:
    """``zeta`` of one parameter: an inner optimisation per value, warm-started."""

    def __init__(self, value_grad, start, x_hat, base, bounds=None):
        self.value_grad, self.start, self.x_hat, self.base = value_grad, start, x_hat, base
        self.bounds = bounds
        self.solutions: list[tuple[float, np.ndarray]] = [(x_hat, start)]

    def __call__(self, x: float) -> float:
        near = min(self.solutions, key=lambda p: abs(p[0] - x))[1]

        def fun(v):
            val, grad = self.value_grad(v, x)
            return float(val), np.asarray(grad, dtype=float)

        res = scipy.optimize.minimize(
            fun, near, jac=True, method="L-BFGS-B", bounds=self.bounds,
            options={"ftol": 1e-13, "gtol": 1e-7, "maxiter": 1000},
        )  # fmt: skip
        self.solutions.append((x, np.asarray(res.x)))
        return float(np.sign(x - self.x_hat) * np.sqrt(max(res.fun - self.base, 0.0)))


def _endpoint(zeta: _Profile, step: float, side: int, c: float, bound: float | None) -> float:
    """Where ``zeta`` reaches ``side * c``, or ``bound`` when it does not before it."""
    x_hat = zeta.x_hat
    inner, x = x_hat, x_hat + side * step
    for _ in range(40):
        if bound is not None and side * (x - bound) >= 0:
            x = bound
        z = zeta(x)
        if side * z >= c:
            scale = abs(x - x_hat)
            return scipy.optimize.root_scalar(lambda t: zeta(t) - side * c, method="toms748",
                                              bracket=sorted((inner, x)), xtol=1e-7 * scale,
                                              rtol=1e-10).root  # fmt: skip
        if x == bound:
            return bound
        inner = x
        grow = c / abs(z) if abs(z) > 1e-3 else 4.0
        x = x_hat + (x - x_hat) * min(max(1.2 * grow, 1.2), 4.0)
    return np.nan


def profile_confint(fit, level: float = 0.95) -> pd.DataFrame:
    """Profile-likelihood intervals of every parameter (lme4's ``confint.merMod``).

    Parameters
    ----------
    fit : lmmjax.reml.LmmFit
        A REML fit is refitted by maximum likelihood first, as lme4 does.
    level : float

    Returns
    -------
    pandas.DataFrame
        Rows named as :func:`lmmjax.reml.bootstrap.parameter_vector`: fixed
        effects, random-effect SDs and correlations, sigma. A lower end that
        the profile does not reach before its bound is the bound (0 for an SD,
        -1 or 1 for a correlation).
    """
    ml = fit._fitter(fit.model, reml=False, ddf="none") if fit.reml else fit
    struct, xp = ml._blocked()
    dtype = struct.dtype
    c = float(np.sqrt(scipy.special.chdtri(1, 1.0 - level)))
    layout, names, is_cor = sdcor_layout(ml.model.terms)
    nobs = device_array(float(ml.nobs), dtype)
    s_hat = _sdcor(ml, layout)
    quick = struct.q <= 2000

    # variance parameters, in s = (sd, cor, sigma)
    k = s_hat.size
    u_hat = np.where(is_cor, np.arctanh(np.clip(s_hat, -1 + 1e-12, 1 - 1e-12)),
                     np.log(np.maximum(s_hat, 1e-300)))  # fmt: skip
    args = (device_array(u_hat, dtype), device_array(0.0, dtype),
            device_array(np.zeros(k, bool), bool), device_array(is_cor, bool),
            struct, xp, nobs)  # fmt: skip
    run_v, _ = compiled(_varpar_value_grad, *args, quick=quick, layout=layout)
    base = float(run_v(*args)[0])
    run_h, _ = compiled(_varpar_hessian, device_array(s_hat, dtype), struct, xp, nobs,
                        quick=quick, layout=layout)  # fmt: skip
    H = np.asarray(run_h(device_array(s_hat, dtype), struct, xp, nobs), dtype=float)
    se = _wald_se(H, s_hat)
    lo, hi = {}, {}
    for j in range(k):
        mask = device_array(np.arange(k) == j, bool)

        def value_grad(u, x, mask=mask):
            return run_v(device_array(u, dtype), device_array(x, dtype), mask, *args[3:])

        zeta = _Profile(value_grad, u_hat, s_hat[j], base)
        low_bound, high_bound = (-1.0, 1.0) if is_cor[j] else (0.0, None)
        lo[names[j]] = _endpoint(zeta, se[j], -1, c, low_bound)
        hi[names[j]] = _endpoint(zeta, se[j], 1, c, high_bound)

    # fixed effects, each held in turn with sigma and the others profiled
    p = ml.model.p
    theta_hat = np.asarray(ml.theta, dtype=float)
    bounded = np.concatenate([np.equal(*t.theta_index()) for t in ml.model.terms])
    bounds = [(0.0, None) if b else (None, None) for b in bounded]
    fixed_se = np.sqrt(np.diagonal(ml.vcov_matrix))
    perm0 = device_array(np.arange(p + 1), np.int64)
    run_f, _ = compiled(_fixed_value_grad, device_array(theta_hat, dtype), device_array(0.0, dtype),
                        perm0, struct, xp, quick=quick)  # fmt: skip
    for j, name in enumerate(ml.model.fixef_names):
        perm = device_array([*[i for i in range(p) if i != j], j, p], np.int64)

        def value_grad(theta, b, perm=perm):
            return run_f(device_array(theta, dtype), device_array(b, dtype), perm, struct, xp)

        zeta = _Profile(value_grad, theta_hat, float(ml.beta[j]), base, bounds)
        lo[name] = _endpoint(zeta, fixed_se[j], -1, c, None)
        hi[name] = _endpoint(zeta, fixed_se[j], 1, c, None)

    order = [*ml.model.fixef_names, *names]
    lo_name, hi_name = f"{100 * (1 - level) / 2:.1f} %", f"{100 * (1 + level) / 2:.1f} %"
    return pd.DataFrame({lo_name: [lo[n] for n in order], hi_name: [hi[n] for n in order]},
                        index=order)  # fmt: skip


def _sdcor(fit, layout) -> np.ndarray:
    """``s = (sd, cor, ..., sigma)`` at a fit."""
    s = []
    for t, cov in zip(layout, fit.covariances(), strict=True):
        sd = np.sqrt(np.clip(np.diagonal(cov), 0.0, None))
        s += list(sd)
        for a, b, _ in t.cor:
            s.append(cov[b, a] / (sd[a] * sd[b]) if sd[a] * sd[b] > 0 else 0.0)
    return np.array([*s, fit.sigma])


def _wald_se(H: np.ndarray, s_hat: np.ndarray) -> np.ndarray:
    """Wald standard errors ``sqrt(diag(2 H^-1))``, a first step for the profile."""
    try:
        var = np.diagonal(2.0 * np.linalg.inv(H))
    except np.linalg.LinAlgError:
        var = np.full(s_hat.shape, np.nan)
    fallback = 0.25 * np.abs(s_hat) + 1e-3
    return np.where(np.isfinite(var) & (var > 0), np.sqrt(np.abs(var)), fallback)

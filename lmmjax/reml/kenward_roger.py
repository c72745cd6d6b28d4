"""Kenward-Roger's adjusted covariance and degrees of freedom, as pbkrtest computes them.

pbkrtest writes the response covariance linearly in the variance parameters,
``Sigma = sum_i phi_i G_i`` (``phi``: each term's variances and covariances,
then sigma^2), and needs, with ``Phi = (X' Sigma^-1 X)^-1``,

    P_i = -X' Sigma^-1 G_i Sigma^-1 X,
    Q_ij = X' Sigma^-1 G_i Sigma^-1 G_j Sigma^-1 X,
    K_ij = tr(Sigma^-1 G_i Sigma^-1 G_j),

which it forms from N x N matrices. Since the ``G_i`` do not depend on
``phi``, these are derivatives of two functions that
:func:`lmmjax.linalg.gls_gram` evaluates on the blocked factorisation:

    P_i = d(X' Sigma^-1 X) / d phi_i,
    Q_ij + Q_ji = d^2(X' Sigma^-1 X) / d phi_i d phi_j,
    K_ij = -d^2 log|Sigma| / d phi_i d phi_j,

so JAX's reverse-over-reverse derivatives give them with no N x N matrix.
Every sum below is symmetric in ``(i, j)``, so ``Q`` enters only through its
symmetric part. Then (pbkrtest's ``vcovAdj``)

    IE2_ij = K_ij - 2 tr(Phi Q_ij) + tr(Phi P_i Phi P_j),   W = 2 IE2^-1,
    U = sum_ij W_ij (Q_ij - P_i Phi P_j),   Phi_A = Phi + 2 Phi U Phi,

and for a contrast matrix ``L`` of rank ``q`` (pbkrtest's ``Lb_ddf`` and
``KRmodcomp``) ``Theta = L' (L Phi L')^-1 L``, ``u_i = Theta Phi P_i Phi``,
``A1 = sum_ij W_ij tr(u_i) tr(u_j)``, ``A2 = sum_ij W_ij tr(u_i u_j)``, and the
degrees of freedom and F scaling follow Kenward and Roger (1997).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmmjax.cache import compiled
from lmmjax.errors import LmmInputError
from lmmjax.linalg import device_array, gls_gram, make_lambdas
from lmmjax.reml.optimize import QUICK_MAX_Q, on_bound

__all__ = ["KenwardRoger", "kr_ddf", "kr_f_test", "kr_parts"]


class KenwardRoger(NamedTuple):
    """Kenward-Roger's pieces at a REML fit.

    Attributes
    ----------
    vcov : array (p, p)
        ``Phi``, the unadjusted covariance of beta.
    vcov_adj : array (p, p)
        ``Phi_A``, the adjusted one (pbkrtest's ``vcovAdj``).
    P : array (k, p, p)
        ``d(X' Sigma^-1 X) / d phi_i``.
    W : array (k, k)
        Twice the inverse of the REML information of ``phi``.
    """

    vcov: np.ndarray
    vcov_adj: np.ndarray
    P: np.ndarray
    W: np.ndarray


def _varpar(phi, struct, *, layout):
    """``(lambdas, sigma^2)`` from the linear parameters ``phi``."""
    s2 = phi[-1]
    thetas, k = [], 0
    for d, rows, cols in layout:
        n = len(rows)
        cov = (
            jnp.zeros((d, d), phi.dtype)
            .at[jnp.asarray(rows), jnp.asarray(cols)]
            .set(phi[k : k + n])
        )
        cov = cov + jnp.tril(cov, -1).T
        lam = jnp.linalg.cholesky(cov) / jnp.sqrt(s2)
        thetas.append(lam[jnp.asarray(rows), jnp.asarray(cols)])
        k += n
    return make_lambdas(jnp.concatenate(thetas), struct), s2


def _pieces(phi, struct, xp, *, layout):
    def logdet_sigma(phi):
        lambdas, s2 = _varpar(phi, struct, layout=layout)
        return gls_gram(struct, lambdas, xp)[0] + struct.nobs * jnp.log(s2)

    def information(phi):  # X' Sigma^-1 X
        lambdas, s2 = _varpar(phi, struct, layout=layout)
        gram = gls_gram(struct, lambdas, xp)[1]
        p = gram.shape[0] - 1
        return gram[:p, :p] / s2

    info = information(phi)
    p = info.shape[0]
    K = -jax.jacrev(jax.grad(logdet_sigma))(phi)
    P = jax.jacrev(information)(phi)  # (p, p, k)
    # Q_ij + Q_ji: the Hessian of each entry on its own (jacrev of the matrix's
    # jacrev would push every entry's cotangent through every other entry's pass)
    rows, cols = np.triu_indices(p)
    hess = jax.vmap(lambda a, b: jax.jacrev(jax.grad(lambda f: information(f)[a, b]))(phi))
    upper = hess(jnp.asarray(rows), jnp.asarray(cols))  # (p (p + 1) / 2, k, k)
    Q2 = jnp.zeros((p, p, *upper.shape[1:]), phi.dtype).at[rows, cols].set(upper)
    Q2 = Q2.at[cols, rows].set(upper)
    return info, K, P, Q2


def kr_parts(fit) -> KenwardRoger:
    """Kenward-Roger's adjusted covariance of a REML fit and the pieces its df need.

    Raises
    ------
    LmmInputError
        For an ML fit (Kenward-Roger's method is defined for REML, as in lmerTest),
        and where the derivatives are not finite even away from a singular fit.
    """
    if not fit.reml:
        raise LmmInputError("ddf 'Kenward-Roger' needs a REML fit (method: reml), as lmerTest")
    struct, xp = fit._blocked()
    dtype = struct.dtype
    layout = tuple((t.d, *map(lambda a: tuple(map(int, a)), t.theta_index()))
                   for t in fit.model.terms)  # fmt: skip
    phi = [cov[t.theta_index()] for t, cov in zip(fit.model.terms, fit.covariances(), strict=True)]
    phi = device_array(np.concatenate([*phi, [fit.sigma**2]]), dtype)
    run, _ = compiled(_pieces, phi, struct, xp, quick=struct.q <= QUICK_MAX_Q, layout=layout)

    def pieces(at):
        return [np.asarray(a, dtype=float) for a in run(at, struct, xp)]

    def finite(parts):
        return all(np.isfinite(a).all() for a in parts)

    info, K, P, Q2 = pieces(phi)
    if not finite((info, K, P, Q2)):
        info, K, P, Q2 = _extrapolated(pieces, phi, on_bound(fit.model.terms), dtype)
    if not finite((info, K, P, Q2)):
        raise LmmInputError(
            "ddf 'Kenward-Roger': its derivatives are not finite at this fit; use ddf "
            "'Satterthwaite'"
        )
    Phi = np.linalg.inv(info)  # p x p, reported
    P = np.moveaxis(P, -1, 0)  # (k, p, p)
    Q = np.moveaxis(Q2, (-2, -1), (0, 1)) / 2.0  # (k, k, p, p), symmetric part
    PPhi = P @ Phi  # (k, p, p)
    IE2 = (K - 2.0 * np.einsum("ab,ijba->ij", Phi, Q)
           + np.einsum("iab,jba->ij", PPhi, PPhi))  # fmt: skip
    if np.min(np.abs(np.linalg.eigvalsh(IE2))) > 1e-10:
        W = 2.0 * np.linalg.inv(IE2)
    else:  # MASS::ginv, as pbkrtest: singular values below sqrt(eps) of the largest are 0
        W = 2.0 * np.linalg.pinv(IE2, rcond=np.sqrt(np.finfo(float).eps))
    U = np.einsum("ij,ijab->ab", W, Q) - np.einsum("ij,iac,jcb->ab", W, PPhi, P)
    Phi_A = Phi + 2.0 * Phi @ U @ Phi
    return KenwardRoger(Phi, (Phi_A + Phi_A.T) / 2.0, P, W)


SINGULAR_STEP = 1e-6  # the step h of _extrapolated, relative to sigma^2


def _extrapolated(pieces, phi, variances, dtype) -> list[np.ndarray]:
    """The pieces at a singular fit, extrapolated from covariances moved inside by h and 2h.

    The pieces are smooth functions of ``phi`` (``Sigma`` is linear in it and
    positive definite while ``sigma^2 > 0``), but their derivatives go through
    the Cholesky factors of the covariances, whose own derivative is infinite
    where a covariance is singular (a zero variance, a correlation of +-1).
    With ``h`` each variance's increment (:data:`SINGULAR_STEP` times
    ``sigma^2``), ``2 f(phi + h) - f(phi + 2 h)`` is ``f(phi)`` up to ``O(h^2)``
    (Richardson); pbkrtest, which forms ``Sigma`` itself, needs no step.
    ``variances`` marks them among the terms' entries of ``phi`` (sigma^2 last).
    """
    phi = np.asarray(phi, dtype=float)
    step = np.append(variances, False) * (SINGULAR_STEP * phi[-1])
    near = pieces(device_array(phi + step, dtype))
    far = pieces(device_array(phi + 2.0 * step, dtype))
    return [2.0 * a - b for a, b in zip(near, far, strict=True)]


def _adjust(L: np.ndarray, kr: KenwardRoger) -> tuple[float, float, float]:
    """``(q, ddf, F scaling)`` of the test of ``L beta = 0`` (pbkrtest's ``.KR_adjust``)."""
    Phi = kr.vcov
    q = np.linalg.matrix_rank(L)
    Theta = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
    u = Theta @ Phi @ kr.P @ Phi  # (k, p, p)
    tr = np.trace(u, axis1=1, axis2=2)
    A1 = float(tr @ kr.W @ tr)
    A2 = float(np.einsum("ij,iab,jba->", kr.W, u, u))
    B = (A1 + 6.0 * A2) / (2.0 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    den = 3 * q + 2 * (1 - g)
    c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
    V0 = 1.0 + c1 * B
    V0 = 0.0 if abs(V0) < 1e-10 else V0
    V1, V2 = 1.0 - c2 * B, 1.0 - c3 * B
    x = 1.0 - A2 / q
    ratio = 1.0 if abs(x) < 1e-14 and abs(V1) < 1e-14 else x / V1
    rho = ratio**2 * V0 / V2 / q
    ddf = 4.0 + (q + 2) / (q * rho - 1.0)
    scale = 1.0 if abs(ddf - 2.0) < 0.01 else ddf * x / (ddf - 2.0)
    return q, ddf, scale


def kr_ddf(L: np.ndarray, kr: KenwardRoger) -> np.ndarray:
    """Kenward-Roger's degrees of freedom of each row of ``L`` taken alone (t tests)."""
    return np.array([_adjust(row[None, :], kr)[1] for row in np.atleast_2d(L)])


def kr_f_test(L: np.ndarray, beta: np.ndarray, kr: KenwardRoger) -> tuple[float, int, float, float]:
    """Kenward-Roger's test of ``L beta = 0`` (pbkrtest's ``KRmodcomp``).

    Returns
    -------
    F, q, ddf, scale
        The Wald F with the adjusted covariance (unscaled), its numerator and
        denominator degrees of freedom, and the F scaling; the test statistic
        is ``scale * F``.
    """
    q, ddf, scale = _adjust(L, kr)
    Lb = L @ beta
    return float(Lb @ np.linalg.solve(L @ kr.vcov_adj @ L.T, Lb)) / q, q, ddf, scale

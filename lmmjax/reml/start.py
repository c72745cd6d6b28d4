"""Starting values for the profiled optimisation of large models: moment estimates.

lme4 starts every fit at ``Lambda = I`` (each random-effect SD equal to the
residual SD). On InstEval, whose SDs are 0.28, 0.44 and 0.09 of the
residual's, L-BFGS then spent about half of its 17 evaluations finding the
basin: its first step, of unit length in the scaled coordinates, took the
department-service SD to -8.5.

Here every lhs column ``c`` of every term gets a moment estimate of its
variance from the least-squares residual ``r`` and the per-level sums
``S_jc = sum_i z_ic r_i`` and ``n_jc = sum_i z_ic^2`` over the rows of level
``j``: if ``r_i = z_ic b_jc + e_i``, then ``E[S_jc^2 / n_jc] = sigma_e^2 +
n_jc sigma_c^2``, so that ``sigma_c^2 = (sum_j S_jc^2 / n_jc - M sigma_e^2) /
sum_j n_jc``; the residual variance is then the least-squares one less what
the terms take, and the two are iterated to a fixed point. Each class is
estimated as if it were alone: crossed classes overlap a little (InstEval:
0.289, 0.456, 0.122 against the fit's 0.276, 0.435, 0.093), but a nested
class takes its parent's variance as well, and where the columns together
claim more than :data:`OVERCOMMITTED` of the residual variance there is no
moment start (the fit starts at lme4's). Correlations start at zero.
Everything comes from the cross products that the fit holds anyway
(``Z' [X y]``, ``[X y]' [X y]`` and the diagonal of ``Z' Z``), so streamed
models get the same start without their rows.

With such a start the optimiser's coordinates are scaled by
``sqrt(M_l) / sd_l``, ``sd_l`` the term's largest starting SD
(:func:`start_scale`): the REML criterion's curvature in a term's factor
grows with its number of levels and falls with the square of its scale.

Evaluations to convergence from lme4's start and from this one (large
models, the compiled L-BFGS loop; the same criterion within 1e-6): InstEval
``(1|s) + (1|d) + (1|dept:service)`` 17 -> 7, ``(1|s) + (1|d)`` 13 -> 6,
``(1|s) + (1|d) + (1|dept)`` 17 -> 8, ``(1|s) + (service|d)`` 15 -> 11,
with a 3,000-level class of no variance added 19 -> 12; simulated
``(x|g) + (1|h)`` 16 -> 10, ``(0 + f|g)`` with one variance zero 12 -> 12,
nested ``(1|a/b)`` 21 -> 21 and 16 -> 16 (no moment start), and two classes
of SDs 0.009 and 0.045 of the residual's 11 -> 16 (both starts at
:data:`SD_FLOOR`).
"""

from __future__ import annotations

import numpy as np

from lmmjax.linalg import CrossProducts, Structure, level_sums

__all__ = ["moment_start", "start_scale"]

SD_FLOOR = 0.05  # smallest starting SD, relative to the residual SD (0 is a stationary point)
FIRST_STEP = 10.0  # the largest entry of the scale (see start_scale)
OVERCOMMITTED = 0.95  # the columns' share of the residual variance above which there is no start


def moment_start(terms, struct: Structure, xp: CrossProducts) -> np.ndarray:
    """Theta from moment estimates of each lhs column's variance (zero correlations).

    Parameters
    ----------
    terms : sequence of Term
        The random-effect terms (theta's layout).
    struct : Structure
        The blocked system (``G1`` and the diagonal of ``C`` give ``diag(Z' Z)``).
    xp : CrossProducts
        Of ``M = [X y]`` (y last).

    Returns
    -------
    numpy.ndarray or None
        Theta in lme4's order, each SD relative to the residual's and at least
        :data:`SD_FLOOR`; None where the columns claim more than
        :data:`OVERCOMMITTED` of the residual variance (nested classes).
    """
    gram = np.asarray(xp.gram, dtype=float)
    XtX, Xty = gram[:-1, :-1], gram[:-1, -1]
    beta = np.linalg.lstsq(XtX, Xty, rcond=None)[0] if len(Xty) else np.zeros(0)
    n, p = struct.nobs, len(Xty)
    s2 = float(gram[-1, -1] - beta @ Xty) / max(n - p, 1)
    if not np.isfinite(s2) or s2 <= 0:  # a perfect fit, or products lost to rounding
        return None
    cols = []  # (sum_j S^2 / n, levels, sum_j n) of each lhs column
    coef = np.append(-beta, 1.0)
    for ZtM, nn in level_sums(struct, xp):
        S, nn = np.asarray(ZtM, float) @ coef, np.asarray(nn, float)
        ok = nn > 0
        ratio = np.where(ok, S**2 / np.where(ok, nn, 1.0), 0.0)
        cols += list(zip(ratio.sum(0), ok.sum(0), nn.sum(0), strict=True))
    ss, levels, tot = (np.asarray(v, float) for v in zip(*cols, strict=True))
    s2e = s2
    for _ in range(50):  # a contraction: each column's share of s2 is small
        var = np.maximum(ss - levels * s2e, 0.0) / np.maximum(tot, 1e-300)
        s2e = max(s2 - float(var @ (tot / n)), 0.05 * s2)
    if float(var @ (tot / n)) > OVERCOMMITTED * s2:
        return None
    sd = np.maximum(np.sqrt(var / s2e), SD_FLOOR)  # s2e >= 0.05 s2 > 0
    theta, k = [], 0
    for t in terms:
        rows, cols_ = t.theta_index()
        theta.append(np.where(rows == cols_, sd[k + rows], 0.0))
        k += t.d
    return np.concatenate(theta)


def start_scale(terms, theta0: np.ndarray) -> np.ndarray:
    """The optimiser's scale ``phi = theta * scale`` for a start from :func:`moment_start`.

    Every entry of term ``l``'s factor gets ``sqrt(M_l) / sd_l``, ``sd_l``
    the term's largest starting SD, and the largest entry is
    :data:`FIRST_STEP`: L-BFGS's first trial step, of unit length in
    ``phi``, then changes the term of the largest scale by at most a tenth of
    its start. From a start of ones with ``sqrt(M_l)`` scaled to a largest
    entry of 1, InstEval's first step took its smallest SD from 1 to -8.6,
    and the fit took 17 evaluations; from the moment start with this scale,
    7 (a largest entry of 1: 10; 3: 9; 30: 7). One scale per entry (its
    row's SD) instead of per term gave tiny steps to the rest of a term with
    one small SD: ``(0 + f|g)`` took 25 evaluations against 12.
    """
    scale, k = [], 0
    for t in terms:
        rows, cols = t.theta_index()
        diag = theta0[k : k + t.ntheta][rows == cols]
        scale.append(np.full(len(rows), np.sqrt(t.nlevels) / diag.max()))
        k += t.ntheta
    scale = np.concatenate(scale)
    return FIRST_STEP * scale / np.max(scale)

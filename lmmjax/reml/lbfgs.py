"""L-BFGS with a strong Wolfe line search, for the small REML/ML problems, driven from the host.

A small model's theta is optimised without bounds (see
:mod:`lmmjax.reml.optimize`) and has at most a few dozen entries; each
evaluation is one call of the compiled value-and-gradient. This replaced
SciPy's L-BFGS-B, which lmmjax used without bounds and with the same memory
of 10 pairs, because importing ``scipy.optimize`` took 0.12-0.14 s of a
1.3-1.6 s command-line fit of sleepstudy (issue 11); on lme4's reference
cases both took 5-19 evaluations to the same optimum. The iteration follows
Nocedal & Wright, *Numerical Optimization* (2006): the two-loop recursion
(Algorithm 7.4) with the scaling (7.20), the line search of Algorithms 3.5
and 3.6 with cubic interpolation (3.59); the first trial step has unit
length, as in L-BFGS-B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["Result", "minimize"]

C1, C2 = 1e-4, 0.9  # sufficient decrease and curvature constants of the Wolfe conditions
MAX_TRIALS = 20  # evaluations per line search, as SciPy's L-BFGS-B
MEMORY = 10  # correction pairs kept, as SciPy's L-BFGS-B default


class Result(NamedTuple):
    """The last accepted point, its value and gradient, and the work done."""

    x: np.ndarray
    fun: float
    jac: np.ndarray
    nit: int
    nfev: int


class _Point(NamedTuple):
    step: float
    f: float
    g: np.ndarray | None
    slope: float  # the directional derivative g'p (NaN where f is not finite)


def _cubic(a: _Point, b: _Point) -> float:
    """Minimiser of the cubic through two points' values and slopes (NaN if none)."""
    if a.step == b.step:
        return float("nan")
    d1 = a.slope + b.slope - 3.0 * (a.f - b.f) / (a.step - b.step)
    disc = d1 * d1 - a.slope * b.slope
    if not disc >= 0.0:
        return float("nan")
    d2 = np.copysign(np.sqrt(disc), b.step - a.step)
    den = b.slope - a.slope + 2.0 * d2
    if den == 0.0:
        return float("nan")
    return b.step - (b.step - a.step) * (b.slope + d2 - d1) / den


def _trial(lo: _Point, hi: _Point) -> float:
    """The next step inside the bracket: interpolated, kept off its ends, else the midpoint."""
    if np.isfinite(hi.f):
        t = _cubic(lo, hi)
    else:  # beyond hi the objective is not finite: no slope there
        t = float("nan")
    width = hi.step - lo.step
    inner = sorted((lo.step + 0.1 * width, hi.step - 0.1 * width))
    if not np.isfinite(t) or not inner[0] <= t <= inner[1]:
        t = lo.step + 0.5 * width
    return t


def _line_search(fun, x, p, start: _Point, step: float) -> tuple[_Point, int]:
    """A step satisfying the strong Wolfe conditions, or the best sufficient decrease found.

    Returns the accepted point (``step`` 0 when none decreased the objective)
    and the number of evaluations.
    """
    f0, s0 = start.f, start.slope
    nfev = 0

    def evaluate(a: float) -> _Point:
        nonlocal nfev
        nfev += 1
        f, g = fun(x + a * p)
        if not np.isfinite(f):
            return _Point(a, np.inf, None, float("nan"))
        return _Point(a, float(f), g, float(g @ p))

    def armijo(pt: _Point) -> bool:
        return pt.f <= f0 + C1 * pt.step * s0

    def zoom(lo: _Point, hi: _Point) -> _Point:
        while nfev < MAX_TRIALS and abs(hi.step - lo.step) > 1e-14 * max(lo.step, hi.step):
            pt = evaluate(_trial(lo, hi))
            if not armijo(pt) or pt.f >= lo.f:
                hi = pt
            elif abs(pt.slope) <= -C2 * s0:
                return pt
            else:
                if pt.slope * (hi.step - lo.step) >= 0.0:
                    hi = lo
                lo = pt
        return lo  # sufficient decrease at least, unless lo is the start

    prev = start
    for i in range(MAX_TRIALS):
        pt = evaluate(step)
        if not armijo(pt) or (i > 0 and pt.f >= prev.f):
            return zoom(prev, pt), nfev
        if abs(pt.slope) <= -C2 * s0:
            return pt, nfev
        if pt.slope >= 0.0:
            return zoom(pt, prev), nfev
        t = _cubic(prev, pt)  # still descending: extrapolate, 1.5 to 4 times further
        step = float(np.clip(t, 1.5 * step, 4.0 * step)) if np.isfinite(t) else 2.0 * step
        prev = pt
    return prev, nfev


def minimize(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    *,
    maxiter: int,
    stop: Callable[[float, np.ndarray], bool],
    ftol: float = 1e-14,
) -> Result:
    """Minimise ``fun`` (value and gradient) from ``x0`` by L-BFGS.

    Parameters
    ----------
    fun : callable
        ``x -> (value, gradient)``; a non-finite value means "step back".
    x0 : array
    maxiter : int
        Most iterations (accepted steps).
    stop : callable
        ``(value, gradient) -> bool``, asked at the start and after every
        iteration: the caller's convergence test.
    ftol : float
        Also stop when an iteration lowers the value by at most ``ftol`` times
        ``max(|f_old|, |f_new|, 1)`` (L-BFGS-B's ``factr`` test), or when the
        line search finds no lower value.

    Returns
    -------
    Result
    """
    x = np.array(x0, dtype=float)
    f, g = fun(x)
    f, g = float(f), np.asarray(g, dtype=float)
    nfev, nit = 1, 0
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # the last MEMORY (s, y, 1 / s'y)
    while nit < maxiter and np.isfinite(f) and not stop(f, g):
        p = _direction(g, pairs)
        slope = float(g @ p)
        if not slope < 0.0:  # not a descent direction: forget the pairs
            pairs, p, slope = [], -g, -float(g @ g)
            if slope == 0.0:
                break
        first = 1.0 if pairs else 1.0 / np.sqrt(-slope)  # a unit step along -g at first
        new, used = _line_search(fun, x, p, _Point(0.0, f, g, slope), first)
        nfev += used
        if new.step == 0.0:
            break
        s, y = new.step * p, new.g - g
        nit += 1
        decrease = f - new.f
        x, f_old, f, g = x + s, f, new.f, new.g
        sy = float(s @ y)
        if sy > 1e-10 * np.linalg.norm(s) * np.linalg.norm(y):  # else skip the update
            pairs = [*pairs[-(MEMORY - 1) :], (s, y, 1.0 / sy)]
        if decrease <= ftol * max(abs(f_old), abs(f), 1.0):
            break
    return Result(x, f, g, nit, nfev)


def _direction(g: np.ndarray, pairs: list) -> np.ndarray:
    """``-H g`` by the two-loop recursion, ``H_0`` scaled by the last pair (7.20)."""
    if not pairs:
        return -g
    q = g.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        q -= a * y
        alphas.append(a)
    s, y, _ = pairs[-1]
    r = (float(s @ y) / float(y @ y)) * q
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        r += (a - rho * float(y @ r)) * s
    return -r

"""Profiled REML / ML fitting: L-BFGS on theta with exact autodiff gradients.

The objective's value and gradient are one compiled XLA program; an L-BFGS
(:mod:`lmmjax.reml.lbfgs`) drives it from the host. An earlier version ran
optax's L-BFGS with its zoom line search inside one compiled ``while_loop``:
the same iterations, but XLA took about 3 s to compile that loop for
sleepstudy against about 0.7 s for the value-and-gradient alone, and compile
time is what a user fitting a new model waits for (issue 11); the host loop
costs microseconds per evaluation. On large problems (more than
``QUICK_MAX_Q`` random effects), where evaluations dominate and optax's line
search needs fewer of them (InstEval: 17; SciPy's L-BFGS-B took 27 with the
older scale), :func:`lbfgs_loop` runs instead, from the moment start of
:mod:`lmmjax.reml.start` (InstEval: 7 evaluations).

Theta is optimised unconstrained: the objective depends on each Lambda_l only
through ``Lambda_l Lambda_l'``, which is unchanged when a column of Lambda_l
changes sign, so the bounded problem (diagonal of Lambda >= 0, as in lme4)
is solved by optimising freely and flipping the sign of every column with a
negative diagonal afterwards. Parameters that end near the boundary are
snapped to zero when that costs almost nothing, and the fit is flagged
singular as lme4's ``isSingular()`` would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lmmjax.cache import compiled
from lmmjax.linalg import CrossProducts, SmallLayout, Structure, device_array
from lmmjax.options import RemlOptions
from lmmjax.reml import lbfgs
from lmmjax.reml.objective import (
    Estimates,
    estimates,
    padded,
    profiled_objective,
    small_vcov_pieces,
)


@dataclass
class OptimizerLog:
    """What the optimiser did.

    Attributes
    ----------
    optimizer : str
        ``"lbfgs"``, or ``"lbfgs+nelder-mead"`` when the derivative-free fallback
        produced the reported optimum.
    iterations, fevals : int
        L-BFGS iterations and objective(+gradient) evaluations.
    grad_norm : float
        Infinity norm of the projected gradient at the reported theta.
    converged : bool
    seconds, compile_seconds : float
    messages : list of str
    """

    optimizer: str = "lbfgs"
    iterations: int = 0
    fevals: int = 0
    grad_norm: float = float("nan")
    converged: bool = False
    seconds: float = 0.0
    compile_seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def theta_scale(terms) -> np.ndarray:
    """Per-parameter scale ``sqrt(M_l)`` that evens out the curvature of the objective.

    The deviance's curvature in a term's theta grows with its number of levels
    (InstEval: 2972 students against 28 department-service cells), which
    leaves plain L-BFGS crawling along the flat directions; optimising
    ``phi = theta * sqrt(M_l)`` halves the evaluations there.
    """
    return np.concatenate([np.full(t.ntheta, np.sqrt(t.nlevels)) for t in terms])


class _Evaluations:
    """The compiled value-and-gradient in the scaled coordinates ``phi = theta * scale``."""

    def __init__(self, objective: Objective, scale: np.ndarray):
        self.objective, self.scale = objective, scale
        self.count = 0

    def __call__(self, phi: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = self.objective.value_and_grad(phi / self.scale)
        self.count += 1
        return value, grad / self.scale


def stop_tolerance(value, nobs, gtol: float, xnp=np):
    """The gradient's infinity norm at which the optimisers stop (see :func:`_lbfgs`).

    ``xnp`` is NumPy on the host, ``jax.numpy`` inside :func:`lbfgs_loop`.
    """
    return gtol * xnp.maximum(1.0, xnp.minimum(xnp.abs(value), nobs))


def _lbfgs(evaluate: _Evaluations, theta0: np.ndarray, maxiter: int, gtol: float, nobs: int):
    """L-BFGS (:mod:`lmmjax.reml.lbfgs`) on ``phi = theta * scale``, to a scale-free tolerance.

    Stops when the gradient with respect to theta has infinity norm at most
    ``gtol * max(1, min(|objective|, N))``, or when an iteration no longer
    decreases the objective (relative 1e-14). The cap at the number of rows
    ``N``: the criterion of ``y`` in other units is shifted by ``N log s^2``
    and its gradient is unchanged, so a tolerance relative to ``|objective|``
    alone stopped such fits early (y times 1e6 or 1e-6, ``(x1 + x2 | g)``:
    14 iterations and a criterion 1.2e-3 above lme4's, against about 150 and
    1e-8 now). The reported convergence (:func:`optimize_theta`) keeps the
    documented ``gtol * max(1, |objective|)``, which this implies.
    """
    scale = evaluate.scale

    def stop(value: float, grad_phi: np.ndarray) -> bool:
        tol = stop_tolerance(value, nobs, gtol)
        return np.max(np.abs(grad_phi * scale), initial=0.0) <= tol

    res = lbfgs.minimize(evaluate, theta0 * scale, maxiter=maxiter, stop=stop)
    return res.x / scale, res.fun, res.jac * scale, res.nit


def lbfgs_loop(theta0, struct: Structure, xp: CrossProducts, scale, maxiter, gtol, reml: bool):
    """optax L-BFGS (zoom line search) in one compiled ``while_loop``, then the estimates.

    For large problems, where an evaluation costs far more than compiling the
    loop (InstEval: 17 evaluations; SciPy's L-BFGS-B took 27 with the older scale), and
    for the bootstrap's vmapped refits. Runs in ``phi = theta * scale`` and
    stops on the same tolerance as :func:`_lbfgs`.

    Returns
    -------
    theta, value, grad (with respect to theta), iterations, evaluations, Estimates
        ``evaluations`` counts the objective's values and gradients: the
        starting point's and every trial of the line searches.
    """
    import optax  # only here: small fits never run this loop, and skip the import

    fun = lambda phi: profiled_objective(phi / scale, struct, xp, reml)  # noqa: E731
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        phi, state, _, it, evals = carry
        value, grad = value_and_grad(phi, state=state)  # evaluated at the start only
        updates, state = opt.update(grad, state, phi, value=value, grad=grad, value_fn=fun)
        evals = evals + optax.tree.get(state, "num_linesearch_steps")
        return optax.apply_updates(phi, updates), state, value, it + 1, evals

    def cond(carry):
        _, state, prev, it, _ = carry
        value = optax.tree.get(state, "value")
        size = jnp.maximum(1.0, jnp.abs(value))
        tol = stop_tolerance(value, struct.nobs, gtol, jnp)
        small = jnp.max(jnp.abs(optax.tree.get(state, "grad") * scale)) <= tol
        stalled = (it > 1) & (jnp.abs(prev - value) <= 1e-14 * size)
        return (it == 0) | ((it < maxiter) & ~small & ~stalled & jnp.isfinite(value))

    phi0 = theta0 * scale
    init = (phi0, opt.init(phi0), jnp.asarray(jnp.inf, theta0.dtype), 0, 1)
    phi, state, _, it, evals = jax.lax.while_loop(cond, step, init)
    theta = phi / scale
    value, grad = optax.tree.get(state, "value"), optax.tree.get(state, "grad") * scale
    return theta, value, grad, it, evals, estimates(theta, struct, xp, reml)


GRADIENT, ESTIMATES, PIECES = 0, 1, 2  # what a call of the objective's program adds


def _only_where(pred, fn, *args):
    """``fn(*args)`` where ``pred`` holds, zeros of its shapes elsewhere, tracing ``fn`` once.

    ``lax.cond`` needs the zeros' shapes before it traces its branches; from
    ``jax.eval_shape`` of ``fn`` itself they cost a second trace, which for
    Satterthwaite's pieces by reverse-over-reverse autodiff (before they were
    written in closed form) was 0.15-0.2 s of a cold command-line fit of
    sleepstudy. Wrapped in ``jax.jit``, the trace that gives the shapes is
    cached and the branch calls it (in one process, the program's trace
    0.30-0.41 s against 0.48-0.50 s when the branch evaluated the shapes'
    jaxpr again with ``jaxpr_as_fun``). ``args`` are pytrees of arrays: a
    Python number among them is traced like one.
    """
    fn = jax.jit(fn)
    shape = jax.eval_shape(fn, *args)

    def run():
        return fn(*args)

    def zeros():
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shape)

    return jax.lax.cond(pred, run, zeros)


def _evaluate(theta, sigma, struct, xp, mode, reml, pieces):
    """Value and gradient of the objective, and what ``mode`` adds.

    ``mode`` (traced) is :data:`GRADIENT`, :data:`ESTIMATES` (the estimates
    too) or, where ``pieces`` (static) built it in, :data:`PIECES`
    (Satterthwaite's, :func:`lmmjax.reml.objective.small_vcov_pieces`, at
    ``(theta, sigma)``). Branches that do not run return zeros.

    One program for the whole fit and its summary: the estimates run once, at
    the end, and sharing the program saves compiling a second one (0.36 of
    1.66 s for sleepstudy). A small model's program holds Satterthwaite's
    pieces as well, so that a fresh process loads one program instead of two
    (the second load took 60-90 ms of a 1.3 s sleepstudy fit from the command line).
    """
    value, grad = jax.value_and_grad(profiled_objective)(theta, struct, xp, reml)
    est = _only_where(mode == ESTIMATES, partial(estimates, reml=reml), theta, struct, xp)
    if not pieces:
        return value, grad, est, None
    varpar = jnp.append(theta, sigma)
    parts = _only_where(mode == PIECES, partial(small_vcov_pieces, reml=reml), varpar, struct, xp)
    return value, grad, est, parts


QUICK_MAX_Q = 2000  # random effects up to which the objective is compiled quickly


class Objective:
    """The compiled objective at fixed (struct, xp), for NumPy thetas.

    Calling it gives the value; the optimiser, boundary probes, snapping,
    Nelder-Mead and the final estimates all run the one compiled program.
    """

    def __init__(self, struct, xp, reml: bool, padding: SmallLayout | None = None):
        self.args, self.reml, self.dtype = (struct, xp), reml, struct.dtype
        self.padding = padding  # a padded SmallSystem's: theta padded in, gradient cut out
        self.compile_seconds = 0.0
        # small problems: compile without LLVM optimisation, run time is negligible there
        self.quick = struct.q <= QUICK_MAX_Q

    def _run(self, theta, mode: int, sigma: float = 0.0):
        th = np.asarray(padded(self.padding, theta), self.dtype)  # no device_put: a copy
        args = (th, np.asarray(sigma, self.dtype), *self.args, np.asarray(mode, np.int32))
        run, seconds = compiled(_evaluate, *args, quick=self.quick, reml=self.reml,
                                pieces=self.padding is not None)  # fmt: skip
        self.compile_seconds += seconds
        return run(*args)

    def value_and_grad(self, theta) -> tuple[float, np.ndarray]:
        value, grad, _, _ = self._run(theta, GRADIENT)
        return float(value), np.asarray(grad, dtype=float)[: np.size(theta)]

    def estimates(self, theta) -> Estimates:
        est = self._run(theta, ESTIMATES)[2]
        if self.padding is None:
            return est
        beta, vcov = self.padding.fixed(est.beta, est.vcov)
        return est._replace(beta=beta, vcov=vcov, b=self.padding.unpack(est.b[0]))

    def pieces(self, theta, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`lmmjax.reml.objective.small_vcov_pieces` at ``(theta, sigma)``, padding included.

        Only for a small model's padded system (``padding``), whose program holds them.
        """
        if self.padding is None:
            raise ValueError("Satterthwaite's pieces are in the programs of small models only")
        return tuple(np.asarray(a, dtype=float) for a in self._run(theta, PIECES, sigma)[3])

    def __call__(self, theta) -> float:
        return self.value_and_grad(theta)[0]


def canonical_theta(theta: np.ndarray, terms) -> tuple[np.ndarray, np.ndarray]:
    """Flip Lambda's columns so that its diagonal is non-negative (same objective).

    Returns the flipped theta and the signs applied (to flip a gradient too).
    """
    theta = np.array(theta, dtype=float)
    signs = np.ones_like(theta)
    k = 0
    for t in terms:
        rows, cols = t.theta_index()
        block = theta[k : k + t.ntheta]
        for j in range(t.d):
            diag = np.flatnonzero((rows == j) & (cols == j))
            if diag.size and block[diag[0]] < 0:
                block[cols == j] *= -1.0
                signs[k : k + t.ntheta][cols == j] = -1.0
        k += t.ntheta
    return theta, signs


def on_bound(terms) -> np.ndarray:
    """Mask of theta entries with a lower bound of zero (Lambda's diagonal)."""
    out = []
    for t in terms:
        out.extend(r == c for r, c in zip(*t.theta_index(), strict=True))
    return np.asarray(out, dtype=bool)


def projected_grad_norm(grad: np.ndarray, theta: np.ndarray, bounded: np.ndarray) -> float:
    """Infinity norm of the gradient projected on the feasible set ``theta_b >= 0``."""
    g = np.array(grad, dtype=float)
    at_bound = bounded & (theta <= 0.0)
    g[at_bound] = np.minimum(g[at_bound], 0.0)
    return float(np.max(np.abs(g))) if g.size else 0.0


def _snap(theta, value, f: Objective, bounded, snap_tol, log):
    """Set bounded parameters within 1e-3 of zero to zero when the objective allows."""
    near = bounded & (np.abs(theta) < 1e-3) & (theta != 0.0)
    for i in np.flatnonzero(near):
        trial = theta.copy()
        trial[i] = 0.0
        trial_value = f(trial)
        if trial_value - value <= snap_tol:
            log.messages.append(f"theta[{i}] = {theta[i]:.3g} snapped to 0")
            theta, value = trial, min(value, trial_value)
    return theta, value


def _escape_boundary(theta, value, f: Objective, bounded, step=0.05):
    """A point off the boundary with a lower objective, or None if there is none."""
    for i in np.flatnonzero(bounded & (np.abs(theta) < 1e-4)):
        probe = theta.copy()
        probe[i] = step
        if f(probe) < value - 1e-10 * max(1, abs(value)):
            return probe
    return None


def _nelder_mead(theta, f: Objective, bounded):
    import scipy.optimize  # only here: the import takes 0.12-0.14 s, and fits rarely fall back

    bounds = [(0.0, None) if b else (None, None) for b in bounded]
    res = scipy.optimize.minimize(
        f,
        np.clip(theta, [b[0] if b[0] is not None else -np.inf for b in bounds], None),
        method="Nelder-Mead",
        bounds=bounds,
        options={"xatol": 1e-8, "fatol": 1e-10, "maxfev": 20000, "adaptive": True},
    )
    return np.asarray(res.x), float(res.fun), int(res.nfev)


def optimize_theta(
    struct: Structure,
    xp: CrossProducts,
    terms,
    theta0: np.ndarray,
    options: RemlOptions,
    *,
    reml: bool = True,
    padding: SmallLayout | None = None,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, float, OptimizerLog, bool, Estimates]:
    """Minimise the profiled objective over theta.

    Parameters
    ----------
    struct : Structure or SmallSystem
        The Z-only blocked system, or a small model's padded dense one.
    xp : CrossProducts or DenseProducts
        Cross products of ``[X y]``.
    terms : sequence of Term
        The random-effect terms (theta's layout).
    theta0 : array
        Starting value.
    options : RemlOptions
        ``maxiter`` L-BFGS iterations; convergence when the projected gradient's
        infinity norm is at most ``gtol * max(1, |objective|)``; ``fallback`` to
        Nelder-Mead when L-BFGS does not converge; ``snap_tol`` the largest
        objective increase accepted when snapping to the boundary.
    reml : bool
        REML criterion (True) or ML deviance (False).
    padding : SmallLayout, optional
        With a ``SmallSystem``: theta's padding and the terms' effects.
    scale : array, optional
        Large problems only: the compiled loop's ``phi = theta * scale``
        (:func:`lmmjax.reml.start.start_scale` for a moment start); by default
        :func:`theta_scale` divided by its largest entry.

    Returns
    -------
    theta, objective, log, singular, estimates
    """
    log = OptimizerLog()
    start = time.perf_counter()
    # float32 gradients carry rounding of about sqrt(eps) relative: no tighter than that
    gtol = max(options.gtol, float(np.sqrt(np.finfo(struct.dtype).eps)))
    f = Objective(struct, xp, reml, padding)
    base = theta_scale(terms)
    evaluate = _Evaluations(f, base)
    est = None
    if struct.q > QUICK_MAX_Q:  # large: the compiled loop, evaluations dominate
        dtype = struct.dtype
        # Scaled so that the largest is 1: L-BFGS is unchanged by a common factor except
        # for its first trial step, a unit step in phi, which is then about a unit step in
        # the largest term's theta instead of 1 / sqrt(M_l) of one (InstEval: 17
        # evaluations against 22, where the first line search doubled the step 6 times)
        if scale is None:
            scale = base / np.max(base, initial=1.0)
        args = (struct, xp, device_array(scale, dtype),
                device_array(options.maxiter, np.int64), device_array(gtol, dtype))  # fmt: skip

        def minimise(start):
            th = device_array(start, dtype)
            run, seconds = compiled(lbfgs_loop, th, *args, reml=reml)
            f.compile_seconds += seconds
            theta, value, grad, it, evals, est = run(th, *args)
            evaluate.count += int(evals)
            return np.asarray(theta, float), float(value), np.asarray(grad, float), int(it), est

    else:
        nobs = int(np.asarray(struct.nobs))  # once, not per start: a transfer from the device

        def minimise(start):
            return (*_lbfgs(evaluate, np.asarray(start, float), options.maxiter, gtol, nobs), None)

    theta, value, grad, it, est = minimise(theta0)
    log.iterations = it
    bounded = on_bound(terms)
    # A zero diagonal entry is a stationary point of the sign-symmetric objective even
    # when it is not a minimum: probe off the boundary and restart if that is lower.
    for _ in range(int(bounded.sum())):
        probe = _escape_boundary(np.asarray(theta), float(value), f, bounded)
        if probe is None:
            break
        log.messages.append("restarted L-BFGS off a stationary point at the boundary")
        theta, value, grad, it, est = minimise(probe)
        log.iterations += it
    log.fevals = evaluate.count
    theta, flips = canonical_theta(np.asarray(theta), terms)
    value, grad = float(value), np.asarray(grad) * flips

    def check(th):
        v, g = f.value_and_grad(th)
        return v, projected_grad_norm(g, th, bounded)

    gnorm = projected_grad_norm(grad, theta, bounded)
    converged = bool(np.isfinite(value) and gnorm <= gtol * max(1.0, abs(value)))
    changed = False
    if not converged and options.fallback:
        log.messages.append(
            f"L-BFGS stopped after {log.iterations} iterations with projected gradient "
            f"{gnorm:.3g}; trying Nelder-Mead"
        )
        nm_theta, nm_value, nm_fev = _nelder_mead(theta, f, bounded)
        log.fevals += nm_fev
        if np.isfinite(nm_value) and (not np.isfinite(value) or nm_value < value - 1e-10):
            theta, log.optimizer = canonical_theta(nm_theta, terms)[0], "lbfgs+nelder-mead"
            log.messages.append(f"Nelder-Mead improved the objective to {nm_value:.10g}")
            changed = True
        else:
            log.messages.append("Nelder-Mead did not improve on L-BFGS")
        value, gnorm = check(theta)
        converged = bool(np.isfinite(value) and gnorm <= 10 * gtol * max(1.0, abs(value)))
    snapped, value = _snap(theta, value, f, bounded, options.snap_tol, log)
    if changed or not np.array_equal(snapped, theta):
        theta = snapped
        value, gnorm = check(theta)
        est = None
    log.grad_norm, log.converged = gnorm, converged
    if est is None:  # sign flips leave the estimates as they are; a changed theta does not
        est = f.estimates(theta)
    log.compile_seconds = f.compile_seconds
    log.seconds = time.perf_counter() - start
    singular = bool(bounded.any() and np.min(np.abs(theta[bounded])) < 1e-4)
    return theta, value, log, singular, est

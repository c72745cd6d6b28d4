"""``marginalize: auto``: which random-effect classes to integrate out, by a cheap rule.

The choice weighs two figures for every candidate set ``S`` of marginalised
classes (none, all and, with up to four classes, every subset; otherwise each
single class), both computed in NumPy from the design before anything is
compiled, in milliseconds, and deterministic (no timing, no random numbers):

* **Gradient cost** ``t(S)``, a cost model of one evaluation of the potential
  and its gradient, in seconds on this project's 2-core CPU: a fixed
  ``T_FIXED`` plus ``T_CLASS`` per marginalised class (the factorisation's
  operations), ``T_ROW`` per row and column touched (the residual
  ``y - X beta - Z b`` of the sampled classes and the cross products ``Z'r``
  of the marginalised ones; none when every class is marginalised, since
  ``Z'[X y]`` is then precomputed) and ``T_FLOP`` per multiply-add of the
  blocked factorisation (``M_1 d_1^3`` for the first class, ``q_r^3`` for the
  dense Schur block of the others and the cheaper of the dense and the paired
  form of ``B = Z_rest' Z_1``, as :func:`lmmjax.linalg.build_structure` picks).
  The constants are fitted by ``benchmarks/auto_cost.py``: one chain's value
  and gradient in a compiled loop, LAPACK on one thread, as the sampler's
  chains run on a CPU, for every candidate of sleepstudy, Orthodont and eight
  cognitive-science data sets (38 candidates; predictions within a factor
  1.3 of the measurement at the median, 2.8 at worst). The constants fitted
  earlier to vectorised batches of 4 chains were 6x too high.
* **Funnel depth** ``lambda_l`` of each class: the median over its levels of
  the largest eigenvalue of ``C' Z_m' Z_m C / sigma^2``, the data's precision
  on a level's effects relative to their prior precision, at moment estimates
  (least-squares fixed effects; per-level least squares of the residual on the
  term's columns; ``C C'`` the between-level covariance of those estimates
  less their mean sampling covariance, clipped to positive semi-definite; the
  pooled within-level residual variance as ``sigma^2``; fixed SDs where
  ``fixed_scales`` gives them without ``shared_scale``). A sampled
  (non-centred) class with a deep funnel needs small steps and long
  trajectories: the gradients per effective draw grow about as ``1 + lambda``
  against a marginalised class (measured ratios of ESS per gradient, ``all``
  over ``none``: sleepstudy 11 with ``lambda`` = 24, Orthodont 13 with 7.5,
  dillonE1 8.6 with 16; right within a factor of 2).

The rule: choose the set minimising the predicted seconds per effective draw,
``(t(S) + t_0) (1 + max_{l not in S} lambda_l)`` (the max over no class being
0); ties go to the set listed first, ``all`` before ``none`` before subsets.

``t_0`` (:func:`fixed_overhead`) spreads the fit's fixed work over the
gradients that one core runs: ``FIXED_SECONDS`` (imports, compiling the
sampler and the recovery, the recovery, the InferenceData and its summary;
6-8 s of a dillonE1 fit on the 2-core CPU, 3-4 s of a sleepstudy one) over
``ceil(chains / cores) (warmup + samples) STEPS_PER_ITERATION`` gradients,
``cores`` the 2 of the machine the constants were fitted on (a fixed number,
like the constants, so that the same data and run give the same choice on
any machine).
At a fixed number of draws the effective draws fall about as
``1 / (1 + lambda)`` while the steps per iteration stay near 10, so the
process's seconds per effective draw are ``(1 + lambda) (F + G t) / E_0``,
``G`` the gradients per core: the rule above up to a constant. With ``t_0 =
0`` (before, and in the limit of long runs) bambi's uncorrelated model of
dillonE1, ``(c_int || subj) + (c_int || item)``, chose the subj intercepts
(51 against 426 us per gradient for ``all``, funnel factors 3.8 and 1) and
reached 0.78 of ``all``'s ESS per second over whole processes
(``benchmarks/vs_bambi.py --uncorrelated``): its 6-8 s of fixed work weigh
on the smaller ESS. The default run (4 chains x 2,000 iterations on 2 cores)
gives ``t_0`` = 125 us, which leaves the choices on sleepstudy, Orthodont,
dillonE1 and dutch as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

__all__ = [
    "AutoChoice",
    "candidate_label",
    "choose_marginal",
    "fixed_overhead",
    "funnel_depths",
    "funnel_factor",
    "gradient_features",
    "gradient_seconds",
]

# fitted by benchmarks/auto_cost.py (one chain, LAPACK on one thread; see the docstring)
T_FIXED = 3e-6  # seconds per gradient: the sampler's and the potential's fixed work
T_CLASS = 10e-6  # per marginalised class: the factorisation's many small operations
T_ROW = 2.2e-9  # per row and column of a gather or segment sum (value and gradient)
T_FLOP = 1.75e-10  # per multiply-add of the blocked factorisation (value and gradient)
PAIR_FLOPS = 8.0  # a scattered pair of B rows costs about 8 multiply-adds (linalg's figure)
COSTS = np.array([T_FIXED, T_CLASS, T_ROW, T_FLOP])
MAX_SUBSETS_CLASSES = 4  # beyond this, only none, all and single classes are candidates
FIXED_SECONDS = 5.0  # a NUTS fit's work besides its gradients (see the module docstring)
STEPS_PER_ITERATION = 10  # leapfrog steps per iteration (dillonE1 all: 10-12 in sampling)
CORES = 2  # the cores of the machine these constants were fitted on (see fixed_overhead)


@dataclass(frozen=True)
class AutoChoice:
    """The outcome of ``marginalize: auto``.

    Attributes
    ----------
    marginal : tuple of bool
        Per term, whether it is marginalised.
    depths : tuple of float
        Per term, its funnel depth ``lambda``.
    candidates : tuple of (label, seconds per gradient, gradient factor, score)
        Every candidate in the order considered; ``score`` is the predicted
        seconds per effective draw up to a constant (the lowest wins).
    overhead : float
        ``t_0``, the fixed seconds per gradient added to each candidate's.
    """

    marginal: tuple[bool, ...]
    depths: tuple[float, ...]
    candidates: tuple[tuple[str, float, float, float], ...]
    overhead: float = 0.0

    def to_dict(self, term_names) -> dict:
        """For the JSON result: chosen groups, depths and every candidate's score."""
        return {
            "chosen": [g for g, m in zip(term_names, self.marginal, strict=True) if m],
            "funnel_depth": dict(zip(term_names, self.depths, strict=True)),
            "fixed_seconds_per_gradient": self.overhead,
            "candidates": {
                label: {"seconds_per_gradient": t, "gradient_factor": f, "score": s}
                for label, t, f, s in self.candidates
            },
        }


def _level_moments(r, term):
    """Per level: Gram ``Z_m'Z_m`` (M, d, d), ``Z_m' r`` (M, d) and ``r_m' r_m`` (M,)."""
    M, d = term.nlevels, term.d
    refs, z = np.asarray(term.refs, dtype=np.int64), np.asarray(term.z, dtype=float)
    outer = (z[:, :, None] * z[:, None, :]).reshape(len(z), d * d)
    gram = np.stack([np.bincount(refs, weights=outer[:, k], minlength=M) for k in range(d * d)])
    zr = np.stack([np.bincount(refs, weights=z[:, k] * r, minlength=M) for k in range(d)])
    rr = np.bincount(refs, weights=r * r, minlength=M)
    return gram.T.reshape(M, d, d), zr.T, rr


def funnel_depths(y, X, terms, fixed_sd=None) -> np.ndarray:
    """Each term's funnel depth ``lambda`` at moment estimates (see the module docstring).

    Parameters
    ----------
    y : array (N,)
        Response on the modelling scale.
    X : array (N, p)
    terms : sequence of Term
    fixed_sd : sequence, optional
        Per term, its fixed SDs (used instead of the estimate) or None.

    Returns
    -------
    numpy.ndarray (n_terms,)
    """
    y, X = np.asarray(y, dtype=float), np.asarray(X, dtype=float)
    r = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    fixed_sd = fixed_sd or (None,) * len(terms)
    out = []
    for term, fixed in zip(terms, fixed_sd, strict=True):
        gram, zr, rr = _level_moments(r, term)
        d = term.d
        ridge = 1e-10 * max(float(np.max(np.trace(gram, axis1=1, axis2=2))), 1e-300)
        gram_r = gram + ridge * np.eye(d)
        b_hat = np.linalg.solve(gram_r, zr[..., None])[..., 0]
        within = float(np.sum(rr - np.einsum("md,md->m", zr, b_hat)))
        s2 = max(within / max(len(y) - term.nlevels * d, 1), 1e-12 * float(np.var(y)) + 1e-300)
        if fixed is not None:
            cov = np.diag(np.asarray(fixed, dtype=float) ** 2)
        else:
            spread = np.atleast_2d(np.cov(b_hat.T)) if term.nlevels > 1 else np.zeros((d, d))
            cov = spread - s2 * np.mean(np.linalg.inv(gram_r), axis=0)
        w, v = np.linalg.eigh(0.5 * (cov + cov.T))
        half = v * np.sqrt(np.maximum(w, 0.0))  # cov = half half'
        rel = np.einsum("ji,mjk,kl->mil", half, gram, half) / s2
        out.append(float(np.median(np.linalg.eigvalsh(rel)[:, -1])))
    return np.asarray(out)


def _pairs_per_level(terms) -> float:
    """``sum_j k_j (k_j + 1) / 2``: pairs of ``B`` rows sharing a level of the first term."""
    first = np.asarray(terms[0].refs, dtype=np.int64)
    counts = np.zeros(terms[0].nlevels)
    for t in terms[1:]:
        key = np.unique(first * t.nlevels + np.asarray(t.refs, dtype=np.int64))
        counts += t.d * np.bincount(key // t.nlevels, minlength=terms[0].nlevels)
    return float(np.sum(counts * (counts + 1) / 2.0))


def gradient_features(terms, marginal, nobs: int, p: int, *, fast: bool = False,
                      row_sigma: bool = False) -> np.ndarray:  # fmt: skip
    """The cost model's counts for one evaluation: what ``T_FIXED``, ``T_CLASS``,
    ``T_ROW`` and ``T_FLOP`` multiply (1, marginalised classes, rows x columns
    touched, multiply-adds). Arguments as for :func:`gradient_seconds`.
    """
    marg = [t for t, m in zip(terms, marginal, strict=True) if m]
    sampled = [t for t, m in zip(terms, marginal, strict=True) if not m]
    q = sum(t.q for t in marg)
    if fast:
        return np.array([1.0, 1.0, 0.0, q * (p + 1)])
    cols = 0 if not sampled and not row_sigma else p + sum(t.d for t in terms)
    cols += sum(t.d * t.d for t in marg) if row_sigma else 0
    flops = sum(t.nlevels * t.d**2 for t in sampled) + (q * (p + 1) if not cols else 0)
    if marg:
        first, q_rest = marg[0], q - marg[0].q
        flops += first.nlevels * first.d**3 + q_rest**3
        if q_rest:
            dense_b = q_rest * first.q * (q_rest + first.d)
            paired = PAIR_FLOPS * _pairs_per_level(marg) * first.d**2
            flops += dense_b if row_sigma else min(dense_b, paired)
    return np.array([1.0, len(marg), nobs * cols, flops], dtype=float)


def gradient_seconds(terms, marginal, nobs: int, p: int, *, fast: bool = False,
                     row_sigma: bool = False) -> float:  # fmt: skip
    """Predicted seconds of one potential-and-gradient evaluation (the module's cost model).

    Parameters
    ----------
    terms : sequence of Term
        In model order (decreasing number of levels).
    marginal : sequence of bool
    nobs, p : int
        Rows and fixed-effect columns.
    fast : bool
        The eigendecomposition fast path (every class marginalised).
    row_sigma : bool
        Sigma has a linear predictor (row-scaled Grams, dense ``B``).
    """
    counts = gradient_features(terms, marginal, nobs, p, fast=fast, row_sigma=row_sigma)
    return float(np.dot(COSTS, counts))


def funnel_factor(depths, marginal) -> float:
    """``1 + max lambda`` over the sampled classes (1 when every class is marginalised)."""
    return 1.0 + max([d for d, m in zip(depths, marginal, strict=True) if not m], default=0.0)


def candidate_label(marginal, names) -> str:
    """``"all"``, ``"none"`` or the marginalised classes' names joined by ``+``."""
    if all(marginal):
        return "all"
    if not any(marginal):
        return "none"
    return "+".join(nm for nm, m in zip(names, marginal, strict=True) if m)


def _candidates(n: int) -> list[tuple[bool, ...]]:
    """Marginalised sets to consider: all, none, then subsets (all of them up to 4 classes)."""
    out = [(True,) * n, (False,) * n]
    if n > 1:
        sizes = range(1, n) if n <= MAX_SUBSETS_CLASSES else (1,)
        for k in sizes:
            for chosen in combinations(range(n), k):
                out.append(tuple(i in chosen for i in range(n)))
    return out


def choose_marginal(
    y,
    X,
    terms,
    names,
    *,
    fixed_sd=None,
    fast_eligible=None,
    row_sigma: bool = False,
    max_dense_b: float = np.inf,
    overhead: float = 0.0,
) -> AutoChoice:
    """Apply the rule of the module docstring.

    Parameters
    ----------
    y, X, terms, fixed_sd
        As for :func:`funnel_depths`.
    names : sequence of str
        The terms' unique names (candidate labels).
    fast_eligible : callable, optional
        ``fast_eligible(marginal) -> bool``: whether the eigendecomposition fast
        path would serve that choice.
    row_sigma : bool
        Sigma has a linear predictor.
    max_dense_b : float
        With ``row_sigma``, candidates whose dense ``B`` would hold more numbers
        are skipped (the model refuses them).
    overhead : float
        ``t_0`` (:func:`fixed_overhead`); 0 ranks by the gradients' cost alone.

    Returns
    -------
    AutoChoice
    """
    terms = list(terms)
    depths = funnel_depths(y, X, terms, fixed_sd)
    n, p = len(np.asarray(y)), np.shape(X)[1]
    rows, best = [], None
    for marginal in _candidates(len(terms)):
        marg = [t for t, m in zip(terms, marginal, strict=True) if m]
        if row_sigma and len(marg) > 1 and marg[0].q * sum(t.q for t in marg[1:]) > max_dense_b:
            continue
        fast = bool(fast_eligible(marginal)) if fast_eligible is not None else False
        t = gradient_seconds(terms, marginal, n, p, fast=fast, row_sigma=row_sigma)
        factor, label = funnel_factor(depths, marginal), candidate_label(marginal, names)
        score = (t + overhead) * factor
        rows.append((label, float(t), float(factor), float(score)))
        if best is None or score < best[1]:
            best = (marginal, score)
    return AutoChoice(best[0], tuple(float(d) for d in depths), tuple(rows), float(overhead))


def fixed_overhead(num_chains: int, num_warmup: int, num_samples: int, cores: int = CORES):
    """``t_0``: ``FIXED_SECONDS`` over the gradients one core runs in the fit.

    Parameters
    ----------
    num_chains, num_warmup, num_samples : int
        The run's size.
    cores : int
        Cores the chains share: by default :data:`CORES`, those of the machine
        the constants were fitted on, not this one's, so that the choice
        depends on the data and the run's size only.
    """
    per_core = math.ceil(max(num_chains, 1) / cores)  # chains run one per core at a time
    gradients = per_core * (num_warmup + num_samples) * STEPS_PER_ITERATION
    return FIXED_SECONDS / max(gradients, 1)

"""Bayesian LMM builder: priors, parameterisation, NumPyro model and potential.

Parameters (NumPyro sample sites; "g" is a term's unique name made safe for
file formats, e.g. ``Subject``, ``Subject_1``, ``cask_batch``):

* ``beta`` (p,): fixed effects; with ``center`` (a model with an intercept),
  the sampler's coordinates are those of centred predictors, as brms and
  bambi sample them: ``beta`` holds the intercept at the predictors' means
  ``beta_0 + sum_k mean(x_k) beta_k`` and the other coefficients unchanged
  (:func:`user_beta` maps back exactly, ``_constrain_all`` does it for every
  draw, and every output is on the user's scale). The prior stays on the
  user's coefficients, the intercept's included (brms instead puts the
  intercept's prior on the centred intercept): centring changes the sampler's
  geometry, not the model;
* ``sigma``: residual SD;
* ``sd_g`` (d_g,): random-effect SDs, absent when fixed by ``fixed_scales``
  (or replaced by one ``sd_shared`` scalar in the shared-scale setting);
* ``L_g`` (d_g, d_g): Cholesky factor of the correlation matrix (d_g > 1);
* ``z_g`` (M_g, d_g): standard-normal effects of a sampled (non-marginalised)
  class, ``b_g[m] = C_g z_g[m]`` with ``C_g = diag(sd_g) L_g`` (non-centred).

With a linear predictor for the residual SD (``sigma ~ x + (x | g)``),
``log sigma_i = X_s beta_sigma + sum_g Z_s,g b_sigma,g`` replaces ``sigma``:
its sites are ``beta_sigma``, ``sd_sigma_g``, ``L_sigma_g`` and ``z_sigma_g``
(always sampled, non-centred).

The likelihood enters through ``numpyro.factor`` with the marginal kernels of
:mod:`lmmjax.bayes.marginal`. The HMC potential is NumPyro's
``potential_energy`` of this model: a pure function of the unconstrained
parameters and the data pytree, shared by the NumPyro and BlackJAX samplers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import potential_energy

from lmmjax.bayes.auto import AutoChoice, choose_marginal, fixed_overhead
from lmmjax.bayes.lkj import lkj_cholesky
from lmmjax.bayes.marginal import KernelData, marginal_loglik
from lmmjax.bayes.moments import RowMoments, row_moments
from lmmjax.bayes.priors import (
    SIGMA_PREFIX,
    PriorSet,
    default_priors,
    default_sigma_priors,
    priors_from_moments,
    resolve_priors,
    split_sigma_overrides,
    to_distribution,
)
from lmmjax.errors import LmmInputError
from lmmjax.linalg import (
    build_structure,
    column_map,
    cross_products,
    eigen_precompute,
    z_times,
)
from lmmjax.options import NutsOptions, check_streamed_nuts
from lmmjax.precision import float_dtype
from lmmjax.terms import unique_group_names

__all__ = [
    "BayesModel",
    "BayesSpec",
    "SigmaSpec",
    "build_bayes_model",
    "centred_beta",
    "check_options",
    "cov_factors_from_params",
    "effects_from_params",
    "lmm_model",
    "log_sigma_from_params",
    "loglik_from_params",
    "safe_name",
    "user_beta",
]


def safe_name(name: str) -> str:
    """A variable-name-safe version of a term name (``cask:batch`` -> ``cask_batch``)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


@dataclass(frozen=True)
class SigmaSpec:
    """Static description of the linear predictor of ``log sigma``.

    Attributes
    ----------
    p : int
        Its fixed-effect columns.
    names : tuple of str
        Safe unique names of its terms (sites ``sd_sigma_<name>`` ...).
    d, nlevels : tuple of int
    correlated : tuple of bool
    priors : PriorSet
        Its ``sigma`` entry is unused.
    """

    p: int
    names: tuple[str, ...]
    d: tuple[int, ...]
    nlevels: tuple[int, ...]
    correlated: tuple[bool, ...]
    priors: PriorSet


@dataclass(frozen=True)
class BayesSpec:
    """Static (hashable) description of a Bayesian LMM.

    Attributes
    ----------
    likelihood : {"normal", "lognormal"}
    p : int
        Number of fixed effects.
    names : tuple of str
        Safe unique term names, used in site names.
    d, nlevels : tuple of int
        Effects per level and levels of each term.
    correlated : tuple of bool
        Whether each term has an LKJ correlation (unstructured, d > 1).
    marginal : tuple of bool
        Which terms are integrated out.
    fixed_sd : tuple
        Per term, a tuple of d fixed SDs, or None when the SDs are sampled.
    shared_scale : bool
        All random-effect SDs are ``sd_shared`` times the (fixed) relative scales
        in ``fixed_sd`` (the seed paper's shared-scale setting).
    fast : bool
        Use the eigendecomposition fast path.
    priors : PriorSet
    sigma_model : SigmaSpec or None
        The linear predictor of ``log sigma``, when sigma has one.
    intercept : int
        The intercept's column when the sampler uses centred coordinates
        (``center``); -1 otherwise.
    """

    likelihood: str
    p: int
    names: tuple[str, ...]
    d: tuple[int, ...]
    nlevels: tuple[int, ...]
    correlated: tuple[bool, ...]
    marginal: tuple[bool, ...]
    fixed_sd: tuple
    shared_scale: bool
    fast: bool
    priors: PriorSet
    sigma_model: SigmaSpec | None = None
    intercept: int = -1


def user_beta(gamma, x_shift, intercept: int):
    """Fixed effects on the user's scale from the centred coordinates (any leading axes).

    ``beta = gamma`` except ``beta_0 = gamma_0 - sum_k mean(x_k) gamma_k``
    (``x_shift`` holds the means, zero at the intercept ``0``): ``X beta =
    X_c gamma`` with ``X_c`` the design whose other columns are centred. NumPy or JAX arrays.
    """
    return gamma - (gamma @ x_shift)[..., None] * _unit(gamma, intercept)


def centred_beta(beta, x_shift, intercept: int):
    """The inverse of :func:`user_beta`: ``gamma_0 = beta_0 + sum_k mean(x_k) beta_k``."""
    return beta + (beta @ x_shift)[..., None] * _unit(beta, intercept)


def _unit(like, k: int) -> np.ndarray:
    """The k-th unit vector in ``like``'s last dimension and dtype."""
    return (np.arange(like.shape[-1]) == k).astype(like.dtype)


def _factors(params: Mapping, names, correlated, prefix: str) -> tuple:
    """``C = diag(sd) L`` of terms whose SDs are all sampled (sites ``sd_<prefix><name>``)."""
    out = []
    for name, corr in zip(names, correlated, strict=True):
        sd = params[f"sd_{prefix}{name}"]
        out.append(sd[:, None] * params[f"L_{prefix}{name}"] if corr else jnp.diag(sd))
    return tuple(out)


def log_sigma_from_params(params: Mapping, data: KernelData, spec: BayesSpec) -> jax.Array:
    """Per-row ``log sigma_i`` from the sigma formula's coefficients and effects, O(N d)."""
    sub = spec.sigma_model
    factors = _factors(params, sub.names, sub.correlated, "sigma_")
    effects = [params[f"z_sigma_{n}"] @ c.T for n, c in zip(sub.names, factors, strict=True)]
    return data.sigma_X @ params["beta_sigma"] + z_times(data.sigma_refs, data.sigma_z, effects)


def cov_factors_from_params(params: Mapping, spec: BayesSpec) -> tuple:
    """Each term's covariance factor ``C_l = diag(sd_l) L_l`` from constrained values."""
    out = []
    for k, name in enumerate(spec.names):
        sd = _term_sd(params, spec, k)
        if spec.correlated[k]:
            out.append(sd[:, None] * params[f"L_{name}"])
        else:
            out.append(jnp.diag(sd))
    return tuple(out)


def _term_sd(params: Mapping, spec: BayesSpec, k: int):
    name = spec.names[k]
    if spec.fixed_sd[k] is not None:
        sd = jnp.asarray(spec.fixed_sd[k])
        if spec.shared_scale:
            sd = sd * params["sd_shared"]
        return sd
    return params[f"sd_{name}"]


def effects_from_params(params: Mapping, cov_factors: tuple, spec: BayesSpec) -> tuple:
    """Sampled classes' effects ``b_l = z_l C_l'`` (None for marginalised terms)."""
    out = []
    for k, name in enumerate(spec.names):
        if spec.marginal[k]:
            out.append(None)
        else:
            out.append(params[f"z_{name}"] @ cov_factors[k].T)
    return tuple(out)


@partial(jax.jit, static_argnames=("spec",))
def loglik_from_params(params: Mapping, data: KernelData, spec: BayesSpec):
    """The (marginal) log-likelihood at constrained parameter values.

    Jitted on its own so that samplers which evaluate the model eagerly (NumPyro's
    vectorised initialisation) run one compiled kernel instead of dispatching
    hundreds of small operations one by one.
    """
    factors = cov_factors_from_params(params, spec)
    effects = effects_from_params(params, factors, spec)
    scale = params["sd_shared"] if spec.shared_scale else 1.0
    if spec.sigma_model is not None:
        return marginal_loglik(
            params["beta"], None, factors, effects, data, spec.marginal,
            log_sigma=log_sigma_from_params(params, data, spec),
        )  # fmt: skip
    return marginal_loglik(
        params["beta"], params["sigma"], factors, effects, data, spec.marginal,
        fast=spec.fast, scale=scale,
    )  # fmt: skip


def lmm_model(data: KernelData, spec: BayesSpec) -> None:
    """The NumPyro model: priors as sample sites, the likelihood as a factor.

    Parameters
    ----------
    data : KernelData
        Data pytree (passed as a model argument, never closed over).
    spec : BayesSpec
        Static description (bind it with :func:`functools.partial`).
    """
    pri = spec.priors
    dtype = data.y.dtype
    prior_beta = to_distribution(pri.beta, dtype).to_event(1)
    if spec.intercept < 0:
        params = {"beta": numpyro.sample("beta", prior_beta)}
    else:  # centred coordinates, the prior on the user's scale (the Jacobian is 1)
        flat = dist.ImproperUniform(dist.constraints.real_vector, (), (spec.p,))
        beta = user_beta(numpyro.sample("beta", flat), data.x_shift, spec.intercept)
        numpyro.factor("beta_prior", prior_beta.log_prob(beta))
        params = {"beta": beta}
    if spec.sigma_model is None:
        params["sigma"] = numpyro.sample("sigma", to_distribution(pri.sigma, dtype, scalar=True))
    else:
        params.update(_sigma_sites(spec.sigma_model, dtype))
    if spec.shared_scale:
        params["sd_shared"] = numpyro.sample(
            "sd_shared", to_distribution(pri.sd[0], dtype, scalar=True)
        )
    for k, name in enumerate(spec.names):
        if spec.fixed_sd[k] is None:
            params[f"sd_{name}"] = numpyro.sample(
                f"sd_{name}", to_distribution(pri.sd[k], dtype).to_event(1)
            )
        if spec.correlated[k]:
            eta = np.asarray(pri.corr[k].scale)[0]
            params[f"L_{name}"] = numpyro.sample(f"L_{name}", lkj_cholesky(spec.d[k], eta, dtype))
        if not spec.marginal[k]:
            shape = (spec.nlevels[k], spec.d[k])
            params[f"z_{name}"] = numpyro.sample(
                f"z_{name}", dist.Normal(jnp.zeros(shape, dtype), 1.0).to_event(2)
            )
    numpyro.factor("loglik", loglik_from_params(params, data, spec))


def _sigma_sites(sub: SigmaSpec, dtype) -> dict:
    """Sample sites of the sigma formula: coefficients, SDs, correlations, effects."""
    pri = sub.priors
    out = {"beta_sigma": numpyro.sample("beta_sigma", to_distribution(pri.beta, dtype).to_event(1))}
    for k, name in enumerate(sub.names):
        site = f"sigma_{name}"
        sd_prior = to_distribution(pri.sd[k], dtype).to_event(1)
        out[f"sd_{site}"] = numpyro.sample(f"sd_{site}", sd_prior)
        if sub.correlated[k]:
            eta = np.asarray(pri.corr[k].scale)[0]
            out[f"L_{site}"] = numpyro.sample(f"L_{site}", lkj_cholesky(sub.d[k], eta, dtype))
        shape = (sub.nlevels[k], sub.d[k])
        out[f"z_{site}"] = numpyro.sample(
            f"z_{site}", dist.Normal(jnp.zeros(shape, dtype), 1.0).to_event(2)
        )
    return out


@dataclass(frozen=True, eq=False)
class BayesModel:
    """A Bayesian LMM ready to sample: design, static spec and data pytree.

    Build with :func:`build_bayes_model`.

    Attributes
    ----------
    model : lmmjax.design.Model
    spec : BayesSpec
    data : KernelData
    term_names : tuple of str
        lme4-style unique term names (``Subject``, ``Subject.1``).
    auto : AutoChoice or None
        How ``marginalize: auto`` chose ``spec.marginal`` (None when it was given).
    moments : RowMoments or None
        For a model streamed from Parquet (``data`` then holds no rows): the sums
        over rows that the starting point and the mass-matrix guess read.
    """

    model: object
    spec: BayesSpec
    data: KernelData
    term_names: tuple[str, ...]
    auto: AutoChoice | None = None
    moments: RowMoments | None = None

    @property
    def numpyro_model(self):
        """The NumPyro model with the static spec bound: ``model(data)``."""
        return partial(lmm_model, spec=self.spec)

    def potential(self, params: Mapping, data: KernelData | None = None) -> jax.Array:
        """HMC potential (negative log joint density) at unconstrained ``params``."""
        data = self.data if data is None else data
        return potential_energy(self.numpyro_model, (data,), {}, params)

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the unconstrained parameters, by site name."""
        s = self.spec
        out = {"beta": (s.p,)}
        if s.sigma_model is None:
            out["sigma"] = ()
        else:
            sub = s.sigma_model
            out["beta_sigma"] = (sub.p,)
            for name, d, m, corr in zip(sub.names, sub.d, sub.nlevels, sub.correlated,
                                        strict=True):  # fmt: skip
                out[f"sd_sigma_{name}"] = (d,)
                if corr:
                    out[f"L_sigma_{name}"] = (d * (d - 1) // 2,)
                out[f"z_sigma_{name}"] = (m, d)
        if s.shared_scale:
            out["sd_shared"] = ()
        for k, name in enumerate(s.names):
            if s.fixed_sd[k] is None:
                out[f"sd_{name}"] = (s.d[k],)
            if s.correlated[k]:
                out[f"L_{name}"] = (s.d[k] * (s.d[k] - 1) // 2,)
            if not s.marginal[k]:
                out[f"z_{name}"] = (s.nlevels[k], s.d[k])
        return out

    def inverse_mass_guess(self) -> dict:
        """A diagonal first guess of the posterior variances of the unconstrained sites.

        NUTS starts its warm-up from this inverse mass matrix instead of the
        identity, whose badly scaled first windows forced tiny steps: on
        sleepstudy (``all``, 4 chains x 1,000 warm-up) the first 100 warm-up
        iterations took 36,040 gradients with the identity and 3,484 with the
        guess; on dillonE1 the whole warm-up went from 26,131 to 14,996
        vectorised steps. The guess: least-squares variances ``s^2 / sum_i
        (x_ik - m_k)^2`` of the fixed effects in the sampler's coordinates
        (``m_k`` the column's mean when it is centred, else 0; ``s^2`` the
        least-squares residual variance), ``1 / (2 N)`` for ``log sigma``,
        ``1 / (2 M_l)`` for a term's log-SDs (the smallest ``M_l`` for
        ``sd_shared``), ``1 / M_l`` for its correlation's coordinates, and 1
        for the standardised effects and the sigma formula's sites.
        """
        s = self.spec
        _, ms, _, var_y = self._least_squares()
        s2 = max(ms, 1e-12 * var_y + 1e-300)
        shift = np.zeros(s.p) if s.intercept < 0 else np.asarray(self.data.x_shift)
        if self.moments is None:
            X = np.asarray(self.data.X)
            squares, nobs = np.sum((X - shift) ** 2, axis=0), X.shape[0]
        else:
            squares, nobs = self.moments.centred_squares(shift), self.moments.n
        out = {}
        for site, shape in self.site_shapes().items():
            if site == "beta":
                v = s2 / np.maximum(squares, 1e-300)
            elif site == "sigma":
                v = 1.0 / (2.0 * nobs)
            elif site == "sd_shared":
                v = 1.0 / (2.0 * min(s.nlevels))
            elif site.startswith("sd_") and site[3:] in s.names:
                v = 1.0 / (2.0 * s.nlevels[s.names.index(site[3:])])
            elif site.startswith("L_") and site[2:] in s.names:
                v = 1.0 / s.nlevels[s.names.index(site[2:])]
            else:
                v = 1.0
            out[site] = np.full(shape, v, self.data.y.dtype)
        return out

    def _least_squares(self) -> tuple[np.ndarray, float, float, float]:
        """Least-squares fixed effects, mean squared residual, residual SD and ``var(y)``.

        From the rows, or from the sums over rows of a streamed model.
        """
        if self.moments is not None:
            beta, ms, sd = self.moments.least_squares()
            _, sd_y, *_ = self.moments.means_and_sds()
            return beta, ms, sd, sd_y**2
        y, X = np.asarray(self.data.y), np.asarray(self.data.X)
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        resid = y - X @ beta
        return beta, float(np.mean(resid**2)), float(np.std(resid)), float(np.var(y))

    def init_params(self, key: jax.Array, num_chains: int) -> dict:
        """Over-dispersed unconstrained starting points, one per chain.

        Fixed effects start at least squares plus a jitter of a tenth of their
        prior scale; log-scales at half their prior scale plus U(-1, 1); the
        correlation and standardised effects at U(-1, 1) (U(-0.5, 0.5) for
        correlations).
        """
        s, pri = self.spec, self.spec.priors
        beta0, _, resid_sd, _ = self._least_squares()
        resid_sd = resid_sd or 1.0
        dtype = self.data.y.dtype
        shapes = self.site_shapes()
        # NumPy draws, seeded by the key: no small JAX program to compile per site shape
        rng = np.random.default_rng(np.asarray(_key_bits(key)).ravel().tolist())
        out = {}
        for site, shape in shapes.items():
            u = rng.uniform(-1.0, 1.0, (num_chains, *shape))
            if site == "beta":
                val = beta0 + 0.1 * np.asarray(pri.beta.scale) * u
                if s.intercept >= 0:
                    val = centred_beta(val, np.asarray(self.data.x_shift), s.intercept)
            elif site == "sigma":
                val = np.log(0.5 * resid_sd) + u
            elif site == "beta_sigma":
                Xs = np.asarray(self.data.sigma_X)
                val = np.linalg.lstsq(Xs, np.full(len(Xs), np.log(0.5 * resid_sd)), rcond=None)[0]
                val = val + 0.1 * u
            elif site.startswith("sd_sigma_"):
                k = s.sigma_model.names.index(site[len("sd_sigma_") :])
                val = np.log(0.5 * np.asarray(s.sigma_model.priors.sd[k].scale)) + u
            elif site.startswith("sd_"):
                scale = np.asarray(pri.sd[0].scale[:1] if site == "sd_shared" else
                                   pri.sd[s.names.index(site[3:])].scale)  # fmt: skip
                val = np.log(0.5 * scale) + u
            elif site.startswith("L_"):
                val = 0.5 * u
            else:
                val = u
            out[site] = np.asarray(val, dtype=dtype)
        return out


def _key_bits(key):
    """The integers of a JAX random key (typed or raw uint32)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _resolve_marginal(marginalize, terms, names) -> tuple[bool, ...]:
    if marginalize is None or (isinstance(marginalize, str) and marginalize == "none"):
        return (False,) * len(terms)
    if isinstance(marginalize, str) and marginalize == "all":
        return (True,) * len(terms)
    if isinstance(marginalize, str):
        marginalize = [marginalize]
    wanted = list(marginalize)
    groups = {t.group for t in terms}
    for g in wanted:
        if g not in groups and g not in names:
            raise LmmInputError(
                f"marginalize: {g!r} is not a grouping factor of the model; "
                f"choose from {', '.join(sorted(groups))} (or 'none' / 'all')"
            )
    return tuple(t.group in wanted or n in wanted for t, n in zip(terms, names, strict=True))


def _resolve_fixed(fixed_scales, terms, names) -> tuple:
    fixed_scales = dict(fixed_scales or {})
    groups = {t.group for t in terms}
    for g, v in fixed_scales.items():
        if g not in groups and g not in names:
            raise LmmInputError(
                f"fixed_scales: {g!r} is not a grouping factor of the model; "
                f"choose from {', '.join(sorted(groups))}"
            )
        if not np.all(np.asarray(v, dtype=float) > 0):
            raise LmmInputError(f"fixed_scales: the scale of {g!r} must be > 0, got {v}")
    out = []
    for t, n in zip(terms, names, strict=True):
        v = fixed_scales.get(n, fixed_scales.get(t.group))
        if v is None:
            out.append(None)
        else:
            arr = np.atleast_1d(np.asarray(v, dtype=float))
            if arr.size == 1:
                arr = np.repeat(arr, t.d)
            if arr.size != t.d:
                wanted = "1 value" if t.d == 1 else f"1 or {t.d} values"
                raise LmmInputError(f"fixed_scales: {n!r} needs {wanted}, got {arr.size}")
            out.append(tuple(float(a) for a in arr))
    return tuple(out)


_MAX_DENSE_B = 5e7  # numbers in the dense B = Z_rest' W Z_1 of a row-weighted structure


def _sigma_submodel(model, sigma: str | None):
    """The model's built sigma formula (``Model.submodels["sigma"]``), checked against ``sigma``."""
    built = getattr(model, "submodels", {}).get("sigma")
    if sigma is None:
        return None
    if built is None or built.formula != sigma:
        raise LmmInputError(
            f"nuts option sigma={sigma!r} needs the model built with it: "
            f"build_model(..., submodels={{'sigma': {sigma!r}}}) (lmmjax.lmm does this)"
        )
    return built


def _sigma_spec(y, sub, overrides) -> SigmaSpec:
    terms = list(sub.terms)
    names = unique_group_names(terms)
    defaults = default_sigma_priors(y, sub.X, terms)
    pri = resolve_priors(defaults, overrides, sub.fixef_names, names, [t.group for t in terms],
                         prefix=SIGMA_PREFIX, term_effects=[t.names for t in terms])  # fmt: skip
    return SigmaSpec(
        p=sub.X.shape[1], names=tuple(safe_name(n) for n in names),
        d=tuple(t.d for t in terms), nlevels=tuple(t.nlevels for t in terms),
        correlated=tuple(t.d > 1 for t in terms), priors=pri,
    )  # fmt: skip


class _Resolved(NamedTuple):
    spec: BayesSpec
    y: np.ndarray  # response on the modelling scale
    log_jac: float
    sub: object  # the sigma formula's Submodel, or None
    names: tuple[str, ...]
    auto: AutoChoice | None = None  # the outcome of marginalize: auto
    moments: RowMoments | None = None  # a streamed model's sums over rows


def _intercept_column(model, center: bool) -> int:
    """The column of a constant-one intercept to centre around, or -1 (none, or not asked)."""
    X = np.asarray(model.X)
    if not center or X.shape[1] < 2 or "(Intercept)" not in model.fixef_names:
        return -1
    k = list(model.fixef_names).index("(Intercept)")
    return k if np.all(X[:, k] == 1.0) else -1


def _resolve(model, *, marginalize, likelihood, priors, fixed_scales, shared_scale, fast_path,
             sigma, center=False, overhead=0.0) -> _Resolved:  # fmt: skip
    """Every option checked against the model and turned into a static spec.

    The only array work is ``marginalize: auto``'s rule, O(N d^2) in NumPy.
    """
    model.require_full_rank("nuts")
    terms = list(model.terms)
    if not terms:
        raise LmmInputError("the Bayesian LMM needs at least one random-effect term")
    if likelihood not in ("normal", "lognormal"):
        raise LmmInputError(f"likelihood must be 'normal' or 'lognormal', got {likelihood!r}")
    names = unique_group_names(terms)
    safe = tuple(safe_name(n) for n in names)
    if len(set(safe)) != len(safe):
        raise LmmInputError(f"term names {names} are not distinct once made safe: {safe}")
    moments = row_moments(model)
    if moments is not None:
        marginalize = _streamed_marginal(marginalize, likelihood, sigma, terms, names)
    y = np.asarray(model.y, dtype=float)
    log_jac = 0.0
    if likelihood == "lognormal":
        if np.any(y <= 0):
            raise LmmInputError(
                f"the lognormal likelihood needs a strictly positive response: "
                f"{model.response!r} is <= 0 in {int(np.sum(y <= 0))} of {y.size} rows "
                f"(smallest {np.min(y):g})"
            )
        log_jac = -float(np.sum(np.log(y)))
        y = np.log(y)
    fixed = _resolve_fixed(fixed_scales, terms, names)
    correlated = tuple(t.d > 1 for t in terms)
    if shared_scale:
        if any(correlated):
            raise LmmInputError("shared_scale needs uncorrelated terms (d = 1 or '||')")
        fixed = tuple(
            f if f is not None else (1.0,) * t.d for f, t in zip(fixed, terms, strict=True)
        )
    sub = _sigma_submodel(model, sigma)
    if sub is not None and fast_path:
        raise LmmInputError("the eigendecomposition fast path needs a constant sigma")

    def fast_eligible(marg) -> bool:
        return (
            all(marg) and all(f is not None for f in fixed) and not any(correlated)
            and sub is None
        )  # fmt: skip

    auto = None
    if isinstance(marginalize, str) and marginalize == "auto":
        auto = choose_marginal(
            y, model.X, terms, names, fixed_sd=None if shared_scale else fixed,
            fast_eligible=lambda m: fast_path is not False and fast_eligible(m),
            row_sigma=sub is not None, max_dense_b=_MAX_DENSE_B, overhead=overhead,
        )  # fmt: skip
        marginal = auto.marginal
    else:
        marginal = _resolve_marginal(marginalize, terms, names)
    eligible = fast_eligible(marginal)
    if fast_path and not eligible:
        raise LmmInputError(
            "the eigendecomposition fast path needs every class marginalised and every "
            "random-effect SD fixed (or shared) without correlations"
        )
    fast = eligible if fast_path is None else bool(fast_path)

    overrides, sigma_overrides = split_sigma_overrides(priors, sub is not None)
    if moments is None:
        defaults = default_priors(y, model.X, terms)
    else:
        defaults = priors_from_moments(*moments.means_and_sds())
    pri = resolve_priors(defaults, overrides, model.fixef_names, names, [t.group for t in terms],
                         term_effects=[t.names for t in terms])  # fmt: skip
    sigma_spec = None
    if sub is not None:
        sigma_spec = _sigma_spec(y, sub, sigma_overrides)
    marg_terms = [t for t, m in zip(terms, marginal, strict=True) if m]
    if sub is not None and len(marg_terms) > 1:  # per-row weights need B dense (scale_rows)
        q_rest = sum(t.q for t in marg_terms[1:])
        if q_rest * marg_terms[0].q > _MAX_DENSE_B:
            groups = ", ".join(t.group for t in marg_terms)
            raise LmmInputError(
                f"marginalize: with a sigma formula, the classes {groups} need a dense "
                f"{q_rest} x {marg_terms[0].q} cross block; marginalise fewer"
            )
    spec = BayesSpec(
        likelihood=likelihood, p=model.X.shape[1], names=safe, d=tuple(t.d for t in terms),
        nlevels=tuple(t.nlevels for t in terms), correlated=correlated, marginal=marginal,
        fixed_sd=fixed, shared_scale=bool(shared_scale), fast=fast, priors=pri,
        sigma_model=sigma_spec, intercept=_intercept_column(model, center),
    )  # fmt: skip
    return _Resolved(spec, y, log_jac, sub, tuple(names), auto, moments)


def _streamed_marginal(marginalize, likelihood, sigma, terms, names):
    """``marginalize`` for a model streamed from Parquet: every class, or an input error.

    Only the marginal likelihood with every class integrated out reads no rows
    (:func:`lmmjax.options.check_streamed_nuts`); ``auto`` therefore means ``all``.
    """
    if isinstance(marginalize, str) and marginalize in ("auto", "all", "none"):
        marginalize = "all" if marginalize == "auto" else marginalize
    else:
        _resolve_marginal(marginalize, terms, names)  # an unknown factor is named first
        marginalize = [marginalize] if isinstance(marginalize, str) else list(marginalize)
    check_streamed_nuts(marginalize, likelihood, sigma, None, [t.group for t in terms])
    return marginalize


def _column_means(model, spec: BayesSpec, moments: RowMoments | None) -> np.ndarray:
    """The means of ``X``'s columns, zero at the intercept (``KernelData.x_shift``)."""
    if moments is None:
        shift = np.asarray(model.X, dtype=float).mean(axis=0)
    else:
        shift = moments.xsum / moments.n
    shift[spec.intercept] = 0.0
    return shift


def check_options(model, options) -> BayesSpec:
    """Resolve the NUTS options against ``model`` as a fit would, without building or sampling.

    The CLI's ``--check`` runs it, so that an unknown prior, distribution or
    ``marginalize`` factor fails there exactly as the fit would.
    """
    return _resolve(
        model, marginalize=options.marginalize, likelihood=options.likelihood,
        priors=options.priors, fixed_scales=options.fixed_scales,
        shared_scale=options.shared_scale, fast_path=options.fast_path, sigma=options.sigma,
        center=options.center, overhead=run_overhead(options),
    ).spec  # fmt: skip


def run_overhead(options=None) -> float:
    """``marginalize: auto``'s fixed seconds per gradient for a run of ``options``' size.

    Without options, a run of the defaults (:class:`~lmmjax.options.NutsOptions`).
    """
    options = NutsOptions() if options is None else options
    return fixed_overhead(options.num_chains, options.num_warmup, options.num_samples)


def build_bayes_model(
    model,
    *,
    marginalize: str | Sequence[str] = "all",
    likelihood: str = "normal",
    priors: Mapping | None = None,
    fixed_scales: Mapping | None = None,
    shared_scale: bool = False,
    fast_path: bool | None = None,
    sigma: str | None = None,
    center: bool = False,
    overhead: float | None = None,
) -> BayesModel:
    """Build the Bayesian version of a structured model.

    Parameters
    ----------
    model : lmmjax.design.Model
        From :func:`lmmjax.design.build_model`.
    marginalize : "auto", "none", "all" or sequence of str
        Grouping factors whose random effects are integrated out of the potential;
        "auto" chooses by the rule of :mod:`lmmjax.bayes.auto` (the builder's
        default stays "all"; :func:`~lmmjax.bayes.fit_nuts` defaults to "auto").
    likelihood : {"normal", "lognormal"}
        LogNormal models ``log y`` as Normal and adds the Jacobian ``-sum(log y)``.
    priors : mapping, optional
        Per-parameter overrides (see :mod:`lmmjax.bayes.priors`).
    fixed_scales : mapping of str to float, optional
        Random-effect SDs held at constants, by grouping factor.
    shared_scale : bool
        Every random-effect SD is one sampled scale ``sd_shared`` times its entry of
        ``fixed_scales`` (1 where not given); needs uncorrelated terms.
    fast_path : bool, optional
        Use the eigendecomposition fast path; by default whenever it applies
        (every class marginalised, every covariance a constant times one scale).
    sigma : str, optional
        The formula of ``log sigma`` (brms' ``sigma ~ c + (c | subj)``); the
        model must have been built with it (``build_model(..., submodels=
        {"sigma": formula})``, as :func:`lmmjax.lmm` does). The marginalised
        classes then need the row-weighted Grams ``Z' W Z`` per evaluation
        (:func:`lmmjax.linalg.scale_rows`), still O(N) each.
    center : bool
        Sample the fixed effects in the coordinates of centred predictors when
        the model has an intercept (see the module docstring).
    overhead : float, optional
        For "auto": the run's fixed seconds per gradient, :func:`run_overhead`
        of the NUTS options (:func:`~lmmjax.bayes.fit_nuts` passes it); by
        default that of a run of the default options, so that the choice is
        the one ``lmmjax.lmm(..., method="nuts")`` makes. 0 ranks the
        candidates by the cost of their gradients alone.

    Returns
    -------
    BayesModel
    """
    spec, y, log_jac, sub, names, auto, moments = _resolve(
        model, marginalize=marginalize, likelihood=likelihood, priors=priors,
        fixed_scales=fixed_scales, shared_scale=shared_scale, fast_path=fast_path, sigma=sigma,
        center=center, overhead=run_overhead() if overhead is None else overhead,
    )  # fmt: skip
    terms, marginal, fixed, fast = list(model.terms), spec.marginal, spec.fixed_sd, spec.fast
    dtype = float_dtype()
    struct = xp = eig = None
    marg_terms = [t for t, m in zip(terms, marginal, strict=True) if m]
    if moments is not None:  # streamed: every class marginalised, the sums precomputed
        struct, xp = model.sufficient
    elif any(marginal):
        # per-row weights need B dense (scale_rows); "auto" otherwise
        schur = "dense" if sub is not None and len(marg_terms) > 1 else "auto"
        struct = build_structure(marg_terms, dtype=dtype, schur=schur)
    if all(marginal) and sub is None and moments is None:  # the residual is y - X beta
        xp = cross_products(struct, np.column_stack([model.X, y]))
    if fast:
        eig = eigen_precompute(struct, [np.diag(f) for f in fixed], xp)
    cols, cmap = column_map(model.X, [t.z for t in terms])
    data = KernelData(
        y=jnp.asarray(y, dtype),
        X=jnp.asarray(model.X, dtype),
        log_jac=jnp.asarray(log_jac, dtype),
        struct=struct,
        xp=xp,
        refs=tuple(jnp.asarray(t.refs, jnp.int32) for t in terms),
        z=tuple(jnp.asarray(t.z, dtype) for t in terms),
        eig=eig,
        sigma_X=None if sub is None else jnp.asarray(sub.X, dtype),
        sigma_refs=() if sub is None else tuple(jnp.asarray(t.refs, jnp.int32) for t in sub.terms),
        sigma_z=() if sub is None else tuple(jnp.asarray(t.z, dtype) for t in sub.terms),
        cols=jnp.asarray(cols, dtype),
        cmap=cmap,
        x_shift=None if spec.intercept < 0 else jnp.asarray(
            _column_means(model, spec, moments), dtype),
    )  # fmt: skip
    return BayesModel(model=model, spec=spec, data=data, term_names=names, auto=auto,
                      moments=moments)  # fmt: skip

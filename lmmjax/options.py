"""Each method's options, listed once, as the pydantic models behind the API and the config.

The YAML config's method sections (``reml:``, ``nuts:``, ``map:``) and the keyword
arguments of :func:`lmmjax.lmm`, :func:`lmmjax.reml.fit_reml` and
:func:`lmmjax.bayes.fit_nuts` are validated by the same model, so the API
rejects exactly what the config rejects, with one line naming the option.
Function signatures are derived from the models (:func:`takes_options`).

This module is light on purpose (pydantic only): checking a config does not
import the numerical packages.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from lmmjax.errors import LmmInputError

__all__ = [
    "MapOptions",
    "NutsOptions",
    "Options",
    "RemlOptions",
    "SparseOptions",
    "check_streamed_nuts",
    "ddf_name",
    "format_validation_error",
    "takes_options",
]


def _format_loc(loc: tuple[Any, ...]) -> str:
    """Write a pydantic error location as a dotted key path (``nuts.priors.beta``)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _format_error(error: dict[str, Any], what: str, prefix: str) -> str:
    """Turn one pydantic error into ``<what> '<path>': <message>``."""
    where = prefix + _format_loc(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        message = "unknown key (extra inputs are not permitted)"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        value = error.get("input")
        if isinstance(value, (str, int, float, bool)) or value is None:
            shown = repr(value)
            message += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return f"{what} '{where}': {message}"


def format_validation_error(
    exc: ValidationError, source: Any = None, *, what: str = "config key", prefix: str = ""
) -> str:
    """Summarise a pydantic ValidationError on one line.

    Parameters
    ----------
    exc : pydantic.ValidationError
    source : str or path-like, optional
        Config file the mapping came from, appended to the message.
    what : str
        What the keys are called (``"config key"``, ``"option"``).
    prefix : str
        Prepended to every key path.

    Returns
    -------
    str
        ``<what> '<path>': <message>``, several joined by ``"; "``.
    """
    message = "; ".join(dict.fromkeys(_format_error(e, what, prefix) for e in exc.errors()))
    if source is not None:
        message += f" (in {source})"
    return " ".join(message.split())


class Options(BaseModel):
    """Base of the method option models: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def submodels(self) -> dict[str, str]:
        """Linear predictors of other parameters the model needs built (``{"sigma": rhs}``)."""
        return {}

    def drop_aliased(self) -> bool:
        """Whether the model is built without fixed-effect columns aliased by earlier ones."""
        return True

    @classmethod
    def from_call(cls, options: Options | Mapping | None, overrides: Mapping) -> Options:
        """Validate ``options`` (a model or mapping) updated with keyword ``overrides``.

        Raises
        ------
        LmmInputError
            Naming the first offending option.
        """
        if options is None:
            base: dict = {}
        elif isinstance(options, cls):
            base = options.model_dump(exclude_unset=True)
        elif isinstance(options, Mapping):
            base = dict(options)
        else:
            raise LmmInputError(
                f"options must be a {cls.__name__} or a mapping, got {type(options).__name__}"
            )
        try:
            return cls.model_validate({**base, **overrides})
        except ValidationError as exc:
            message = format_validation_error(exc, what="option")
            if any(e.get("type") == "extra_forbidden" for e in exc.errors()):
                message += f"; the options are {', '.join(cls.model_fields)}"
            raise LmmInputError(message) from None


def takes_options(options_cls: type[Options], extra: Mapping[str, Any] = {}) -> Callable:  # noqa: B006
    """Give ``fn(model, options=None, **kwargs)`` a signature derived from ``options_cls``.

    ``help()`` and IDEs then show every option with its default; the keywords
    are validated by ``options_cls`` inside ``fn``. ``extra`` adds keyword
    parameters that are not options (name -> default).
    """

    def wrap(fn: Callable) -> Callable:
        P = inspect.Parameter
        params = [
            P("model", P.POSITIONAL_ONLY),
            P("options", P.POSITIONAL_OR_KEYWORD, default=None, annotation=options_cls),
        ]
        params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in extra.items()]
        params += [
            P(name, P.KEYWORD_ONLY, default=f.get_default(call_default_factory=True),
              annotation=f.annotation)
            for name, f in options_cls.model_fields.items()
        ]  # fmt: skip
        fn.__signature__ = inspect.Signature(params)
        return fn

    return wrap


class RemlOptions(Options):
    """Options of the profiled REML / ML optimiser (``reml:`` section).

    The same section serves ``method: reml`` and ``method: ml``.

    Attributes
    ----------
    maxiter : int
        Maximum number of L-BFGS iterations (> 0).
    gtol : float
        Convergence tolerance on the projected gradient norm (> 0).
    fallback : bool
        Retry with a derivative-free optimiser if L-BFGS fails.
    snap_tol : float
        Variance parameters closer than this to the boundary are snapped
        to it (a singular fit).
    ddf : {"Satterthwaite", "Kenward-Roger", "none"}
        Degrees of freedom of the fixed effects' t-tests in the summary and
        the JSON result: Satterthwaite's, as lmerTest (default);
        Kenward-Roger's, as lmerTest's ``ddf = "Kenward-Roger"`` (pbkrtest's
        adjusted standard errors; REML only); or none (lme4's plain t values,
        and one compiled program less). Any case; ``KR`` is Kenward-Roger.
    """

    maxiter: int = Field(500, gt=0, strict=True)
    gtol: float = Field(1e-6, gt=0)
    fallback: StrictBool = True
    snap_tol: float = Field(1e-5, ge=0)
    ddf: Literal["Satterthwaite", "Kenward-Roger", "none"] = "Satterthwaite"

    @field_validator("ddf", mode="before")
    @classmethod
    def _ddf_spelling(cls, value):
        return ddf_name(value, strict=False)


_DDF = {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger",
        "kr": "Kenward-Roger", "none": "none"}  # fmt: skip


def ddf_name(value, *, strict: bool = True) -> str:
    """The canonical spelling of a ``ddf`` option (``"kr"`` -> ``"Kenward-Roger"``).

    Raises
    ------
    LmmInputError
        For an unknown name when ``strict`` (otherwise it is returned as given,
        for pydantic to refuse).
    """
    name = _DDF.get(value.strip().lower()) if isinstance(value, str) else None
    if name is None and strict:
        raise LmmInputError(
            f"ddf must be 'Satterthwaite', 'Kenward-Roger' or 'none', got {value!r}"
        )
    return value if name is None else name


class NutsOptions(Options):
    """Options of the Bayesian NUTS sampler (``nuts:`` section).

    Attributes
    ----------
    backend : {"numpyro", "blackjax"}
        Sampler implementation.
    marginalize : "auto", "none", "all" or list of str
        Random-effect classes integrated out of the potential: none, all, the
        grouping factors named in the list, or (default) "auto": the set with
        the lowest predicted seconds per effective draw, from a cost model of
        one gradient and each class's funnel depth measured on the data (the
        rule is in :mod:`lmmjax.bayes.auto`; the choice is in the summary's
        header and the JSON's ``marginalize`` and ``marginalize_auto``).
    num_warmup, num_samples, num_chains : int
        Warm-up draws, kept draws per chain, and number of chains.
    chain_method : {"auto", "parallel", "vectorized", "sharded"}
        How the chains run. "parallel": each chain is its own program, as many
        at once as there are CPU cores (threads); "vectorized": all chains in
        one vectorised program; "sharded": vectorised and placed along a mesh
        of all local devices with ``jax.sharding`` (the number of chains a
        multiple of the device count). "auto" (default) is "parallel" on a CPU
        and "vectorized" on an accelerator. Each chain draws the same numbers
        whichever the method, up to rounding.
    target_accept : float
        Target acceptance probability of step-size adaptation (0 < x < 1).
    max_tree_depth : int
        Maximum NUTS tree depth.
    dense_mass : bool
        Adapt a dense (rather than diagonal) mass matrix.
    seed : int
        Random seed.
    likelihood : {"normal", "lognormal"}
        Observation model.
    center : bool
        With an intercept, sample the fixed effects in the coordinates of
        centred predictors, as brms and bambi do (the intercept at the
        predictors' means); the output and the priors stay on the user's scale
        (unlike brms, the intercept's prior is on the uncentred intercept). Off
        by default: it decorrelates the intercept when the residual dominates
        the fixed effects' posterior (Orthodont: intercept ESS 1,894 -> 3,501),
        but a random slope of the centred column correlates them instead
        (sleepstudy: min ESS 4,354 -> 2,670).
    priors : dict of str to dict or str
        Prior overrides by parameter name, or by brms class with Stan-style
        strings (``{"b": "normal(0, 10)"}``; see :mod:`lmmjax.bayes.priors`).
    fixed_scales : dict of str to float or list of float
        Random-effect SDs held fixed at the given values, by factor name.
    shared_scale : bool
        Every random-effect SD is one sampled scale ``sd_shared`` times its
        entry of ``fixed_scales`` (1 where not given); uncorrelated terms only.
    fast_path : bool, optional
        Force (true) or forbid (false) the eigendecomposition fast path; by
        default it is used whenever it applies.
    sigma : str, optional
        A linear predictor for the log of the residual SD, as brms writes it:
        ``"sigma ~ c + (c | subj)"`` (or ``"~ c + (c | subj)"``). Its random
        effects are always sampled; the mean's may still be marginalised.
    log_likelihood : bool, optional
        Add the pointwise log-likelihood (for ``az.loo`` / ``az.waic``) and
        posterior-predictive draws to the InferenceData, each draws x N numbers;
        by default when that is at most 2e7 per group (a skipped group is reported).
    netcdf : str, optional
        Path of an ArviZ netCDF file with the posterior draws.
    progress_bar : bool
        Show a progress bar while sampling.
    """

    backend: Literal["numpyro", "blackjax"] = "numpyro"
    marginalize: Literal["auto", "none", "all"] | list[str] = "auto"
    num_warmup: int = Field(1000, ge=0, strict=True)
    num_samples: int = Field(1000, gt=0, strict=True)
    num_chains: int = Field(4, gt=0, strict=True)
    chain_method: Literal["auto", "parallel", "vectorized", "sharded"] = "auto"
    target_accept: float = Field(0.8, gt=0, lt=1)
    max_tree_depth: int = Field(10, gt=0, strict=True)
    dense_mass: StrictBool = False
    seed: int = Field(0, strict=True)
    likelihood: Literal["normal", "lognormal"] = "normal"
    center: StrictBool = False
    priors: dict[str, dict | str] = Field(default_factory=dict)
    fixed_scales: dict[str, float | list[float]] = Field(default_factory=dict)
    shared_scale: StrictBool = False
    fast_path: StrictBool | None = None
    sigma: str | None = None
    log_likelihood: StrictBool | None = None
    netcdf: str | None = None
    progress_bar: StrictBool = True

    def submodels(self) -> dict[str, str]:
        return {"sigma": self.sigma} if self.sigma else {}

    def check_streamed(self, groups) -> None:
        """Raise :class:`LmmInputError` unless these options can sample streamed data.

        See :func:`check_streamed_nuts`; ``groups`` are the formula's grouping factors.
        """
        check_streamed_nuts(self.marginalize, self.likelihood, self.sigma, self.log_likelihood,
                            groups)  # fmt: skip

    @field_validator("marginalize", mode="before")
    @classmethod
    def _check_marginalize(cls, value: Any) -> Any:
        """Give one clear message instead of one per branch of the union."""
        if isinstance(value, str) and value in ("auto", "none", "all"):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError("must be 'auto', 'none', 'all' or a list of grouping-factor names")


def check_streamed_nuts(marginalize, likelihood, sigma, log_likelihood, groups) -> None:
    """Raise :class:`LmmInputError` unless NUTS can sample data streamed from Parquet.

    Streamed data hold no rows, only the sums over rows of the precompute, which
    the potential reads when every class is marginalised ("auto" then means
    "all"; a list must name every grouping factor) with a normal likelihood
    and one residual SD; the pointwise log-likelihood needs the rows.

    Parameters
    ----------
    marginalize, likelihood, sigma, log_likelihood
        The :class:`NutsOptions` of those names.
    groups : iterable of str
        The model's grouping factors (``Term.group``).
    """
    missing = sorted(set(groups) - set(marginalize)) if isinstance(marginalize, list) else []
    if marginalize == "none" or missing:
        raise LmmInputError(
            "option 'marginalize': streamed data (option 'stream') is sampled with every "
            f"class marginalised (marginalize: all), got {marginalize!r}"
        )
    if likelihood != "normal":
        raise LmmInputError(
            f"option 'likelihood': {likelihood!r} with streamed data (option 'stream') is not "
            "built; use 'normal' with the log of the response in the formula"
        )
    if sigma is not None:
        raise LmmInputError(
            "option 'sigma': a formula for sigma needs the rows in memory (option 'stream')"
        )
    if log_likelihood:
        raise LmmInputError(
            "option 'log_likelihood': the pointwise log-likelihood needs the rows, which "
            "streamed data (option 'stream') does not hold"
        )


def _is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_b(value: Any) -> Any:
    if value == "auto":
        return value
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError("must be a number in [0, 1) or 'auto'")
    return float(value)


def _check_a(value: Any) -> Any:
    if value == "auto":
        return value
    if _is_number(value):
        if not value > 0:
            raise ValueError("must be 'auto', a positive number (a I) or a list of them")
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(_is_number(v) and v > 0 for v in value):
        return [float(v) for v in value]
    raise ValueError("must be 'auto', a positive number (a I) or a list of them")


def _per_factor(mapping: Mapping, check: Callable) -> dict:
    """Check each value of a mapping by grouping-factor name, naming the factor on error."""
    out = {}
    for key, value in mapping.items():
        try:
            out[str(key)] = check(value)
        except ValueError as exc:
            raise ValueError(f"factor {str(key)!r}: {exc}, got {value!r}") from None
    return out


class MapOptions(Options):
    """Options of the EM / MAP fit with empirical Bayes (``map:`` section).

    Every hyperparameter is either fixed or ``"auto"``: chosen by maximising
    the Laplace approximation of the marginal likelihood (:mod:`lmmjax.em.hyper`).

    Attributes
    ----------
    lam : float or "auto"
        Ridge penalty ``lambda >= 0`` of the prior ``beta ~ N(0, sigma^2 / lambda I)``
        on the penalised fixed effects; 0 is a flat prior. Written ``lambda`` in
        the config and accepted as ``lam`` or ``lambda`` by the API.
    b : float, "auto" or dict of str to float or "auto"
        Shrinkage weight ``b in [0, 1)`` of each grouping factor's covariance
        towards its prior scale ``A`` (0: no shrinkage); one value for every
        factor or a mapping by grouping-factor name (unnamed factors: ``"auto"``).
    A : "auto", float, list of float or dict
        Prior scale ``A`` (the inverse-Wishart prior's ``Phi / (eta + d + 1)``):
        a positive number means ``a I``, a list the diagonal; or a mapping by
        grouping-factor name. ``"auto"`` (the default) is a diagonal chosen by
        empirical Bayes.
    penalize_intercept : bool
        Penalise the intercept too (default false: it has a flat prior).
    unpenalized : list of str
        Further fixed-effect columns with a flat prior.
    tol : float
        EM stops when the log posterior rises by less than ``tol`` times its size.
    maxiter : int
        Maximum number of EM iterations.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lam: Literal["auto"] | float = Field("auto", alias="lambda")
    b: Literal["auto"] | float | dict[str, Literal["auto"] | float] = "auto"
    A: Literal["auto"] | float | list[float] | dict[str, Literal["auto"] | float | list[float]] = (
        "auto"
    )
    penalize_intercept: StrictBool = False
    unpenalized: list[str] = Field(default_factory=list)
    tol: float = Field(1e-12, gt=0)
    maxiter: int = Field(20000, gt=0, strict=True)

    @field_validator("lam", mode="before")
    @classmethod
    def _check_lambda(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if not _is_number(value) or not value >= 0:
            raise ValueError("must be a number >= 0 or 'auto'")
        return float(value)

    @field_validator("b", mode="before")
    @classmethod
    def _check_b(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return _per_factor(value, _check_b)
        return _check_b(value)

    @field_validator("A", mode="before")
    @classmethod
    def _check_a(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return _per_factor(value, _check_a)
        return _check_a(value)


def _check_k(value: Any) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1]
    ):
        return [int(value[0]), int(value[1])]
    raise ValueError("must be an integer >= 1 or a range [kmin, kmax] with 1 <= kmin <= kmax")


class SparseOptions(Options):
    """Options of sparse fixed-effect selection (``sparse:`` section).

    The quasi-likelihood transform of Li, Cai & Li (2022) whitens each cluster
    by its working covariance ``a Z_i Z_i' + I``; a sparse regression on the
    whitened data selects the fixed effects (:mod:`lmmjax.sparse`).

    Attributes
    ----------
    selector : {"best_subset", "lasso"}
        Best subset of size ``k`` by splicing, or a lasso path (each support
        refitted by least squares).
    k : int, [kmin, kmax] or None
        Number of selected columns (the intercept is always kept and not
        counted), or a range within which ``criterion`` chooses it. The default
        is ``[1, min(10, number of candidate columns)]``. With the lasso it bounds
        the support sizes along the path that may be chosen (an integer ``k``
        means ``[1, k]``).
    a_grid : list of float or None
        Working variance ratios ``a > 0`` (``Psi`` is taken as ``a sigma^2 I``
        in units of the random-effect columns), chosen among by cluster-wise
        cross-validation. Default ``10^-2, 10^-1.5, ..., 10^2``.
    cv_folds : int
        Folds of the cluster-wise cross-validation (>= 2; at most the number of clusters).
    criterion : {"bic", "cv"}
        How ``k`` (or the lasso's lambda) is chosen: the extended BIC on the
        whole data (default; ``a`` is still chosen by cross-validation, with
        ``k`` chosen by the same criterion inside each fold), or the
        cross-validated loss over every pair (a, k).
    refit : bool
        Refit the selected columns by REML, for variance components and
        standard errors.
    stability : bool
        Cluster-wise stability: keep only columns that the cross-validation
        folds (each choosing by the criterion on its training clusters) select
        in at least half of the folds, taking the best candidate by the
        criterion whose columns all pass (default true; the folds are run
        whatever ``a_grid`` holds).
    seed : int
        Seed of the random assignment of clusters to folds.
    """

    selector: Literal["best_subset", "lasso"] = "best_subset"
    k: int | list[int] | None = None
    a_grid: list[float] | None = None
    cv_folds: int = Field(5, ge=2, strict=True)
    criterion: Literal["bic", "cv"] = "bic"
    refit: StrictBool = True
    stability: StrictBool = True
    seed: int = Field(0, strict=True)

    def drop_aliased(self) -> bool:
        return False

    @field_validator("k", mode="before")
    @classmethod
    def _check_k(cls, value: Any) -> Any:
        return _check_k(value)

    @field_validator("a_grid", mode="before")
    @classmethod
    def _check_a_grid(cls, value: Any) -> Any:
        if value is None:
            return value
        if (
            isinstance(value, (list, tuple))
            and value
            and all(_is_number(v) and 0 < v < float("inf") for v in value)
        ):
            return sorted({float(v) for v in value})
        raise ValueError("must be a non-empty list of positive numbers")

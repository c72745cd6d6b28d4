"""DataFrame + lme4 formula -> structured model (X, y and ReMat-style terms)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from lmmjax.errors import LmmInputError
from lmmjax.formula import (
    CONTRASTS,
    BarTerm,
    apply_contrasts,
    expand_dot,
    has_dot,
    model_matrix,
    parse_formula,
    quote_names,
    required_columns,
)
from lmmjax.formula.fixed import FixedTerm, formula_terms, rewrite_calls
from lmmjax.formula.fixed import fixed_terms as fixed_term_list
from lmmjax.terms import Term, unique_inverse

_OFFSET_CALL = re.compile(r"(?<![\w.])offset\(")


@dataclass(frozen=True, eq=False)
class Model:
    """A linear mixed model's data in structured form.

    Attributes
    ----------
    formula : str
        The formula as given.
    response : str
        Name of the response.
    y : numpy.ndarray
        float64[N].
    X : numpy.ndarray
        float64[N, p]; full column rank unless built with ``drop_aliased=False``.
    fixef_names : tuple of str
        lme4-style names of X's columns.
    terms : tuple of Term
        Random-effect terms, ordered by decreasing number of levels.
    data : pandas.DataFrame
        The rows used (missing values removed), with factors converted.
    n_dropped : int
        Rows removed because of missing values.
    dropped_fixef : tuple of str
        Fixed-effect columns dropped because X was rank deficient.
    response_variables : tuple of str
        Columns read by the response alone (``Reaction`` of ``log(Reaction)``):
        predictions on new data do not need them.
    """

    formula: str
    response: str
    y: np.ndarray
    X: np.ndarray
    fixef_names: tuple[str, ...]
    terms: tuple[Term, ...]
    data: pd.DataFrame = field(repr=False)
    fixed_spec: object = field(repr=False, default=None)
    """formulaic spec that rebuilds X's columns (before aliased ones are dropped)."""
    n_dropped: int = 0
    full_rank: bool = True
    """Whether X has full column rank (always, unless built with ``drop_aliased=False``)."""
    dropped_fixef: tuple[str, ...] = ()
    fixed_columns: tuple[int, ...] = ()
    factor_columns: tuple[str, ...] = ()
    fixed_variables: tuple[str, ...] = ()
    used_variables: tuple[str, ...] = ()
    response_variables: tuple[str, ...] = ()
    submodels: dict = field(default_factory=dict, repr=False)
    """Linear predictors of other parameters (``{"sigma": Submodel}``), on the same rows."""
    weights: np.ndarray | None = field(default=None, repr=False)
    """Prior weights (residual variance ``sigma^2 / w_i``), or None."""
    offset: np.ndarray | None = field(default=None, repr=False)
    """Known part of the linear predictor (coefficient 1), or None."""
    weights_column: str | None = None
    offset_terms: tuple[str, ...] = ()
    source: pd.DataFrame | None = field(default=None, repr=False)
    """The DataFrame the model was built from (not copied), for ``update``."""
    categorical: tuple[str, ...] = ()
    """The ``categorical`` argument of the build."""
    contrasts: tuple[tuple[str, str], ...] = ()
    """The ``contrasts`` argument of the build, as (column, coding) pairs."""
    offset_column: str | None = None
    """The ``offset`` argument of the build (formula ``offset()`` terms stay in the formula)."""
    rows: pd.Index | None = field(default=None, repr=False)
    """Index labels, in ``source``, of the rows used (missing values removed)."""

    def aligned(self, values, name: str) -> pd.Series:
        """Per-row values as a Series on the source's index, NaN on the rows removed."""
        if self.rows is None or self.source is None:
            return pd.Series(values, name=name)
        return pd.Series(values, index=self.rows, name=name).reindex(self.source.index)

    """The offset expressions (``offset(x)`` terms and the ``offset`` column), for new data."""

    def __repr__(self) -> str:
        return f"Model({self.formula!r}, nobs={self.nobs}, p={self.p}, q={self.q})"

    @property
    def nobs(self) -> int:
        """Number of observations N."""
        return self.y.shape[0]

    @property
    def p(self) -> int:
        """Number of fixed effects."""
        return self.X.shape[1]

    @property
    def q(self) -> int:
        """Total number of random effects."""
        return sum(t.q for t in self.terms)

    @property
    def ntheta(self) -> int:
        """Number of covariance parameters."""
        return sum(t.ntheta for t in self.terms)

    @property
    def ngroups(self) -> dict[str, int]:
        """Levels of each grouping factor, ``{factor: M}``."""
        return {t.group: t.nlevels for t in self.terms}

    def new_design(self, newdata, *, random: bool = True, allow_new_levels: bool = True):
        """This model's design on ``newdata`` (:func:`new_design`), for any method's predictions."""
        return new_design(self, newdata, random=random, allow_new_levels=allow_new_levels)

    def require_full_rank(self, method: str) -> None:
        """Raise :class:`LmmInputError` unless X has full column rank, which ``method`` needs."""
        if not self.full_rank:
            raise LmmInputError(
                f"method {method!r} needs a full-rank fixed-effect matrix, and this model's "
                f"{self.p} columns are linearly dependent; build it with drop_aliased=True"
            )

    def dims(self) -> dict:
        """Dimensions of the model as a plain dictionary."""
        return {
            "nobs": self.nobs,
            "p": self.p,
            "q": self.q,
            "ntheta": self.ntheta,
            "terms": [
                {
                    "group": t.group,
                    "names": list(t.names),
                    "levels": t.nlevels,
                    "d": t.d,
                    "ntheta": t.ntheta,
                }
                for t in self.terms
            ],
        }

    def describe(self) -> str:
        """A readable account of the model's structure."""
        lines = [
            f"Linear mixed model: {self.formula}",
            f"  observations N = {self.nobs}"
            + (f" ({self.n_dropped} rows with missing values removed)" if self.n_dropped else ""),
            f"  fixed effects p = {self.p}: {', '.join(self.fixef_names)}",
        ]
        if self.dropped_fixef:
            lines.append(f"  dropped (rank deficient): {', '.join(self.dropped_fixef)}")
        lines.append(f"  random effects q = {self.q}, covariance parameters = {self.ntheta}")
        lines.append(f"  {'group':<20} {'levels':>8} {'d':>3} {'ntheta':>7}  effects")
        for t in self.terms:
            lines.append(
                f"  {t.group:<20} {t.nlevels:>8} {t.d:>3} {t.ntheta:>7}  {', '.join(t.names)}"
            )
        return "\n".join(lines)


def _factor_codes(col: pd.Series, name: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and level labels of a column treated as a factor.

    Levels follow a categorical's own order, else sorted values (numeric
    sort for numbers, as R's ``factor()``); unused levels are dropped.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        cat = col.cat.remove_unused_categories()
    else:
        values = col.to_numpy()
        if col.dtype == object:
            values = col.astype(str).to_numpy()
        cat = pd.Categorical(values, categories=np.unique(values))
        cat = pd.Series(cat, index=col.index)
    codes = cat.cat.codes.to_numpy().astype(np.int64)
    labels = [_label(v) for v in cat.cat.categories]
    return codes, labels


def _label(value) -> str:
    """Level label of a value as R prints it (whole floats without ".0")."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def group_index(data: pd.DataFrame, factors: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Level index of each row for the interaction of ``factors``.

    Levels are the combinations present in the data, in lexicographic order of
    the factors' own levels, labelled ``"a:b"`` as lme4 does.
    """
    codes, labels = zip(*(_factor_codes(data[f], f) for f in factors), strict=True)
    sizes = [len(lab) for lab in labels]
    if np.prod(sizes, dtype=float) >= 2.0**62:  # the combined key would overflow
        combos, refs = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    else:
        key = np.zeros(len(data), np.int64)  # lexicographic: the first factor varies slowest
        for c, k in zip(codes, sizes, strict=True):
            key = key * k + c
        uniq, refs = unique_inverse(key)
        combos = np.stack(np.unravel_index(uniq, sizes), axis=1)
    names = tuple(":".join(labels[k][c] for k, c in enumerate(row)) for row in combos)
    return refs.reshape(-1).astype(np.int32), names


def _as_factors(data: pd.DataFrame, columns: set[str]) -> pd.DataFrame:
    """``columns`` as categoricals; every categorical without the levels it no longer has.

    Levels absent from the rows used are dropped, as lme4's ``model.frame``
    (``drop.unused.levels = TRUE``) drops them after removing missing values,
    so that the reference level of a pandas categorical is the first one used.
    """
    data = data.copy()
    for name in data.columns:
        if isinstance(data[name].dtype, pd.CategoricalDtype):
            data[name] = data[name].cat.remove_unused_categories()
        elif name in columns:
            codes, labels = _factor_codes(data[name], name)
            data[name] = pd.Categorical.from_codes(codes, categories=labels)
    return data


def _drop_missing(data: pd.DataFrame, used: list[str]) -> tuple[pd.DataFrame, int, pd.Index]:
    missing = data[used].isna()
    keep = ~missing.any(axis=1)
    n_dropped = int((~keep).sum())
    if n_dropped:
        per_col = ", ".join(f"{c} ({int(n)})" for c, n in missing.sum().items() if n)
        warnings.warn(
            f"removed {n_dropped} of {len(data)} rows with missing values in: {per_col}",
            stacklevel=3,
        )
    if not keep.any():
        raise LmmInputError(
            f"no rows left after removing {n_dropped} rows with missing values in "
            f"the columns used by the formula ({', '.join(used)})"
        )
    return data.loc[keep].reset_index(drop=True), n_dropped, data.index[keep]


def _response(data: pd.DataFrame, response: str) -> np.ndarray:
    if response in data.columns:
        col = data[response]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            raise LmmInputError(
                f"response {response!r} is not numeric (dtype {col.dtype}); "
                "a linear mixed model needs a numeric response"
            )
        return col.to_numpy(dtype=np.float64)
    values, names, _ = model_matrix(f"0 + {response}", data, context="response")
    if values.shape[1] != 1:
        raise LmmInputError(
            f"response {response!r} must be one numeric column, got {len(names)} columns"
        )
    return values[:, 0]


def full_rank_columns(X: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    """Indices of a maximal linearly independent subset of X's columns, in order.

    As lme4 (R's LINPACK ``qr(X, tol = 1e-7)``, limited pivoting): columns are
    taken left to right and one is dropped when its part orthogonal to the
    columns kept before it is below ``tol`` times its own norm, so it is always
    the later of two aliased columns that goes, whatever their scales.
    """
    n, p = X.shape
    Q = np.zeros((n, p))
    keep: list[int] = []
    for j in range(p):
        x = np.asarray(X[:, j], dtype=np.float64)
        norm = np.linalg.norm(x)
        if norm == 0.0:
            continue
        basis = Q[:, : len(keep)]
        v = x - basis @ (basis.T @ x)
        v -= basis @ (basis.T @ v)  # second pass for orthogonality
        rest = np.linalg.norm(v)
        if rest > tol * norm:
            Q[:, len(keep)] = v / rest
            keep.append(j)
    return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Submodel:
    """The linear predictor of a distributional parameter, such as brms' ``sigma ~ x + (x | g)``.

    Attributes
    ----------
    formula : str
        The one-sided formula as given (``"~ c + (c | subj)"``).
    X : numpy.ndarray
        float64[N, p] on the model's rows.
    fixef_names : tuple of str
    terms : tuple of Term
        Random-effect terms (possibly none), by decreasing number of levels.
    """

    formula: str
    X: np.ndarray
    fixef_names: tuple[str, ...]
    terms: tuple[Term, ...]


def _one_sided(name: str, formula: str) -> str:
    """``"sigma ~ rhs"``, ``"~ rhs"`` or ``"rhs"`` -> ``"rhs"``."""
    lhs, sep, rhs = str(formula).partition("~")
    if not sep:
        return formula.strip()
    if lhs.strip() not in ("", name):
        raise LmmInputError(
            f"the {name} formula {formula!r} must be one-sided ('~ x + (x | g)') or "
            f"start with '{name} ~'"
        )
    return rhs.strip()


def _submodel(data: pd.DataFrame, name: str, formula: str, parsed) -> Submodel:
    X, names, _ = model_matrix(parsed.fixed, data, context=f"{name} formula")
    if len(full_rank_columns(X)) != X.shape[1]:
        raise LmmInputError(
            f"the {name} formula {formula!r} has linearly dependent fixed-effect columns "
            f"({', '.join(names)})"
        )
    terms = [t for bar in parsed.bars for t in _bar_terms(data, bar)]
    terms.sort(key=lambda t: -t.nlevels)
    return Submodel(formula, np.ascontiguousarray(X), names, tuple(terms))


def split_offsets(fixed: str) -> tuple[str, list[str]]:
    """Remove R's ``offset(expr)`` terms from a fixed-effect formula; return them apart."""
    found: list[str] = []

    def take(call, match):
        found.append(call[match.end() - match.start() : -1].strip())
        return ""

    rest = rewrite_calls(fixed, _OFFSET_CALL, take)
    rest = re.sub(r"\+\s*\+", "+", rest).strip()
    rest = re.sub(r"^\+|\+$", "", rest).strip()
    return rest or "1", found


def _weights(data: pd.DataFrame, column: str | None) -> np.ndarray | None:
    if column is None:
        return None
    col = data[str(column)]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise LmmInputError(f"weights column {column!r} is not numeric (dtype {col.dtype})")
    w = col.to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(w) & (w > 0))
    if bad.any():
        raise LmmInputError(
            f"weights column {column!r} has {int(bad.sum())} values that are not finite and "
            f"positive (first at row {int(np.flatnonzero(bad)[0]) + 1} of the complete cases)"
        )
    return w


def _require_finite(values: np.ndarray, names, what: str) -> None:
    """Refuse infinite values, naming the column and the first rows (NaN was removed before)."""
    bad = ~np.isfinite(values)
    if bad.any():
        col = int(np.flatnonzero(bad.any(axis=0))[0])
        rows = np.flatnonzero(bad[:, col])
        shown = ", ".join(str(int(r) + 1) for r in rows[:5])
        raise LmmInputError(
            f"{what} {names[col]!r} has {rows.size} infinite value"
            f"{'s' if rows.size > 1 else ''} (row{'s' if rows.size > 1 else ''} {shown}"
            f"{', ...' if rows.size > 5 else ''} of the complete cases); remove or recode them"
        )


def _split_uncorrelated(bar: BarTerm) -> list[BarTerm]:
    """lme4's ``(a + b || g)``: one correlated term per term of the lhs formula.

    The intercept becomes ``(1 | g)`` and every other term ``(0 + term | g)``, so a
    numeric covariate gets its own variance and a factor a block over its levels.
    """
    parts = formula_terms(bar.lhs, context=f"random-effect term {bar.source}:")
    return [
        replace(bar, lhs="1" if part == "1" else f"0 + {part}", uncorrelated=False)
        for part in parts
    ]


def _bar_terms(data: pd.DataFrame, bar: BarTerm) -> list[Term]:
    if bar.uncorrelated:
        return [t for sub in _split_uncorrelated(bar) for t in _bar_terms(data, sub)]
    refs, levels = group_index(data, bar.factors)
    if len(levels) < 2:
        raise LmmInputError(
            f"grouping factor {bar.group!r} in term {bar.source!r} has a single level "
            f"({levels[0]!r}); a random effect needs at least two levels"
        )
    z, names, spec = model_matrix(bar.lhs, data, context=f"random-effect term {bar.source}:")
    _require_finite(z, names, f"random-effect term {bar.source!r}, column")
    if z.shape[1] == 0:
        raise LmmInputError(f"random-effect term {bar.source!r} has no effects")
    cols = tuple(range(z.shape[1]))
    return [
        Term(
            bar.group,
            names,
            levels,
            refs,
            np.ascontiguousarray(z),
            factors=bar.factors,
            lhs_spec=spec,
            lhs_columns=cols,
        )  # fmt: skip
    ]


def _expand_dot(parsed, data: pd.DataFrame) -> str:
    """The fixed part with ``.`` written out: every column not named elsewhere (as in R)."""
    named = set(required_columns(parsed.response, context="response"))
    for bar in parsed.bars:
        named |= required_columns(bar.lhs, context=f"random-effect term {bar.source}:")
        named |= set(bar.factors)
    others = expand_dot(parsed.fixed, [], named)  # the dot as "1": the other fixed terms
    named |= required_columns(others, context="fixed-effect formula")
    return expand_dot(parsed.fixed, [str(c) for c in data.columns], named)


def _check_contrasts(contrasts, fixed: str, data: pd.DataFrame) -> dict[str, str]:
    """Validate ``contrasts`` (``contr.`` prefixes accepted) against the fixed part."""
    if contrasts is None:
        return {}
    if not isinstance(contrasts, Mapping):
        raise LmmInputError(
            f"contrasts must map factor columns to a coding, e.g. {{'Machine': 'sum'}}; "
            f"got {contrasts!r}"
        )
    out = {}
    used = required_columns(fixed, context="fixed-effect formula")
    for name, kind in contrasts.items():
        coding = str(kind).removeprefix("contr.")
        if coding not in CONTRASTS:
            raise LmmInputError(
                f"contrasts: {name!r} has coding {kind!r}; choose one of {', '.join(CONTRASTS)}"
            )
        if str(name) not in map(str, data.columns):
            raise LmmInputError(f"contrasts: column {name!r} is not in the data")
        if str(name) not in used:  # as R: a warning, and the coding is ignored
            warnings.warn(
                f"contrasts: column {name!r} is not in the fixed-effect formula; ignored",
                stacklevel=3,
            )
            continue
        out[str(name)] = coding
    return out


def build_model(
    data: pd.DataFrame,
    formula: str,
    categorical: Sequence[str] = (),
    *,
    drop_aliased: bool = True,
    submodels: Mapping[str, str] | None = None,
    weights: str | None = None,
    offset: str | None = None,
    contrasts: Mapping[str, str] | None = None,
) -> Model:
    """Build the structured model of an lme4 formula on a DataFrame.

    Parameters
    ----------
    data : pandas.DataFrame
        One row per observation.
    formula : str
        lme4 syntax, e.g. ``"Reaction ~ Days + (Days | Subject)"``. A ``.`` in the
        fixed part means every column of ``data`` not named elsewhere in the
        formula, as in R (``"y ~ . + (1 | g)"``).
    categorical : sequence of str
        Columns to treat as factors (R's ``factor()``). Grouping columns are
        always factors.
    drop_aliased : bool
        Drop fixed-effect columns that are linear combinations of earlier ones,
        with a warning, as lme4 does (REML/ML and NUTS need a full-rank X).
        False keeps every column, for methods that select among more columns
        than observations (lme4's ``check.rankX = "ignore"``).
    weights : str, optional
        Column of prior weights, as lme4's ``weights``: row i has residual
        variance ``sigma^2 / w_i`` (finite and positive).
    offset : str, optional
        Column added to the linear predictor with coefficient 1; ``offset(x)``
        terms in the fixed part do the same, and several offsets add up.
    contrasts : mapping of str to str, optional
        R's ``contrasts`` argument: the coding of each named factor in the
        fixed part, ``"treatment"`` (the default for every factor), ``"sum"``,
        ``"helmert"`` or ``"poly"`` (R's ``contr.*``), with R's column names
        (``Machine1``, ``Machine.L``). Named columns are treated as factors.
    submodels : mapping of str to str, optional
        Linear predictors of other parameters, as one-sided formulas by name
        (``{"sigma": "~ c + (c | subj)"}``): built on the same rows, with their
        columns counted in the removal of missing values (``Model.submodels``).

    Returns
    -------
    Model

    Raises
    ------
    LmmInputError
        For syntax errors, unknown columns, a non-numeric response, a grouping
        factor with a single level, or no rows left after removing missing values.
    """
    if not isinstance(data, pd.DataFrame):
        raise LmmInputError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    source = data
    parsed = parse_formula(formula)
    odd = [str(c) for c in data.columns if not str(c).isidentifier()]  # R's IQ.verb
    if odd:
        parsed = replace(
            parsed, fixed=quote_names(parsed.fixed, odd),
            bars=tuple(replace(b, lhs=quote_names(b.lhs, odd)) for b in parsed.bars),
        )  # fmt: skip
    if has_dot(parsed.fixed):
        parsed = replace(parsed, fixed=_expand_dot(parsed, data))
    fixed_rhs, offsets = split_offsets(parsed.fixed)
    contrasts = _check_contrasts(contrasts, fixed_rhs, data)
    parsed = replace(parsed, fixed=apply_contrasts(fixed_rhs, contrasts))
    offsets = [*offsets, *([offset] if offset is not None else [])]
    categorical = list(categorical)
    columns = set(map(str, data.columns))
    for name in categorical:
        if name not in columns:
            raise LmmInputError(f"categorical column {name!r} is not in the data")

    needed: dict[str, str] = {}  # column -> where it is first read, for error messages
    elsewhere: set[str] = set()  # read by more than the response: new data need these

    def need(col: str, where: str) -> None:
        needed.setdefault(col, where)
        if where != "the response":
            elsewhere.add(col)

    for col in sorted(required_columns(parsed.response, context="response")):
        need(col, "the response")
    fixed_vars = sorted(required_columns(parsed.fixed, context="fixed-effect formula"))
    for col in fixed_vars:
        need(col, "the fixed effects")
    for expr in offsets:
        for col in sorted(required_columns(expr, context="offset")):
            need(col, "the offset")
    if weights is not None:
        need(str(weights), "the weights")
    for bar in parsed.bars:
        lhs_cols = required_columns(bar.lhs, context=f"random-effect term {bar.source}:")
        for col in sorted(lhs_cols | set(bar.factors)):
            need(col, f"the random-effect term {bar.source!r}")
    sub_parsed = {}
    for name, sub in (submodels or {}).items():
        rhs = _one_sided(name, sub)
        sub_parsed[name] = parse_formula(f"{name} ~ {rhs}")
        where = f"the {name} formula"
        for col in sorted(required_columns(sub_parsed[name].fixed, context=where)):
            need(col, where)
        for bar in sub_parsed[name].bars:
            lhs_cols = required_columns(bar.lhs, context=f"{where}, term {bar.source}:")
            for col in sorted(lhs_cols | set(bar.factors)):
                need(col, where)
    for col, where in needed.items():
        if col not in columns:
            avail = ", ".join(sorted(columns))
            raise LmmInputError(f"unknown column {col!r} in {where}; the data has: {avail}")

    used = list(needed)
    everything = data[used]
    data, n_dropped, rows = _drop_missing(everything, used)
    # grouping columns are factors only inside their bar (group_index); elsewhere a
    # column keeps its type unless it is listed as categorical, as in lme4
    factor_columns = tuple(sorted((set(categorical) | set(contrasts)) & set(used)))
    data = _as_factors(data, set(factor_columns))

    y = _response(data, parsed.response)
    _require_finite(y[:, None], (parsed.response,), "response")
    w = _weights(data, weights)
    off = None
    for expr in offsets:
        values, _, _ = model_matrix(f"0 + {expr}", data, context="offset")
        if values.shape[1] != 1:
            raise LmmInputError(f"offset {expr!r} must be one numeric column")
        _require_finite(values, (expr,), "offset")
        off = values[:, 0] if off is None else off + values[:, 0]
    # poly() and scale() learn from every row whose fixed-effect columns are present, as
    # R's model.frame evaluates them before it removes rows missing the response (say)
    state = everything[everything[fixed_vars].notna().all(axis=1)] if n_dropped else None
    X, names, spec = model_matrix(parsed.fixed, data, context="fixed-effect formula",
                                  state_rows=state)  # fmt: skip
    _require_finite(X, names, "fixed-effect column")
    keep = full_rank_columns(X) if drop_aliased else np.arange(X.shape[1])
    full_rank = drop_aliased or (
        X.shape[1] <= X.shape[0] and len(full_rank_columns(X)) == X.shape[1]
    )
    dropped = tuple(n for k, n in enumerate(names) if k not in set(keep))
    if dropped:
        warnings.warn(
            f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
            f"column{'s' if len(dropped) > 1 else ''} / coefficient"
            f"{'s' if len(dropped) > 1 else ''}: {', '.join(dropped)}",
            stacklevel=2,
        )
        X = X[:, keep]
        names = tuple(names[k] for k in keep)

    if not parsed.bars:
        raise LmmInputError(
            f"formula {formula!r} has no random-effect terms such as (1 | group); "
            "a linear mixed model needs at least one"
        )
    terms = [t for bar in parsed.bars for t in _bar_terms(data, bar)]
    order = sorted(range(len(terms)), key=lambda k: -terms[k].nlevels)
    subs = {
        name: _submodel(data, name, submodels[name], parsed_sub)
        for name, parsed_sub in sub_parsed.items()
    }
    return Model(
        formula=formula,
        response=parsed.response,
        y=y,
        X=np.ascontiguousarray(X),
        fixef_names=names,
        terms=tuple(terms[k] for k in order),
        data=data,
        fixed_spec=spec,
        n_dropped=n_dropped,
        full_rank=bool(full_rank),
        dropped_fixef=dropped,
        fixed_columns=tuple(int(k) for k in keep),
        factor_columns=factor_columns,
        fixed_variables=tuple(fixed_vars),
        used_variables=tuple(used),
        response_variables=tuple(c for c in used if c not in elsewhere),
        submodels=subs,
        weights=w,
        offset=off,
        offset_terms=tuple(offsets),
        weights_column=None if weights is None else str(weights),
        source=source,
        categorical=tuple(categorical),
        contrasts=tuple(contrasts.items()),
        offset_column=offset,
        rows=rows,
    )


def conform_newdata(model: Model, newdata: pd.DataFrame) -> pd.DataFrame:
    """Convert the factor columns of ``newdata`` to the model's level labels.

    Values that the model never saw become missing in those columns; callers
    decide whether that is an error (fixed effects) or a new level (grouping).
    """
    if not isinstance(newdata, pd.DataFrame):
        raise LmmInputError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
    newdata = newdata.copy()
    for name in model.fixed_variables:
        col = model.data[name] if name in model.data.columns else None
        if name not in newdata.columns or col is None or pd.api.types.is_numeric_dtype(col):
            continue
        known = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col.unique()
        known = {_label(v) for v in known}
        unseen = sorted({_label(v) for v in newdata[name].dropna().unique()} - known)
        if unseen:
            raise LmmInputError(
                f"newdata column {name!r} has levels the fit never saw: {', '.join(unseen[:5])}"
            )
    for name in model.factor_columns:
        if name not in newdata.columns:
            continue
        labels = [None if pd.isna(v) else _label(v) for v in newdata[name].to_numpy()]
        newdata[name] = pd.Categorical(labels, categories=model.data[name].cat.categories)
    return newdata


def row_labels(data: pd.DataFrame, factors: Sequence[str]) -> np.ndarray:
    """Each row's level label of the interaction of ``factors`` (``"a:b"``)."""
    parts = [
        np.array([None if pd.isna(v) else _label(v) for v in data[f].to_numpy()], dtype=object)
        for f in factors
    ]
    out = parts[0]
    for part in parts[1:]:
        pairs = zip(out, part, strict=True)
        out = np.array(
            [None if a is None or b is None else f"{a}:{b}" for a, b in pairs], dtype=object
        )
    return out


@dataclass(frozen=True)
class NewDesign:
    """The model's design evaluated on new data (rows with a missing value left out).

    Attributes
    ----------
    complete : bool array (n_new,)
        Rows that have every column the prediction needs; the others predict NaN.
    X : array (n_complete, p)
    refs, z : tuples of arrays, one per term (empty when random effects are not used)
        Level index per row (-1 for a level the fit never saw) and lhs columns.
    new_labels : tuple of arrays
        Per term, the labels of the rows' unseen levels (for drawing new effects).
    offset : array (n_complete,) or 0.0
        The model's offsets evaluated on the new rows.
    """

    complete: np.ndarray
    X: np.ndarray
    refs: tuple = ()
    z: tuple = ()
    new_labels: tuple = ()
    offset: np.ndarray | float = 0.0


def _level_index(term: Term, data: pd.DataFrame, allow_new_levels: bool):
    missing = [f for f in term.factors if f not in data.columns]
    if missing:
        raise LmmInputError(f"newdata lacks grouping column {missing[0]!r}")
    labels = row_labels(data, term.factors)
    lookup = {lvl: k for k, lvl in enumerate(term.levels)}
    refs = np.array([lookup.get(v, -1) for v in labels], dtype=np.int64)
    if not allow_new_levels and (refs < 0).any():
        new = sorted({str(v) for v in labels[refs < 0]})
        raise LmmInputError(
            f"newdata has levels of {term.group!r} not in the fit: {', '.join(new[:5])}"
        )
    return refs, labels


def new_design(model: Model, newdata, *, random: bool = True,
               allow_new_levels: bool = True) -> NewDesign:  # fmt: skip
    """Evaluate the model's fixed (and random-effect) design on ``newdata``.

    Raises
    ------
    LmmInputError
        For a non-DataFrame, a missing column, a factor level of a fixed effect
        the fit never saw, or (with ``allow_new_levels=False``) a new grouping level.
    """
    if not isinstance(newdata, pd.DataFrame):
        raise LmmInputError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
    needed = model.used_variables if random else model.fixed_variables
    needed = [c for c in needed if c not in (*model.response_variables, model.weights_column)]
    for expr in model.offset_terms:
        needed += sorted(required_columns(expr, context="offset"))
    absent = [c for c in needed if c not in newdata.columns]
    if absent:
        raise LmmInputError(f"newdata lacks column {absent[0]!r} used by the model")
    # rows with a missing value predict NaN, as lme4's predict(na.action = na.pass)
    complete = newdata[needed].notna().all(axis=1).to_numpy()
    rows = newdata.loc[complete]
    if rows.empty:
        return NewDesign(complete, np.zeros((0, model.p)))
    data = conform_newdata(model, rows)
    try:
        X = np.asarray(model.fixed_spec.get_model_matrix(data, na_action="raise"), dtype=float)
    except Exception as exc:  # formulaic raises several types for bad new data
        raise LmmInputError(f"cannot build fixed effects for newdata: {exc}") from None
    X = X[:, list(model.fixed_columns)]
    off = 0.0
    for expr in model.offset_terms:
        off = off + model_matrix(f"0 + {expr}", data, context="offset")[0][:, 0]
    if not random:
        return NewDesign(complete, X, offset=off)
    zs, refs, labels = [], [], []
    for t in model.terms:
        z = np.asarray(t.lhs_spec.get_model_matrix(data, na_action="raise"), dtype=float)
        zs.append(z[:, list(t.lhs_columns)])
        r, lab = _level_index(t, rows, allow_new_levels)
        refs.append(r)
        labels.append(lab)
    return NewDesign(complete, X, tuple(refs), tuple(zs), tuple(labels), off)


def fixed_terms(model: Model) -> tuple[list[FixedTerm], tuple[str, ...], bool]:
    """The fixed part's terms as R's ``terms()`` sees them, for anova contrasts.

    Returns
    -------
    terms : list of FixedTerm
        Every term but the intercept (:class:`lmmjax.formula.fixed.FixedTerm`).
    columns : tuple of str
        formulaic's names of X's columns (aliased ones dropped), in X's order.
    intercept : bool
        Whether the fixed part has an intercept.
    """
    if model.fixed_spec is None:
        raise LmmInputError("the model has no fixed-effect spec to take terms from")
    names = model.fixed_spec.column_names
    columns = tuple(names[k] for k in (model.fixed_columns or range(len(names))))
    return (
        fixed_term_list(model.fixed_spec, model.data, model.formula),
        columns,
        ("Intercept" in names),
    )

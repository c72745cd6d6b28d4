"""Model matrices through formulaic, with lme4-style column names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import formulaic
import numpy as np
import pandas as pd
from formulaic.errors import FormulaicError

from lmmjax.errors import LmmInputError

_ANSI = re.compile(r"\x1b\[[0-9;]*m|[\u29da\u29db]")
_ANSI_ONLY = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"\[(?:T\.)?([^\]]*)\]")
_I_CALL = re.compile(r"\bI\(")
_FACTOR_CALL = re.compile(r"(?<![\w.])(?:as\.)?factor\(")
# R functions that formulaic knows under another name (numpy's, in its namespace as np)
_R_CALLS = {"sqrt": "np.sqrt", "exp": "np.exp", "log": "np.log", "log10": "np.log10",
            "log2": "np.log2", "abs": "np.abs"}  # fmt: skip
_R_CALL = re.compile(r"(?<![\w.])(" + "|".join(_R_CALLS) + r")\(")
_R_WORDS = re.compile(r"(?<![\w.`])(TRUE|FALSE)(?![\w.`])")
_NAME_TOKEN = re.compile(r"`([^`]+)`|(?<![\w.`])([A-Za-z_.][\w.]*)(?![\w.`])")


CONTRASTS = ("treatment", "sum", "helmert", "poly")
_CONTRAST_PART = re.compile(r"^C\((`[^`]+`|[^,()]+),\s*contr\.(\w+)\)\[(.*)\]$")


def apply_contrasts(formula: str, contrasts: dict[str, str]) -> str:
    """Code the listed factors with R's contrasts: ``x`` becomes ``C(x, contr.sum)``.

    Every bare use of a listed column in the fixed part (and ``factor(x)``,
    ``as.factor(x)``) is rewritten; the names of the columns it makes follow R
    (:func:`contrast_column_name`).
    """
    if not contrasts:
        return formula
    for name in contrasts:
        plain = re.escape(name)
        formula = re.sub(rf"(?<![\w.])(?:as\.)?factor\(\s*(`{plain}`|{plain})\s*\)", r"\1",
                         formula)  # fmt: skip

    def sub(match):
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if name not in contrasts:
            return match.group(0)
        return f"C({match.group(0)}, contr.{contrasts[name]})"

    return _NAME_TOKEN.sub(sub, formula)


def contrast_column_name(part: str, levels: dict[str, list[str]]) -> str:
    """R's name of one factor column coded by :func:`apply_contrasts` (other parts unchanged).

    Treatment coding names a level (``MachineB``), polynomial coding a degree
    (``Machine.L``, ``Machine^4``), sum and Helmert coding a position
    (``Machine1``), as ``model.matrix`` does. Columns of a factor that enters
    with every level (no intercept) are named by level under any coding.
    """
    match = _CONTRAST_PART.match(part)
    if not match:
        return part
    name, kind, label = match.group(1).strip(), match.group(2), match.group(3)
    name = name.strip("`")
    if kind in ("sum", "helmert") and label[:2] in ("S.", "H."):
        k = levels[name].index(label[2:])
        return f"{name}{k + 1 if kind == 'sum' else k}"
    if kind == "treatment" and label.startswith("T."):
        label = label[2:]
    return f"{name}{label}"


def r_to_python(formula: str) -> tuple[str, dict[str, str]]:
    """Translate R spellings into formulaic's, remembering what the user wrote.

    ``factor(x)`` / ``as.factor(x)`` become ``C(x)``; ``sqrt``, ``exp``, ``log``
    ... become numpy's; ``TRUE`` / ``FALSE`` Python's; ``a %in% b`` is ``a:b``;
    and ``^`` inside ``I(...)`` is ``**``. Returns the translated formula and a
    map from each translated call to its original text, so that column names
    read as in R (``factor(age)10``, ``I(x^2)``).
    """
    formula = _R_WORDS.sub(lambda m: "True" if m.group(1) == "TRUE" else "False", formula)
    formula = re.sub(r"\s*%in%\s*", ":", formula)  # R's nesting a %in% b is the interaction a:b
    names: dict[str, str] = {}
    as_c = lambda call, m: "C(" + call[m.end() - m.start() :]  # noqa: E731
    formula = rewrite_calls(formula, _FACTOR_CALL, as_c, names)
    formula = rewrite_calls(
        formula, _R_CALL, lambda call, m: _R_CALLS[m.group(1)] + call[len(m.group(1)) :], names
    )
    return rewrite_calls(formula, _I_CALL, lambda call, m: call.replace("^", "**"), names), names


def rewrite_calls(text: str, pattern: re.Pattern, rewrite, originals: dict | None = None) -> str:
    """Rewrite every call whose opening matches ``pattern`` (ending at its ``(``).

    ``rewrite(call, match)`` gets the whole call text, up to its matching
    parenthesis, and returns the replacement; ``originals`` (when given)
    collects ``{canonical replacement: original call}``.
    """
    out, i = [], 0
    for match in pattern.finditer(text):
        if match.start() < i:  # inside a call already rewritten
            continue
        depth, j = 0, match.end() - 1
        for j in range(match.end() - 1, len(text)):
            depth += text[j] == "("
            depth -= text[j] == ")"
            if depth == 0:
                break
        call = text[match.start() : j + 1]
        new = rewrite(call, match)
        if originals is not None:
            originals[_canonical(new)] = originals.get(_canonical(call), call)
        out.append(text[i : match.start()] + new)
        i = j + 1
    out.append(text[i:])
    return "".join(out)


def quote_names(formula: str, names) -> str:
    """Put backticks around the given column names (R's ``IQ.verb``) where they stand bare."""
    odd = set(names)
    if not odd:
        return formula

    def sub(match):
        name = match.group(2)
        return f"`{name}`" if name in odd else match.group(0)

    return _NAME_TOKEN.sub(sub, formula)


def _r_raw_poly(part: str) -> str:
    """formulaic's ``poly(x, 2, raw=True)[0]`` is R's ``poly(x, 2, raw = TRUE)1``."""
    match = re.match(r"^(poly\(.*raw\s*=\s*)True(.*\))\[(\d+)\]$", part)
    if not match:
        return part
    return f"{match.group(1)}TRUE{match.group(2)}[{int(match.group(3)) + 1}]".replace(
        "raw=TRUE", "raw = TRUE"
    )


def _canonical(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def clean_message(exc: Exception) -> str:
    """formulaic's error text without terminal colour codes, on one line.

    formulaic marks the offending token of a syntax error between ``\u29db``
    and ``\u29da``; that position is kept as a caret line under the formula.
    """
    text = _ANSI_ONLY.sub("", str(exc))
    head, _, marked = text.partition("\n\n")
    start = marked.find("\u29db")
    message = " ".join(_ANSI.sub("", head).split()).rstrip(".")
    if start < 0 or "\n" in marked:
        return " ".join(_ANSI.sub("", text).split())
    shown = _ANSI.sub("", marked)
    return f"{message} (at position {start + 1})\n  {shown}\n  {' ' * start}^"


def lme4_name(name: str, originals: dict[str, str] | None = None) -> str:
    """Rename a formulaic column as lme4 would print it.

    ``Intercept`` becomes ``(Intercept)``, ``Sex[T.Male]`` becomes ``SexMale``,
    and ``I(x ** 2)`` becomes ``I(x^2)`` when that is how it was written.
    """
    if name == "Intercept":
        return "(Intercept)"
    parts = []
    for part in name.split(":"):
        key = _canonical(part)
        if originals and key in originals:
            parts.append(originals[key])
            continue
        part = _r_raw_poly(part)
        level = _LEVEL.search(part)
        stem = _canonical(part[: level.start()]) if level else key
        if originals and level and stem in originals:  # factor(x)[T.a] -> factor(x)a
            parts.append(originals[stem] + _LEVEL.sub(r"\1", part[level.start() :]))
        else:
            parts.append(_LEVEL.sub(r"\1", part))
    return ":".join(parts)


def model_matrix(
    formula: str, data: pd.DataFrame, *, context: str, state_rows: pd.DataFrame | None = None
) -> tuple[np.ndarray, tuple[str, ...], object]:
    """Evaluate a one-sided formula on ``data``.

    Parameters
    ----------
    formula : str
        Right-hand side such as ``"1 + x*Sex"``; R's ``I(x^2)`` is accepted.
    data : pandas.DataFrame
        Complete cases only: missing values are removed before this call.
    context : str
        Where the formula came from, for error messages.
    state_rows : pandas.DataFrame, optional
        Rows from which stateful functions (``poly``, ``scale``) take their
        centring and scaling, when the formula has any: R's ``model.frame``
        evaluates them before it removes rows with missing values elsewhere.
        Their factor levels are those of ``data``.

    Returns
    -------
    matrix : numpy.ndarray
        float64 array (N, p).
    names : tuple of str
        lme4-style column names.
    spec : formulaic.ModelSpec
        The spec, which rebuilds the same columns on new data.
    """
    translated, originals = r_to_python(formula)
    shown = formula.removeprefix("0 + ")  # the response and offsets are asked for so
    try:  # the rows are complete: a NaN or infinity now comes from a function, reported below
        with np.errstate(invalid="ignore", divide="ignore"):
            mm = formulaic.model_matrix(translated, data, na_action="ignore")
            if state_rows is not None and mm.model_spec.transform_state:
                rows = _with_levels_of(state_rows, data)
                spec = formulaic.model_matrix(translated, rows, na_action="ignore").model_spec
                mm = spec.get_model_matrix(data, na_action="ignore")
    except FormulaicError as exc:
        raise LmmInputError(f"{context} {shown!r}: {clean_message(exc)}") from None
    levels = {str(c): [str(v) for v in data[c].cat.categories] for c in data.columns
              if isinstance(data[c].dtype, pd.CategoricalDtype)}  # fmt: skip
    names = tuple(
        lme4_name(":".join(contrast_column_name(p, levels) for p in c.split(":")), originals)
        for c in mm.columns
    )
    matrix = np.asarray(mm, dtype=np.float64)
    nan = np.isnan(matrix).sum(axis=0)
    if nan.any():
        k = int(np.flatnonzero(nan)[0])
        raise LmmInputError(
            f"{context} {shown!r}: column {names[k]!r} is NaN in {nan[k]} of "
            f"{matrix.shape[0]} rows (a function undefined there, such as log or sqrt of "
            "a negative number, or a constant under scale() or poly()); remove those rows "
            "or change the formula"
        )
    return matrix, names, mm.model_spec


def _with_levels_of(rows: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with each non-numeric column's values outside ``data``'s levels made missing."""
    rows = rows.copy()
    for name in rows.columns.intersection(data.columns):
        column = data[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            rows[name] = pd.Categorical(rows[name], categories=column.cat.categories,
                                        ordered=column.cat.ordered)  # fmt: skip
        elif not pd.api.types.is_numeric_dtype(column):
            rows[name] = rows[name].where(rows[name].isin(set(column)))
    return rows


def _parse(formula: str, context: str):
    """formulaic's parse of a one-sided formula (R's ``^`` in ``I()`` accepted)."""
    translated, _ = r_to_python(formula)
    try:
        return formulaic.Formula(translated)
    except FormulaicError as exc:
        raise LmmInputError(f"{context} {formula!r}: {clean_message(exc)}") from None


def required_columns(formula: str, *, context: str) -> set[str]:
    """The data columns that a one-sided formula reads.

    formulaic's own list, plus the names it misses inside its stateful
    transforms (``poly(x, 2)`` reports nothing): every bare or backticked
    name that is not a function called, a keyword argument or ``np``.
    """
    reported = set(_parse(formula, context).required_variables)
    translated, _ = r_to_python(formula)
    found, quoted = set(), set()
    for match in _NAME_TOKEN.finditer(translated):
        name = match.group(1) or match.group(2)
        after = translated[match.end() :].lstrip()
        if match.group(1) is not None:
            quoted.add(name)
        elif (
            after.startswith("(") or (after.startswith("=") and not after.startswith("=="))
            or name in ("True", "False", "None", "np") or name.startswith(("np.", "contr."))
            or name.isdigit() or name == "."
        ):  # fmt: skip
            continue
        found.add(name)
    # formulaic reports `a.b` (backticked) as `a`
    reported = {n for n in reported if n in found or not any(q.startswith(n + ".") for q in quoted)}
    return found | reported


def formula_terms(formula: str, *, context: str) -> list[str]:
    """The terms of a one-sided formula after expansion (``"x*z"`` -> 1, x, z, x:z)."""
    return [str(term) for term in _parse(formula, context)]


@dataclass(frozen=True, eq=False)
class FixedTerm:
    """One term of the fixed part, as R's ``terms()`` describes it (for anova contrasts).

    Attributes
    ----------
    label : str
        R's term label (``"age:Sex"``, ``"factor(temp)"``).
    columns : tuple of str
        formulaic's names of the term's columns in the model matrix.
    variables : tuple of str
        The variables (formulaic factors) the term multiplies.
    numeric : tuple of str
        Those of ``variables`` that are one numeric column (R's data class
        ``"numeric"``; factors, logicals and matrices such as ``poly(x, 2)`` are not).
    full : numpy.ndarray
        The term with every level of each factor, R's ``model.matrix(~ 0 + term)``.
    full_names : tuple of str
        formulaic's names of ``full``'s columns (``Sex[Male]``, where the
        reduced coding names ``Sex[T.Male]``).
    """

    label: str
    columns: tuple[str, ...]
    variables: tuple[str, ...]
    numeric: tuple[str, ...]
    full: np.ndarray = field(repr=False)
    full_names: tuple[str, ...]


def fixed_terms(spec, data: pd.DataFrame, formula: str) -> list[FixedTerm]:
    """The terms of a fixed part, intercept excluded, from its formulaic spec.

    Parameters
    ----------
    spec : formulaic.ModelSpec
        The spec that built the model matrix.
    data : pandas.DataFrame
        The rows the model was built on.
    formula : str
        The formula as written, so that labels read as in R (``factor(x)``).
    """
    _, originals = r_to_python(formula)
    kinds = {name: state[0] for name, state in spec.encoder_state.items()}
    width: dict[str, int] = {}
    out = []
    for term, columns in spec.term_slices.items():
        variables = tuple(str(f) for f in term.factors)
        if variables == ("1",):
            continue
        for v in variables:
            if v not in width and getattr(kinds.get(v), "value", "") == "numerical":
                width[v] = formulaic.model_matrix(f"0 + {v}", data).shape[1]
        full = formulaic.model_matrix(f"0 + {term}", data, ensure_full_rank=False)
        out.append(FixedTerm(
            label=lme4_name(str(term), originals),
            columns=tuple(spec.column_names[columns]),
            variables=variables,
            numeric=tuple(v for v in variables if width.get(v) == 1),
            full=np.asarray(full, dtype=np.float64),
            full_names=tuple(full.columns),
        ))  # fmt: skip
    return out

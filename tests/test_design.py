"""Tests of the structured model: Z u reproduced exactly, factors, missing data, bad input.

The dense Z used as the reference is built here from the raw data columns with
NumPy, independently of :class:`lmmjax.terms.Term` (``Term.dense`` is checked
against it, not used to build it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from lmmjax.datasets import load_bundled
from lmmjax.design import build_model, group_index
from lmmjax.errors import LmmInputError
from lmmjax.linalg import z_times
from lmmjax.reml import fit_reml
from lmmjax.terms import unique_inverse

# --------------------------------------------------------------------------------------
# Z u: refs and z reproduce the dense design exactly
# --------------------------------------------------------------------------------------


def label(value) -> str:
    """R's printing of a factor level: whole floats without '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def dense_term(data: pd.DataFrame, factors: list[str], columns: list[np.ndarray]):
    """Dense N x (M d) design of one term, level-major, from raw columns.

    Levels are the combinations of ``factors`` present in the data, sorted with
    the first factor varying slowest (numeric sort for numeric columns).
    """
    keys = list(zip(*(data[f].tolist() for f in factors), strict=True))
    levels = sorted(set(keys))
    index = {key: k for k, key in enumerate(levels)}
    n, d = len(data), len(columns)
    Z = np.zeros((n, len(levels) * d))
    for i, key in enumerate(keys):
        for c, col in enumerate(columns):
            Z[i, index[key] * d + c] = col[i]
    labels = tuple(":".join(label(v) for v in key) for key in levels)
    return Z, labels


@pytest.fixture
def mixed_data(rng):
    """Crossed, nested and slope terms; grouping columns of float, int and str dtype."""
    n = 90
    data = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "w": rng.uniform(-1, 1, size=n),
            "gf": rng.choice([0.5, 1.0, 2.0, 3.5, 10.0, 20.0], size=n),  # float
            "gi": rng.choice([2, 9, 10, 100], size=n),  # int: numeric order
            "a": rng.choice(["A", "B", "C"], size=n),  # str, outer factor
            "b": rng.choice(["u", "v", "w"], size=n),  # str, nested in a
            "gs": rng.choice(["s1", "s2", "s3", "s4", "s5"], size=n),  # str
            "unused": rng.normal(size=n),
        }
    )
    data.loc[[3, 17], "x"] = np.nan
    data.loc[40, "gs"] = None
    data.loc[[5, 60], "unused"] = np.nan  # not in the formula: must not drop rows
    return data


MIXED = "y ~ x + (1 + x | gf) + (1 | gi) + (1 | a/b) + (w || gs)"


def expected_terms(data: pd.DataFrame) -> dict[tuple[str, tuple[str, ...]], tuple]:
    """(group, names) -> (dense Z, level labels) for the MIXED formula."""
    one = np.ones(len(data))
    x, w = data.x.to_numpy(), data.w.to_numpy()
    spec = {
        ("gf", ("(Intercept)", "x")): (["gf"], [one, x]),
        ("gi", ("(Intercept)",)): (["gi"], [one]),
        ("b:a", ("(Intercept)",)): (["b", "a"], [one]),
        ("a", ("(Intercept)",)): (["a"], [one]),
        ("gs", ("(Intercept)",)): (["gs"], [one]),
        ("gs", ("w",)): (["gs"], [w]),
    }
    return {key: dense_term(data, f, cols) for key, (f, cols) in spec.items()}


def test_z_u_reproduced_exactly(mixed_data, rng):
    with pytest.warns(UserWarning, match="removed 3 of 90 rows"):
        model = build_model(mixed_data, MIXED)
    complete = mixed_data.dropna(subset=["y", "x", "w", "gf", "gi", "a", "b", "gs"])
    complete = complete.reset_index(drop=True)
    assert model.nobs == len(complete) == 87
    np.testing.assert_array_equal(model.y, complete.y.to_numpy())

    expected = expected_terms(complete)
    assert len(model.terms) == len(expected)
    assert {(t.group, t.names) for t in model.terms} == set(expected)

    Zu_terms = np.zeros(model.nobs)
    Zu_dense = np.zeros(model.nobs)
    blocks, us = [], []
    for term in model.terms:
        Z, labels = expected[(term.group, term.names)]
        assert term.levels == labels
        assert term.refs.dtype == np.int32 and term.refs.shape == (model.nobs,)
        assert term.z.shape == (model.nobs, term.d)
        np.testing.assert_array_equal(term.dense(), Z)
        u = rng.normal(size=(term.nlevels, term.d))
        Zu = np.asarray(z_times([term.refs], [term.z], [u]))
        np.testing.assert_allclose(Zu, term.dense() @ u.ravel(), rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(Zu, Z @ u.ravel(), rtol=1e-14, atol=1e-14)
        Zu_terms += Zu
        blocks.append(Z)
        us.append(u.ravel())
    Zu_dense = np.hstack(blocks) @ np.concatenate(us)
    np.testing.assert_allclose(Zu_terms, Zu_dense, rtol=1e-13, atol=1e-13)
    assert model.q == sum(Z.shape[1] for Z in blocks)


def test_mixed_model_term_order_and_dims(mixed_data):
    with pytest.warns(UserWarning):
        model = build_model(mixed_data, MIXED)
    levels = [t.nlevels for t in model.terms]
    assert levels == sorted(levels, reverse=True)
    dims = model.dims()
    assert dims["nobs"] == 87 and dims["p"] == 2
    assert dims["ntheta"] == 3 + 1 + 1 + 1 + 1 + 1
    assert [t["d"] for t in dims["terms"]] == [t.d for t in model.terms]


# --------------------------------------------------------------------------------------
# grouping columns are factors whatever their dtype; categorical columns
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "levels"),
    [
        (np.tile([10.0, 2.5, 9.0], 4), ("2.5", "9", "10")),  # float: numeric order
        (np.tile([10, 2, 9], 4), ("2", "9", "10")),  # int: numeric order, not "10" < "2"
        (np.tile(["b", "a", "c"], 4), ("a", "b", "c")),  # str
        (pd.array(np.tile(["b", "a", "c"], 4), dtype="string"), ("a", "b", "c")),
        (np.tile([True, False, True], 4), ("False", "True")),  # bool
        (  # a categorical keeps its own level order and drops unused levels
            pd.Categorical(np.tile(["z", "a", "x"], 4), categories=["z", "x", "a", "never"]),
            ("z", "x", "a"),
        ),
    ],
    ids=["float", "int", "str", "string", "bool", "categorical"],
)
def test_grouping_column_is_a_factor_whatever_its_dtype(rng, values, levels):
    data = pd.DataFrame({"y": rng.normal(size=12), "g": values})
    (term,) = build_model(data, "y ~ 1 + (1 | g)").terms
    assert term.levels == levels
    labels = np.asarray(term.levels)[term.refs]
    raw = pd.Series(values).map(label).to_numpy()
    np.testing.assert_array_equal(labels, raw)


def test_float_grouping_column_is_not_binned(rng):
    """Close float values are distinct levels; equal ones are the same level."""
    g = np.array([0.1, 0.1 + 1e-12, 0.2, 0.1, 0.2, 0.1 + 1e-12])
    data = pd.DataFrame({"y": rng.normal(size=6), "g": g})
    (term,) = build_model(data, "y ~ 1 + (1 | g)").terms
    assert term.nlevels == 3
    np.testing.assert_array_equal(term.refs, [0, 1, 2, 0, 2, 1])


def test_categorical_columns(rng):
    n = 24
    data = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "k": np.tile([3, 1, 2], n // 3),
            "r": np.tile([0.5, 1.5], n // 2),
            "g": np.repeat(np.arange(4), n // 4),
        }
    )
    model = build_model(data, "y ~ k + r + (1 | g)", categorical=["k", "r"])
    assert model.fixef_names == ("(Intercept)", "k2", "k3", "r1.5")
    np.testing.assert_array_equal(model.X[:, 1], (data.k == 2).to_numpy(dtype=float))
    np.testing.assert_array_equal(model.X[:, 3], (data.r == 1.5).to_numpy(dtype=float))
    # a categorical column the formula does not use is accepted and ignored
    model = build_model(data, "y ~ r + (1 | g)", categorical=["k"])
    assert model.fixef_names == ("(Intercept)", "r")


def test_pandas_categorical_sets_reference_level(rng):
    data = pd.DataFrame(
        {
            "y": rng.normal(size=12),
            "f": pd.Categorical(np.tile(["lo", "mid", "hi"], 4), categories=["lo", "mid", "hi"]),
            "g": np.repeat(["a", "b"], 6),
        }
    )
    model = build_model(data, "y ~ f + (1 | g)")
    assert model.fixef_names == ("(Intercept)", "fmid", "fhi")


# --------------------------------------------------------------------------------------
# missing values and rank deficiency
# --------------------------------------------------------------------------------------


def test_missing_values_dropped_with_count(rng):
    n = 20
    data = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "g": np.tile(["a", "b", "c", "d"], n // 4),
            "other": rng.normal(size=n),
        }
    )
    data.loc[[1, 2], "y"] = np.nan
    data.loc[[2, 7], "x"] = np.nan  # row 2 misses both
    data.loc[11, "g"] = None
    data.loc[[0, 5], "other"] = np.nan  # not used by the formula
    with pytest.warns(UserWarning) as record:
        model = build_model(data, "y ~ x + (1 | g)")
    (warning,) = [w for w in record if "missing" in str(w.message)]
    message = str(warning.message)
    assert "removed 4 of 20 rows" in message
    assert "y (2)" in message and "x (2)" in message and "g (1)" in message
    assert "other" not in message
    assert model.n_dropped == 4 and model.nobs == 16
    keep = np.setdiff1d(np.arange(n), [1, 2, 7, 11])
    np.testing.assert_array_equal(model.y, data.y.to_numpy()[keep])
    np.testing.assert_array_equal(model.X[:, 1], data.x.to_numpy()[keep])
    assert "(4 rows with missing values removed)" in model.describe()


def test_no_missing_values_no_warning(rng):
    data = pd.DataFrame({"y": rng.normal(size=8), "g": np.tile(["a", "b"], 4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(data, "y ~ 1 + (1 | g)")
    assert model.n_dropped == 0
    assert "missing" not in model.describe()


def test_rank_deficient_x_drops_aliased_columns(rng):
    n = 30
    x1 = rng.normal(size=n)
    data = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x1": x1,
            "x2": 2.0 * x1,  # aliased with x1
            "x3": rng.normal(size=n),
            "g": np.tile(["a", "b", "c"], n // 3),
        }
    )
    with pytest.warns(UserWarning, match="rank deficient") as record:
        model = build_model(data, "y ~ x1 + x2 + x3 + (1 | g)")
    message = str(record[0].message)
    assert "dropping 1 column" in message and "x2" in message
    assert model.dropped_fixef == ("x2",)
    assert model.fixef_names == ("(Intercept)", "x1", "x3")
    np.testing.assert_array_equal(model.X, np.column_stack([np.ones(n), x1, data.x3]))
    assert "dropped (rank deficient): x2" in model.describe()


def test_rank_deficient_factor_columns(rng):
    """Two codings of the same factor: the second one's columns are aliased."""
    data = pd.DataFrame(
        {
            "y": rng.normal(size=12),
            "f": np.tile(["a", "b", "c"], 4),
            "f2": np.tile(["p", "q", "r"], 4),
            "g": np.repeat(["g1", "g2"], 6),
        }
    )
    with pytest.warns(UserWarning, match="dropping 2 columns") as record:
        model = build_model(data, "y ~ f + f2 + (1 | g)")
    assert model.dropped_fixef == ("f2q", "f2r")
    assert "f2q, f2r" in str(record[0].message)
    assert model.p == 3


# --------------------------------------------------------------------------------------
# dims() and describe()
# --------------------------------------------------------------------------------------


def test_dims_sleepstudy():
    model = build_model(load_bundled("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
    assert model.dims() == {
        "nobs": 180,
        "p": 2,
        "q": 36,
        "ntheta": 3,
        "terms": [
            {
                "group": "Subject",
                "names": ["(Intercept)", "Days"],
                "levels": 18,
                "d": 2,
                "ntheta": 3,
            }
        ],
    }
    assert (model.nobs, model.p, model.q, model.ntheta) == (180, 2, 36, 3)
    assert model.ngroups == {"Subject": 18}
    assert model.response == "Reaction"


def test_describe_pastes():
    model = build_model(load_bundled("Pastes"), "strength ~ 1 + (1 | batch/cask)")
    text = model.describe()
    lines = text.splitlines()
    assert lines[0] == "Linear mixed model: strength ~ 1 + (1 | batch/cask)"
    assert "observations N = 60" in text
    assert "fixed effects p = 1: (Intercept)" in text
    assert "random effects q = 40, covariance parameters = 2" in text
    rows = [line.split() for line in lines if line.strip().startswith(("cask:batch", "batch"))]
    assert rows == [
        ["cask:batch", "30", "1", "1", "(Intercept)"],
        ["batch", "10", "1", "1", "(Intercept)"],
    ]


# --------------------------------------------------------------------------------------
# bad input: one test per case, each error naming the culprit
# --------------------------------------------------------------------------------------


@pytest.fixture
def small(rng):
    n = 12
    return pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x": rng.normal(size=n),
            "name": np.tile(["ann", "bob", "cy"], n // 3),
            "g": np.tile(["a", "b"], n // 2),
            "one": ["only"] * n,
        }
    )


def test_bad_formula_syntax_shows_position(small):
    text = "y ~ x + (1 | g"
    with pytest.raises(LmmInputError) as info:
        build_model(small, text)
    lines = str(info.value).splitlines()
    assert lines[0] == "formula syntax error at position 9: unclosed '('"
    assert lines[1] == f"  {text}"
    assert lines[2] == "  " + " " * 8 + "^"


@pytest.mark.parametrize(
    ("formula", "column", "where"),
    [
        ("yy ~ x + (1 | g)", "yy", "the response"),
        ("y ~ x + xx + (1 | g)", "xx", "the fixed effects"),
        ("y ~ log(xx) + (1 | g)", "xx", "the fixed effects"),
        ("y ~ x + (1 + xx | g)", "xx", "the random-effect term '(1 + xx | g)'"),
        ("y ~ x + (1 | gg)", "gg", "the random-effect term '(1 | gg)'"),
        ("y ~ x + (1 | g/hh)", "hh", "the random-effect term '(1 | g/hh)'"),
    ],
)
def test_unknown_column(small, formula, column, where):
    with pytest.raises(LmmInputError) as info:
        build_model(small, formula)
    message = str(info.value)
    assert message.startswith(f"unknown column {column!r} in {where}")
    assert "the data has: g, name, one, x, y" in message


@pytest.mark.parametrize(
    "values",
    [
        np.tile(["1.0", "2.0", "3.5"], 4),
        np.tile([True, False], 6),
        pd.Categorical(np.tile(["a", "b", "c"], 4)),
    ],
    ids=["str", "bool", "categorical"],
)
def test_non_numeric_response(small, values):
    small["resp"] = values
    with pytest.raises(LmmInputError) as info:
        build_model(small, "resp ~ x + (1 | g)")
    message = str(info.value)
    assert message.startswith("response 'resp' is not numeric")


def test_grouping_factor_with_single_level(small):
    with pytest.raises(LmmInputError) as info:
        build_model(small, "y ~ x + (1 | g) + (1 | one)")
    message = str(info.value)
    assert "grouping factor 'one'" in message
    assert "'(1 | one)'" in message and "single level ('only')" in message


def test_single_level_after_missing_values_removed(small):
    small.loc[small.g == "b", "x"] = np.nan
    with pytest.warns(UserWarning, match="removed 6 of 12"):
        with pytest.raises(LmmInputError, match="grouping factor 'g'.*single level"):
            build_model(small, "y ~ x + (1 | g)")


def test_empty_after_missing_values_removed(small):
    small["y"] = np.nan
    with pytest.warns(UserWarning, match="removed 12 of 12 rows"):
        with pytest.raises(LmmInputError) as info:
            build_model(small, "y ~ x + (1 | g)")
    message = str(info.value)
    assert message.startswith("no rows left after removing 12 rows with missing values")
    assert "y, x, g" in message


def test_unknown_categorical_column(small):
    with pytest.raises(LmmInputError) as info:
        build_model(small, "y ~ x + (1 | g)", categorical=["g", "colour"])
    assert str(info.value) == "categorical column 'colour' is not in the data"


def test_data_not_a_dataframe():
    with pytest.raises(LmmInputError, match="pandas DataFrame, got dict"):
        build_model({"y": [1.0, 2.0]}, "y ~ 1 + (1 | g)")


def test_formula_without_random_effects_is_refused():
    with pytest.raises(LmmInputError, match="no random-effect terms"):
        build_model(load_bundled("sleepstudy"), "Reaction ~ Days")


def test_drop_aliased_false_keeps_more_columns_than_rows():
    """A candidate set wider than N (the sparse selector's input) is kept whole."""
    rng = np.random.default_rng(5)
    n, p = 30, 40
    df = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"x{k}" for k in range(p)])
    df["y"] = rng.normal(size=n)
    df["g"] = np.repeat(np.arange(6), 5)
    formula = "y ~ " + " + ".join(df.columns[:p]) + " + (1 | g)"
    model = build_model(df, formula, drop_aliased=False)
    assert model.X.shape == (n, p + 1) and not model.dropped_fixef and not model.full_rank
    with pytest.raises(LmmInputError, match="needs a full-rank fixed-effect matrix"):
        fit_reml(model)
    with pytest.warns(UserWarning, match="rank deficient"):
        assert build_model(df, formula).p == n


def test_dot_means_every_column_not_named_elsewhere():
    rng = np.random.default_rng(3)
    df = pd.DataFrame(rng.standard_normal((40, 5)), columns=["y", "a", "b", "z", "my col"])
    df["g"] = np.repeat(np.arange(8), 5)
    dot = build_model(df, "y ~ . + (0 + z | g)")
    explicit = build_model(df, "y ~ a + b + `my col` + (0 + z | g)")
    assert dot.fixef_names == explicit.fixef_names == ("(Intercept)", "a", "b", "my col")
    np.testing.assert_array_equal(dot.X, explicit.X)
    assert build_model(df, "y ~ . - b + (1 | g)").fixef_names == ("(Intercept)", "a", "z", "my col")
    assert build_model(df, "y ~ 0 + a + . + (1 | g)").fixef_names == ("a", "b", "z", "my col")


@pytest.mark.parametrize(
    ("top", "n"),
    [(1, 5), (60, 1000), (10**9, 2000), (2**40, 3000), (2**27, 300_000), (5, 0)],
    ids=["one", "dense", "sparse", "wide", "radix-2-digits", "empty"],
)
def test_unique_inverse_is_numpys(rng, top, n):
    """Counted where the range is dense, radix-sorted where not: the same as np.unique."""
    key = rng.integers(0, top, n)
    uniq, inverse = unique_inverse(key)
    want, want_inverse = np.unique(key, return_inverse=True)
    np.testing.assert_array_equal(uniq, want)
    np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))


def test_interaction_levels_in_lexicographic_order():
    data = pd.DataFrame({"a": ["y", "x", "y", "x", "y"], "b": [2, 10, 10, 2, 2]})
    refs, names = group_index(data, ["a", "b"])
    assert names == ("x:2", "x:10", "y:2", "y:10")  # numeric levels sort as numbers, as R
    np.testing.assert_array_equal(refs, [2, 1, 3, 0, 2])

"""Tests of the lme4 formula layer: bar splitting, expansions and lme4-style names.

Every expected value here was worked out by hand from lme4's rules:
``(x || g)`` is ``(1 | g) + (0 + x | g)``, ``(1 | a/b)`` is ``(1 | a) + (1 | b:a)``
with levels labelled inner factor first (``"a:A"``), and fixed-effect columns are
named as R's ``model.matrix`` names them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmmjax.datasets import load_bundled
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError
from lmmjax.formula import BarTerm, lme4_name, parse_formula, required_columns


@pytest.fixture
def df(rng):
    """Small data set: numeric x1, x2, x (positive), string factors, int codes."""
    n = 24
    return pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "x": rng.uniform(0.5, 2.0, size=n),
            "Sex": np.tile(["Male", "Female", "Female"], n // 3),
            "service": np.tile([0, 1], n // 2),
            "f": np.tile(["c", "a", "b"], n // 3),
            "g": np.repeat(["g1", "g2", "g3", "g4"], n // 4),
            "h": np.tile(["h1", "h2", "h3"], n // 3),
        }
    )


def bars(text: str) -> list[tuple[str, tuple[str, ...], bool]]:
    return [(b.lhs, b.factors, b.uncorrelated) for b in parse_formula(text).bars]


# --------------------------------------------------------------------------------------
# parse_formula: the split into response, fixed part and bar terms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("y ~ x1 + x2 + x1:x2", "x1 + x2 + x1:x2"),
        ("y ~ x1*x2", "x1*x2"),
        ("y ~ 0 + x1", "0 + x1"),
        ("y ~ x1 - 1", "x1 - 1"),
        ("y ~ I(x^2) + log(x) + C(f)", "I(x^2) + log(x) + C(f)"),
        ("y ~ x1 + (1 | g) + x2", "x1 + x2"),
        ("y ~ (1 | g)", "1"),
        ("y ~ 1 + (1 | g)", "1"),
        ("y ~ x1 + (1 | g) - 1", "x1 - 1"),
    ],
)
def test_fixed_part(text, fixed):
    parsed = parse_formula(text)
    assert parsed.response == "y"
    assert parsed.fixed == fixed
    assert parsed.text == text


def test_leading_minus_one_keeps_formula_valid():
    parsed = parse_formula("y ~ -1 + x1 + (1 | g)")
    assert parsed.fixed.replace(" ", "") in {"1-1+x1", "-1+x1"}
    assert required_columns(parsed.fixed, context="test") == {"x1"}


def test_response_expression():
    parsed = parse_formula("log(y) ~ x1 + (1 | g)")
    assert parsed.response == "log(y)"
    assert parsed.fixed == "x1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("y ~ x + (1 | g)", [("1", ("g",), False)]),
        ("y ~ x + (1 + x | g)", [("1 + x", ("g",), False)]),
        ("y ~ x + (0 + x | g)", [("0 + x", ("g",), False)]),
        ("y ~ x + (1+x|g)", [("1+x", ("g",), False)]),
        ("y ~ x + (x || g)", [("x", ("g",), True)]),
        ("y ~ (1 | a:b)", [("1", ("a", "b"), False)]),
        ("y ~ (1 | a/b)", [("1", ("a",), False), ("1", ("b", "a"), False)]),
        (
            "y ~ (1 | a/b/c)",
            [("1", ("a",), False), ("1", ("b", "a"), False), ("1", ("c", "b", "a"), False)],
        ),
        ("y ~ (x || a/b)", [("x", ("a",), True), ("x", ("b", "a"), True)]),
        ("y ~ (1 | g) + (1 | h)", [("1", ("g",), False), ("1", ("h",), False)]),
        ("y ~ (1 | g) + (0 + x | g)", [("1", ("g",), False), ("0 + x", ("g",), False)]),
        ("y ~ (1 | `my group`)", [("1", ("my group",), False)]),
    ],
)
def test_bar_terms(text, expected):
    assert bars(text) == expected


def test_bar_term_group_names_as_lme4_prints_them():
    parsed = parse_formula("y ~ (1 | batch/cask) + (1 | a:b)")
    assert [b.group for b in parsed.bars] == ["batch", "cask:batch", "a:b"]
    assert all(b.source in {"(1 | batch/cask)", "(1 | a:b)"} for b in parsed.bars)
    assert isinstance(parsed.bars[0], BarTerm)


def test_bar_outside_parentheses_is_an_error():
    with pytest.raises(LmmInputError, match="inside parentheses"):
        parse_formula("y ~ x | g")


# --------------------------------------------------------------------------------------
# parse errors: a message with the position and a caret line under it
# --------------------------------------------------------------------------------------


def caret_position(message: str, text: str) -> int:
    """0-based column of the caret, checking the three-line layout."""
    lines = message.splitlines()
    assert len(lines) == 3, message
    assert lines[1] == f"  {text}"
    assert lines[2].strip() == "^"
    pos = lines[2].index("^") - 2
    assert f"at position {pos + 1}:" in lines[0]
    return pos


@pytest.mark.parametrize(
    ("text", "pos", "fragment"),
    [  # pos: 0-based column of the offending character, counted by hand
        ("y ~ (x +", 4, "unclosed '('"),
        ("y ~ x)", 5, "unmatched ')'"),
        ("y ~ x + (1 | )", 11, "no grouping factor"),
        ("y ~ x + (| g)", 9, "no left-hand side"),
        ("y ~ x ~ z", 6, "exactly one '~'"),
        ("~ x", 0, "missing response"),
        ("y ~ x | g", 6, "inside parentheses"),
        ("y ~ (1 | g | h)", 11, "more than one '|'"),
        ("y ~ (1 |  g+h)", 10, "grouping factor 'g+h'"),
        ("y ~ x + (1 | g/)", 13, "grouping factor 'g/'"),
        ("y ~ x + (1 | 2g)", 13, "grouping factor '2g'"),
        ("y ~ x - (1 | g)", 6, "cannot be subtracted"),
        ("y ~ x +", 6, "missing term after '+'"),
    ],
)
def test_parse_error_shows_position(text, pos, fragment):
    with pytest.raises(LmmInputError) as info:
        parse_formula(text)
    message = str(info.value)
    assert message.startswith("formula syntax error at position")
    assert fragment in message
    assert caret_position(message, text) == pos


def test_formulaic_syntax_error_keeps_position(df):
    """Errors that formulaic finds in the fixed part also point at the token."""
    with pytest.raises(LmmInputError) as info:
        build_model(df, "y ~ x1 +* x2 + (1 | g)")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("fixed-effect formula")
    assert "(at position 4)" in lines[0]
    assert lines[2].index("^") - 2 == lines[1][2:].index("+")


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_formula(text):
    with pytest.raises(LmmInputError, match="non-empty string"):
        parse_formula(text)


# --------------------------------------------------------------------------------------
# fixed-effect model matrices and their lme4 names
# --------------------------------------------------------------------------------------


def fixed(df, text, categorical=()):
    model = build_model(df, text + " + (1 | g)", categorical=categorical)
    return model.fixef_names, model.X


def test_main_effects_and_interaction(df):
    names, X = fixed(df, "y ~ x1 + x2 + x1:x2")
    assert names == ("(Intercept)", "x1", "x2", "x1:x2")
    expected = np.column_stack([np.ones(len(df)), df.x1, df.x2, df.x1 * df.x2])
    np.testing.assert_allclose(X, expected, rtol=0, atol=1e-15)


def test_star_expands_to_main_effects_and_interaction(df):
    assert fixed(df, "y ~ x1*x2")[0] == ("(Intercept)", "x1", "x2", "x1:x2")
    np.testing.assert_array_equal(fixed(df, "y ~ x1*x2")[1], fixed(df, "y ~ x1 + x2 + x1:x2")[1])


@pytest.mark.parametrize("text", ["y ~ 0 + x1 + x2", "y ~ x1 + x2 - 1", "y ~ -1 + x1 + x2"])
def test_no_intercept(df, text):
    names, X = fixed(df, text)
    assert names == ("x1", "x2")
    np.testing.assert_array_equal(X, df[["x1", "x2"]].to_numpy())


def test_intercept_only(df):
    names, X = fixed(df, "y ~ 1")
    assert names == ("(Intercept)",)
    np.testing.assert_array_equal(X, np.ones((len(df), 1)))


@pytest.mark.parametrize(
    ("term", "name"),
    [("I(x^2)", "I(x^2)"), ("I(x**2)", "I(x**2)"), ("I(x ^ 2)", "I(x ^ 2)")],
)
def test_identity_power_named_as_written(df, term, name):
    names, X = fixed(df, f"y ~ x + {term}")
    assert names == ("(Intercept)", "x", name)
    np.testing.assert_allclose(X[:, 2], df.x.to_numpy() ** 2, rtol=1e-15)


def test_two_identity_calls_and_interaction(df):
    names, X = fixed(df, "y ~ I(x^2) + I(x^3) + I(x^2):x1")
    assert names == ("(Intercept)", "I(x^2)", "I(x^3)", "I(x^2):x1")
    x = df.x.to_numpy()
    np.testing.assert_allclose(X[:, 2], x**3, rtol=1e-15)
    np.testing.assert_allclose(X[:, 3], x**2 * df.x1.to_numpy(), rtol=1e-15)


def test_log(df):
    names, X = fixed(df, "y ~ log(x)")
    assert names == ("(Intercept)", "log(x)")
    np.testing.assert_allclose(X[:, 1], np.log(df.x.to_numpy()), rtol=1e-15)


def test_C_of_string_column(df):
    names, X = fixed(df, "y ~ C(f)")
    # levels a < b < c; treatment contrasts against a, as R's factor()
    assert names == ("(Intercept)", "C(f)b", "C(f)c")
    np.testing.assert_array_equal(X[:, 1], (df.f == "b").to_numpy(dtype=float))
    np.testing.assert_array_equal(X[:, 2], (df.f == "c").to_numpy(dtype=float))


def test_C_of_integer_column(df):
    names, X = fixed(df, "y ~ C(service)")
    assert names == ("(Intercept)", "C(service)1")
    np.testing.assert_array_equal(X[:, 1], df.service.to_numpy(dtype=float))


def test_string_column_is_a_factor_named_like_lme4(df):
    names, X = fixed(df, "y ~ Sex")
    assert names == ("(Intercept)", "SexMale")
    np.testing.assert_array_equal(X[:, 1], (df.Sex == "Male").to_numpy(dtype=float))


def test_factor_without_intercept_has_all_levels(df):
    names, _ = fixed(df, "y ~ 0 + Sex")
    assert names == ("SexFemale", "SexMale")


def test_factor_by_numeric_interaction(df):
    names, X = fixed(df, "y ~ Sex*x1")
    assert names == ("(Intercept)", "SexMale", "x1", "SexMale:x1")
    male = (df.Sex == "Male").to_numpy(dtype=float)
    np.testing.assert_allclose(X[:, 3], male * df.x1.to_numpy(), rtol=1e-15)


def test_categorical_integer_column(df):
    names, X = fixed(df, "y ~ service", categorical=["service"])
    assert names == ("(Intercept)", "service1")
    np.testing.assert_array_equal(X[:, 1], df.service.to_numpy(dtype=float))
    # without categorical= an integer column is numeric
    assert fixed(df, "y ~ service")[0] == ("(Intercept)", "service")


def test_categorical_with_three_integer_levels(rng):
    data = pd.DataFrame(
        {
            "y": rng.normal(size=12),
            "k": np.tile([10, 2, 9], 4),  # numeric order 2 < 9 < 10, as R's factor()
            "g": np.repeat(["a", "b"], 6),
        }
    )
    model = build_model(data, "y ~ k + (1 | g)", categorical=["k"])
    assert model.fixef_names == ("(Intercept)", "k9", "k10")


def test_response_expression_is_evaluated(df):
    model = build_model(df, "log(x) ~ x1 + (1 | g)")
    assert model.response == "log(x)"
    np.testing.assert_allclose(model.y, np.log(df.x.to_numpy()), rtol=1e-15)


def test_lme4_name_helper():
    assert lme4_name("Intercept") == "(Intercept)"
    assert lme4_name("Sex[T.Male]") == "SexMale"
    assert lme4_name("Sex[Male]") == "SexMale"
    assert lme4_name("Sex[T.Male]:x") == "SexMale:x"
    assert lme4_name("I(x ** 2)", {"I(x**2)": "I(x^2)"}) == "I(x^2)"


# --------------------------------------------------------------------------------------
# random-effect terms built from the bars
# --------------------------------------------------------------------------------------


def level_index(values) -> np.ndarray:
    """Rank of each value among the sorted distinct values (a factor's codes)."""
    return np.unique(np.asarray(values), return_inverse=True)[1].reshape(-1)


def test_random_intercept(df):
    (term,) = build_model(df, "y ~ x1 + (1 | g)").terms
    assert (term.group, term.names, term.d, term.ntheta) == ("g", ("(Intercept)",), 1, 1)
    assert term.levels == ("g1", "g2", "g3", "g4")
    assert term.refs.dtype == np.int32
    np.testing.assert_array_equal(term.refs, level_index(df.g))
    np.testing.assert_array_equal(term.z, np.ones((len(df), 1)))


def test_correlated_slope(df):
    (term,) = build_model(df, "y ~ x1 + (1 + x1 | g)").terms
    assert term.names == ("(Intercept)", "x1")
    assert (term.d, term.ntheta, term.q) == (2, 3, 8)
    np.testing.assert_array_equal(term.z, np.column_stack([np.ones(len(df)), df.x1]))
    # theta holds Lambda's lower triangle column by column: (0,0), (1,0), (1,1)
    rows, cols = term.theta_index()
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 0), (1, 1)]
    np.testing.assert_array_equal(term.theta_init(), [1.0, 0.0, 1.0])
    # the same term written as (x1 | g): the intercept is implicit
    (same,) = build_model(df, "y ~ x1 + (x1 | g)").terms
    assert same.names == term.names
    np.testing.assert_array_equal(same.z, term.z)


def test_slope_without_intercept(df):
    (term,) = build_model(df, "y ~ x1 + (0 + x1 | g)").terms
    assert term.names == ("x1",)
    np.testing.assert_array_equal(term.z[:, 0], df.x1.to_numpy())


def test_factor_in_bar_lhs(df):
    (term,) = build_model(df, "y ~ 1 + (0 + Sex | g)").terms
    assert term.names == ("SexFemale", "SexMale")
    np.testing.assert_array_equal(term.z[:, 1], (df.Sex == "Male").to_numpy(dtype=float))


def test_double_bar_splits_into_scalar_terms(df):
    terms = build_model(df, "y ~ x1 + (x1 || g)").terms
    assert [t.group for t in terms] == ["g", "g"]
    assert [t.names for t in terms] == [("(Intercept)",), ("x1",)]
    assert all(t.d == 1 and t.ntheta == 1 for t in terms)
    np.testing.assert_array_equal(terms[0].z[:, 0], np.ones(len(df)))
    np.testing.assert_array_equal(terms[1].z[:, 0], df.x1.to_numpy())
    np.testing.assert_array_equal(terms[0].refs, terms[1].refs)


def test_double_bar_with_three_columns(df):
    terms = build_model(df, "y ~ 1 + (1 + x1 + x2 || g)").terms
    assert [t.names for t in terms] == [("(Intercept)",), ("x1",), ("x2",)]
    assert sum(t.ntheta for t in terms) == 3


def test_nested_pastes_as_lme4():
    """(1 | batch/cask) is (1 | batch) + (1 | cask:batch), levels like lme4's ranef."""
    data = load_bundled("Pastes")
    model = build_model(data, "strength ~ 1 + (1 | batch/cask)")
    assert [t.group for t in model.terms] == ["cask:batch", "batch"]
    assert model.ngroups == {"cask:batch": 30, "batch": 10}
    nested, outer = model.terms
    # lme4: ranef(m)$`cask:batch` rows begin a:A, a:B, ..., a:J, b:A, ...
    assert nested.levels[:5] == ("a:A", "a:B", "a:C", "a:D", "a:E")
    assert nested.levels[10] == "b:A"
    assert outer.levels == tuple("ABCDEFGHIJ")
    labels = np.asarray(nested.levels)[nested.refs]
    np.testing.assert_array_equal(labels, (data.cask + ":" + data.batch).to_numpy())
    np.testing.assert_array_equal(np.asarray(outer.levels)[outer.refs], data.batch.to_numpy())


def test_nested_equals_explicit_interaction(df):
    nested = build_model(df, "y ~ 1 + (1 | g/h)").terms
    explicit = build_model(df, "y ~ 1 + (1 | g) + (1 | h:g)").terms
    assert [t.group for t in nested] == [t.group for t in explicit] == ["h:g", "g"]
    for a, b in zip(nested, explicit, strict=True):
        assert a.levels == b.levels
        np.testing.assert_array_equal(a.refs, b.refs)


def test_interaction_factor(df):
    (term,) = build_model(df, "y ~ 1 + (1 | g:h)").terms
    assert term.group == "g:h"
    # the 12 combinations present, first factor varying slowest (R's a:b order)
    assert term.levels == tuple(f"g{i}:h{j}" for i in range(1, 5) for j in range(1, 4))
    labels = np.asarray(term.levels)[term.refs]
    np.testing.assert_array_equal(labels, (df.g + ":" + df.h).to_numpy())


def test_interaction_drops_absent_combinations(rng):
    data = pd.DataFrame(
        {"y": rng.normal(size=6), "a": ["p", "p", "q", "q", "r", "r"], "b": list("uvuvuu")}
    )
    (term,) = build_model(data, "y ~ 1 + (1 | a:b)").terms
    assert term.levels == ("p:u", "p:v", "q:u", "q:v", "r:u")


def test_crossed_terms_penicillin():
    data = load_bundled("Penicillin")
    for text in (
        "diameter ~ 1 + (1 | plate) + (1 | sample)",
        "diameter ~ 1 + (1 | sample) + (1 | plate)",
    ):
        model = build_model(data, text)
        assert [t.group for t in model.terms] == ["plate", "sample"]
        assert model.ngroups == {"plate": 24, "sample": 6}
        assert model.terms[1].levels == tuple("ABCDEF")


def test_two_terms_on_the_same_factor(df):
    terms = build_model(df, "y ~ x1 + (1 | g) + (0 + x1 | g)").terms
    assert [(t.group, t.names) for t in terms] == [("g", ("(Intercept)",)), ("g", ("x1",))]


def test_terms_ordered_by_decreasing_levels(rng):
    n = 60
    data = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "a": np.tile(np.arange(3), n // 3),
            "b": np.tile(np.arange(10), n // 10),
            "c": np.tile(np.arange(5), n // 5),
            "d": np.tile(np.arange(5), n // 5)[::-1],
        }
    )
    model = build_model(data, "y ~ 1 + (1 | a) + (1 | c) + (1 | b) + (1 | d)")
    # ties (c and d, 5 levels each) keep their order in the formula
    assert [t.group for t in model.terms] == ["b", "c", "d", "a"]
    assert [t.nlevels for t in model.terms] == [10, 5, 5, 3]


def test_sleepstudy_names_match_lme4():
    model = build_model(load_bundled("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
    assert model.fixef_names == ("(Intercept)", "Days")
    (term,) = model.terms
    assert term.names == ("(Intercept)", "Days")
    assert model.ngroups == {"Subject": 18}
    assert term.levels[:5] == ("308", "309", "310", "330", "331")  # lme4's ranef order


def test_grouping_column_keeps_its_type_in_the_fixed_part():
    model = build_model(load_bundled("sleepstudy"), "Reaction ~ Days + (1 | Subject) + (1 | Days)")
    assert model.fixef_names == ("(Intercept)", "Days")
    assert [t.group for t in model.terms] == ["Subject", "Days"]

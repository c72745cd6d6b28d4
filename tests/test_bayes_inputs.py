"""Bad NUTS input fails early, with one line, and where the fit would (issue 12's table)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import lmmjax
from lmmjax.bayes import fit_nuts
from lmmjax.datasets import load_data
from lmmjax.design import build_model
from lmmjax.errors import LmmInputError

SLEEP = "Reaction ~ Days + (Days | Subject)"


def _check(tmp_path, nuts_section: str):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        data: bundled:sleepstudy
        formula: {SLEEP}
        method: nuts
        nuts:
        """) + textwrap.indent(textwrap.dedent(nuts_section), "  "))  # fmt: skip
    return subprocess.run([sys.executable, "-m", "lmmjax.fit", str(cfg), "--check"],
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("priors: {sigmaa: {scale: 1}}\n", "unknown prior parameter 'sigmaa'"),
        ("priors: {sigma: {dist: Cauchy, scale: 1}}\n", "distribution 'Cauchy' not available"),
        ("marginalize: [Subjet]\n", "marginalize: 'Subjet' is not a grouping factor"),
        ("fixed_scales: {Subjet: 1.0}\n", "fixed_scales: 'Subjet'"),
    ],
)
def test_check_fails_where_the_fit_would(tmp_path, section, message):
    out = _check(tmp_path, section)
    assert out.returncode == 2, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_check_passes_a_good_nuts_config(tmp_path):
    out = _check(tmp_path, "marginalize: [Subject]\npriors: {sigma: {scale: 30}}\n")
    assert out.returncode == 0 and "config OK" in out.stdout, out.stderr


def test_fit_nuts_takes_a_model_or_a_fit_but_not_a_formula():
    model = build_model(load_data("bundled:sleepstudy"), SLEEP)
    with pytest.raises(LmmInputError, match="not a formula; to fit from a formula use"):
        fit_nuts(SLEEP)
    with pytest.raises(LmmInputError, match="got int"):
        fit_nuts(3)
    reml = lmmjax.fit_reml(model)
    fit = fit_nuts(reml, num_chains=1, num_warmup=20, num_samples=10, progress_bar=False)
    assert fit.model is model


@pytest.mark.parametrize(("key", "value"), [("num_chains", -1), ("target_accept", 2.0)])
def test_sampler_options_are_checked(key, value):
    with pytest.raises(LmmInputError, match=key):
        lmmjax.lmm(SLEEP, "bundled:sleepstudy", method="nuts", **{key: value})

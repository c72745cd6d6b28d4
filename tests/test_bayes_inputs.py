"""Bad NUTS input fails early, with one line, and where the fit would (issue 12's table)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from scipy import stats

import lmmjax
from lmmjax.bayes import fit_nuts
from lmmjax.bayes.priors import Prior, PriorSet, resolve_priors, to_distribution
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
        ("priors: {b: 'normal(0)'}\n", "prior 'b': normal takes 2 argument(s)"),
        ("priors: {sd: 'normal(1, 5)'}\n", "prior 'sd': an SD's prior is a half distribution"),
        ("priors: {b_Dayz: 'normal(0, 5)'}\n", "prior 'b_Dayz': no fixed effect 'Dayz'"),
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


def test_brms_names_and_stan_strings_are_the_same_priors():
    defaults = PriorSet(
        beta=Prior("normal", loc=(0.0, 0.0), scale=(1.0, 1.0)),
        sigma=Prior("halfnormal", scale=(1.0,)),
        sd=(Prior("halfnormal", scale=(1.0, 1.0)),),
        corr=(Prior("lkj", scale=(1.0,)),),
    )
    args = (["(Intercept)", "Days"], ["Subject"], ["Subject"])
    ours = {"beta": {"dist": "student_t", "df": 3, "loc": 0, "scale": 10},
            "beta[(Intercept)]": {"loc": 250, "scale": 50},
            "sd_Subject": {"dist": "halfcauchy", "scale": 5},
            "sigma": {"dist": "exponential", "rate": 0.1}, "corr": {"eta": 2.0}}  # fmt: skip
    brms = {"b": "student_t(3, 0, 10)", "Intercept": "student_t(3, 250, 50)",
            "sd_Subject": "cauchy(0, 5)", "sigma": "exponential(0.1)", "cor": "lkj(2)"}  # fmt: skip
    want = resolve_priors(defaults, ours, *args)
    assert resolve_priors(defaults, brms, *args) == want
    assert want.beta.loc == (250.0, 0.0) and want.beta.df == (3.0, 3.0)
    assert resolve_priors(defaults, {"b[Days]": "normal(1, 2)"}, *args).beta.loc == (0.0, 1.0)
    # brms's class b leaves the intercept's prior alone; one effect's SD by its brms name
    only_b = resolve_priors(defaults, {"b": "normal(5, 2)"}, *args)
    assert only_b.beta.loc == (0.0, 5.0) and only_b.beta.scale == (1.0, 2.0)
    # brms's usual pair: a Student-t Intercept beside Normal coefficients, and the reverse
    mixed = resolve_priors(defaults, {"Intercept": "student_t(3, 250, 50)",
                                      "b": "normal(0, 10)"}, *args).beta  # fmt: skip
    assert mixed.to_dict()["dist"] == ["student_t", "normal"] and mixed.df == (3.0, np.inf)
    value = np.array([240.0, 3.0])
    want_lp = [stats.t.logpdf(240.0, 3, 250, 50), stats.norm.logpdf(3.0, 0, 10)]
    assert np.allclose(to_distribution(mixed).log_prob(value), want_lp, rtol=1e-12)
    draws = to_distribution(mixed).sample(jax.random.PRNGKey(0), (20000,))
    assert abs(np.median(draws[:, 0]) - 250) < 3 and abs(np.std(draws[:, 1]) - 10) < 0.3
    t_b = resolve_priors(defaults, {"b": "student_t(3, 0, 1)"}, *args).beta
    assert t_b.df == (np.inf, 3.0) and t_b.loc == (0.0, 0.0)
    # naming a family on one element of a mixed prior sets that element alone
    back = resolve_priors(defaults, {"Intercept": "normal(1, 2)", "b": "normal(0, 10)"}, *args)
    assert back.beta.family == "normal" and back.beta.df == ()
    with pytest.raises(LmmInputError, match="a term's SDs share one family"):
        resolve_priors(defaults, {"sd_Subject__Days": "exponential(1)"}, *args,
                       term_effects=[("(Intercept)", "Days")])  # fmt: skip
    one_sd = resolve_priors(defaults, {"sd_Subject__Days": "normal(0, 3)"}, *args,
                            term_effects=[("(Intercept)", "Days")])  # fmt: skip
    assert one_sd.sd[0].scale == (1.0, 3.0)
    with pytest.raises(LmmInputError, match="given twice"):
        resolve_priors(defaults, {"b_Days": "normal(0, 1)", "beta[Days]": {"scale": 2}}, *args)

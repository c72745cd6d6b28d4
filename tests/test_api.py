"""The one entry point: ``lmmjax.lmm`` dispatches through the registry and validates
its options with the same models as the config, and every result is a ``Fit``."""

from __future__ import annotations

import inspect
import warnings

import pytest

import lmmjax
from lmmjax.config import validate_config
from lmmjax.errors import LmmInputError, NotBuiltError
from lmmjax.output import Fit

DYE = ("Yield ~ 1 + (1 | Batch)", "bundled:Dyestuff")

# keys of the JSON result before the methods shared one schema: none may go
SHARED_KEYS = {
    "method", "formula", "nobs", "ngroups", "fixef", "fixef_se", "sigma", "theta", "varcorr",
    "objective", "loglik", "aic", "bic", "converged", "singular", "seconds", "n_dropped",
    "dropped_fixef",
}  # fmt: skip
NUTS_KEYS = {
    "backend", "num_warmup", "num_samples", "num_chains", "target_accept", "max_tree_depth",
    "dense_mass", "seed", "likelihood", "marginalize", "eigen_fast_path", "warmup_seconds",
    "sampling_seconds", "recovery_seconds", "priors",
}  # fmt: skip

BAD = [
    ("reml", {"maxiter": 0}, "maxiter"),
    ("reml", {"gtol": -1.0}, "gtol"),
    ("reml", {"fallback": "no"}, "fallback"),
    ("nuts", {"num_chains": -1}, "num_chains"),
    ("nuts", {"target_accept": 2.0}, "target_accept"),
    ("nuts", {"marginalize": 3}, "marginalize"),
    ("nuts", {"backend": "stan"}, "backend"),
]


@pytest.mark.parametrize(("method", "option", "key"), BAD)
def test_api_rejects_what_the_config_rejects(method, option, key):
    with pytest.raises(LmmInputError, match=f"option '{key}'"):
        lmmjax.lmm(*DYE, method=method, **option)
    section = "reml" if method in ("reml", "ml") else method
    mapping = {"data": DYE[1], "formula": DYE[0], "method": method, section: option}
    with pytest.raises(LmmInputError, match=f"config key '{section}.{key}'"):
        validate_config(mapping)


def test_reml_flag_is_checked_and_maps_to_ml():
    with pytest.raises(LmmInputError, match="option 'reml' must be True or False"):
        lmmjax.lmm(*DYE, reml="no")
    with pytest.raises(LmmInputError, match="contradicts method='nuts'"):
        lmmjax.lmm(*DYE, method="nuts", reml=False)
    with pytest.raises(LmmInputError, match="contradicts method='ml'"):
        lmmjax.lmm(*DYE, method="ml", reml=True)
    assert lmmjax.lmm(*DYE, reml=False).method == "ml"
    assert lmmjax.lmm(*DYE, method="ml").method == "ml"


def test_unknown_and_unbuilt_methods(monkeypatch):
    from lmmjax.methods import METHODS, Method

    with pytest.raises(LmmInputError, match="unknown method 'bayes'"):
        lmmjax.lmm(*DYE, method="bayes")
    monkeypatch.setitem(METHODS, "sparse", Method("sparse", "sparse"))
    with pytest.raises(NotBuiltError, match="'sparse' is not built yet"):
        lmmjax.lmm(*DYE, method="sparse")


def test_signatures_derive_from_the_options():
    from lmmjax.bayes import fit_nuts

    reml_params = inspect.signature(lmmjax.fit_reml).parameters
    assert set(lmmjax.RemlOptions.model_fields) <= set(reml_params)
    assert reml_params["maxiter"].default == lmmjax.RemlOptions().maxiter
    nuts_params = inspect.signature(fit_nuts).parameters
    assert set(lmmjax.NutsOptions.model_fields) <= set(nuts_params)
    assert nuts_params["num_chains"].default == 4


def test_reml_fit_follows_the_protocol():
    fit = lmmjax.lmm(*DYE)
    assert isinstance(fit, Fit) and fit.method == "reml"
    assert isinstance(fit.summary(), str) and "REML criterion" in fit.summary()
    assert SHARED_KEYS <= set(fit.to_dict())
    assert len(repr(fit)) < 200


def test_nuts_in_one_line_follows_the_protocol():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short run may warn about r_hat
        fit = lmmjax.lmm(*DYE, method="nuts", marginalize="all", num_warmup=150,
                         num_samples=100, num_chains=2, progress_bar=False)  # fmt: skip
    assert isinstance(fit, Fit) and fit.method == "nuts"
    text = fit.summary()
    assert isinstance(text, str) and "NUTS" in text and "r_hat" in text
    assert "r_hat" in fit.posterior_summary().columns
    out = fit.to_dict()
    assert SHARED_KEYS <= set(out) and NUTS_KEYS <= set(out["nuts"])
    nuts = out["nuts"]
    assert nuts["warmup_seconds"] >= 0 and nuts["sampling_seconds"] >= 0
    assert 0 <= nuts["compile_seconds"] <= fit.seconds
    assert nuts["grad_evals"]["warmup"] >= 150 and nuts["grad_evals"]["sampling"] >= 2 * 100
    assert nuts["seconds_per_gradient"] > 0
    assert list(fit.varcorr["group"]) == ["Batch", "Residual"]
    assert fit.ranef()["Batch"].shape == (6, 1)
    assert fit.theta.shape == (1,) and fit.nobs == 30
    assert len(repr(fit)) < 200


def test_every_nuts_option_reaches_the_config():
    """shared_scale and fast_path were unreachable from a config; now every field is."""
    nuts = {"shared_scale": True, "fast_path": False, "fixed_scales": {"Batch": [0.5]}}
    cfg = validate_config({"data": DYE[1], "formula": DYE[0], "method": "nuts", "nuts": nuts})
    opts = cfg.options()
    assert (opts.shared_scale, opts.fast_path, opts.fixed_scales) == (True, False, {"Batch": [0.5]})
    assert set(opts.model_dump()) == set(lmmjax.NutsOptions.model_fields)

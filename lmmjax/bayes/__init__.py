"""Bayesian linear mixed models: NUTS with any subset of random-effect classes marginalised.

The potential integrates the chosen classes out with the blocked factorisation
of :mod:`lmmjax.linalg` (or its eigendecomposition fast path when every
class is marginalised with known covariances); the marginalised effects are
then drawn exactly from their Gaussian conditional for every posterior draw.

Modules: ``priors`` (defaults and overrides), ``auto`` (``marginalize: auto``),
``marginal`` (the likelihood),
``model`` (NumPyro model and potential), ``samplers`` (NumPyro and BlackJAX
NUTS), ``recovery`` (exact draws of the marginalised effects), ``result``
(:class:`BayesFit`) and ``fit`` (:func:`fit_nuts`).

Examples
--------
>>> from lmmjax.datasets import load_bundled
>>> from lmmjax.design import build_model
>>> from lmmjax.bayes import fit_nuts
>>> model = build_model(load_bundled("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
>>> fit = fit_nuts(model, marginalize="all", num_chains=2)  # doctest: +SKIP
>>> print(fit.summary())  # doctest: +SKIP
"""

from lmmjax.bayes.fit import NutsWarning, fit_nuts, sample_model
from lmmjax.bayes.model import BayesModel, BayesSpec, build_bayes_model
from lmmjax.bayes.result import BayesFit
from lmmjax.options import NutsOptions

__all__ = [
    "BayesFit",
    "BayesModel",
    "BayesSpec",
    "NutsOptions",
    "NutsWarning",
    "build_bayes_model",
    "fit_nuts",
    "sample_model",
]

"""Bayesian linear mixed models: NUTS with any subset of random-effect classes marginalised.

The potential integrates the chosen classes out with the blocked factorisation
of :mod:`lmmjax.linalg` (or the eigendecomposition fast path when every
class is marginalised with known covariances); the marginalised effects are
then drawn exactly from their Gaussian conditional for every posterior draw.

Examples
--------
>>> from lmmjax.datasets import load_bundled
>>> from lmmjax.design import build_model
>>> from lmmjax.bayes import fit_nuts
>>> model = build_model(load_bundled("sleepstudy"), "Reaction ~ Days + (Days | Subject)")
>>> fit = fit_nuts(model, marginalize="all", num_chains=2)  # doctest: +SKIP
>>> fit.summary()  # doctest: +SKIP
"""

from lmmjax.bayes.model import BayesModel, BayesSpec, build_bayes_model
from lmmjax.bayes.nuts import NutsWarning, fit_from_config, fit_nuts, sample_model
from lmmjax.bayes.output import BayesFit
from lmmjax.bayes.samplers import SamplerSettings

__all__ = [
    "BayesFit",
    "BayesModel",
    "BayesSpec",
    "NutsWarning",
    "SamplerSettings",
    "build_bayes_model",
    "fit_from_config",
    "fit_nuts",
    "sample_model",
]

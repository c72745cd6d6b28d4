"""EM / MAP regularisation with empirical Bayes (Amestoy, van de Wiel & van Wieringen).

:func:`fit_map` finds the MAP of ``(beta, sigma^2, Sigma)`` by EM
(:mod:`lmmjax.em.em`, E-step by :func:`lmmjax.linalg.conditional_moments`)
under conjugate priors (:mod:`lmmjax.em.objective`), with each hyperparameter
fixed or chosen by the Laplace approximation of the marginal likelihood
(:mod:`lmmjax.em.hyper`), and returns a :class:`MapFit`.
"""

from lmmjax.em.fit import fit_map
from lmmjax.em.result import MapFit

__all__ = ["MapFit", "fit_map"]

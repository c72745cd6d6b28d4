"""Profiled REML / ML: lme4's penalised least squares on the blocked factorisation.

:func:`fit_reml` builds the Z-only structure and the ``[X y]`` cross products
(:mod:`lmmjax.linalg`), minimises the profiled criterion
(:mod:`lmmjax.reml.objective`) with L-BFGS on one compiled value-and-gradient
(:mod:`lmmjax.reml.optimize`) and returns an :class:`LmmFit`.
"""

from lmmjax.reml.fit import check_identifiable, compare, fit_reml
from lmmjax.reml.objective import estimates, profiled_objective
from lmmjax.reml.result import LmmFit

__all__ = [
    "LmmFit",
    "check_identifiable",
    "compare",
    "estimates",
    "fit_reml",
    "profiled_objective",
]

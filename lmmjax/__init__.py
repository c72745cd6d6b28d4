"""lmmjax: linear mixed models in JAX.

``lmmjax.lmm(formula, data, method=...)`` is the one entry point; the
method-level functions are :func:`lmmjax.reml.fit_reml` and
:func:`lmmjax.bayes.fit_nuts`.
"""

from lmmjax.precision import get_precision, set_precision  # noqa: I001  (sets float64 first)
from lmmjax.cache import enable_compilation_cache
from lmmjax.errors import LmmInputError, NotBuiltError
from lmmjax.terms import Term
from lmmjax.api import lmm
from lmmjax.design import Model, build_model
from lmmjax.methods import METHODS
from lmmjax.options import NutsOptions, RemlOptions
from lmmjax.output import Fit
from lmmjax.reml import LmmFit, compare, fit_reml

enable_compilation_cache()

__all__ = [
    "METHODS",
    "Fit",
    "LmmFit",
    "LmmInputError",
    "Model",
    "NotBuiltError",
    "NutsOptions",
    "RemlOptions",
    "Term",
    "build_model",
    "compare",
    "enable_compilation_cache",
    "fit_reml",
    "get_precision",
    "lmm",
    "set_precision",
]
__version__ = "0.1.0"

"""lmmjax: linear mixed models in JAX."""

from lmmjax.precision import get_precision, set_precision  # noqa: I001  (sets float64 first)
from lmmjax.cache import enable_compilation_cache
from lmmjax.errors import LmmInputError, NotBuiltError
from lmmjax.terms import Term
from lmmjax.api import lmm
from lmmjax.design import Model, build_model
from lmmjax.results import LmmFit, compare

enable_compilation_cache()

__all__ = [
    "LmmFit",
    "LmmInputError",
    "Model",
    "NotBuiltError",
    "Term",
    "build_model",
    "compare",
    "enable_compilation_cache",
    "get_precision",
    "lmm",
    "set_precision",
]
__version__ = "0.1.0"

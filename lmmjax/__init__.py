"""lmmjax: linear mixed models in JAX."""

from lmmjax.precision import get_precision, set_precision  # noqa: I001  (sets float64 first)
from lmmjax.errors import LmmInputError, NotBuiltError
from lmmjax.terms import Term

__all__ = ["LmmInputError", "NotBuiltError", "Term", "get_precision", "set_precision"]
__version__ = "0.1.0"

"""lmmjax: linear mixed models in JAX.

``lmmjax.lmm(formula, data, method=...)`` is the one entry point; the
method-level functions are :func:`lmmjax.reml.fit_reml` and
:func:`lmmjax.bayes.fit_nuts`.

``import lmmjax`` loads JAX, the registry and the option models only; the
formula machinery (formulaic, pandas), the REML engine and the samplers load
when first used, so that a process that only validates a config, or fits by
one method, does not pay for the others.
"""

import atexit

from lmmjax.memory import (  # noqa: I001  (imports nothing heavy)
    collector_paused,
    command_line_process,
    freeze_for_exit,
    freeze_imports,
    tune_allocator,
)

if command_line_process():  # a one-shot process: its imports' objects are frozen
    freeze_imports()
with collector_paused():  # the imports below make many objects; see lmmjax.memory
    from lmmjax.precision import get_precision, set_precision  # noqa: I001  (float64 first)
    import importlib

    from lmmjax.cache import enable_compilation_cache
    from lmmjax.errors import LmmInputError, LmmWarning, NotBuiltError
    from lmmjax.terms import Term
    from lmmjax.api import lmm
    from lmmjax.methods import METHODS
    from lmmjax.options import NutsOptions, RemlOptions
    from lmmjax.output import Fit

enable_compilation_cache()
tune_allocator()
atexit.register(freeze_for_exit)  # the interpreter's shutdown then skips collector passes

# names exported here but defined in modules that load on first use
_LAZY = {
    "Model": "lmmjax.design",
    "build_model": "lmmjax.design",
    "LmmFit": "lmmjax.reml",
    "compare": "lmmjax.reml",
    "fit_reml": "lmmjax.reml",
}


def __getattr__(name: str):
    if name in _LAZY:
        with collector_paused():
            value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmmjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "METHODS",
    "Fit",
    "LmmFit",
    "LmmInputError",
    "LmmWarning",
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

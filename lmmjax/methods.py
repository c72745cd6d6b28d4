"""The registry of fitting methods: one entry per method, the one way to dispatch.

Each entry names its config section, its options model and its fitter as
``"module:function"``, imported only when the method is used (so that
validating a config or fitting by REML does not import NumPyro). A method
without a fitter is announced but not built yet.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from lmmjax.errors import LmmInputError, NotBuiltError
from lmmjax.memory import collector_paused
from lmmjax.options import MapOptions, NutsOptions, Options, RemlOptions, SparseOptions

__all__ = ["METHODS", "Method", "get_method"]


@dataclass(frozen=True)
class Method:
    """One fitting method.

    Attributes
    ----------
    name : str
        As written in ``method:`` and ``lmmjax.lmm(method=...)``.
    section : str
        Config section with its options.
    options : type of Options or None
        Options model (None while the method is not built).
    fitter : str or None
        ``"module:function"`` called as ``function(model, options, **fixed)``.
    fixed : dict
        Keyword arguments this method fixes (``ml`` is ``fit_reml`` with ``reml=False``).
    weighted : bool
        Whether the fitter honours prior weights and offsets; others refuse a
        model that has them rather than ignore them.
    checker : str or None
        ``"module:function"`` called as ``function(model, options)`` by the CLI's
        ``--check``: it resolves the options against the model (prior names,
        grouping factors) as the fit would, without fitting.
    """

    name: str
    section: str
    options: type[Options] | None = None
    fitter: str | None = None
    fixed: dict = field(default_factory=dict)
    checker: str | None = None
    weighted: bool = False

    @property
    def built(self) -> bool:
        return self.fitter is not None

    def require_built(self) -> None:
        """Raise :class:`NotBuiltError` if this version of lmmjax lacks the method."""
        if not self.built:
            raise NotBuiltError(f"method '{self.name}' is not built yet in this version of lmmjax")

    def _require_weighted(self, model: Any) -> None:
        if self.weighted:
            return
        for what in ("weights", "offset"):
            if getattr(model, what, None) is not None:
                raise LmmInputError(
                    f"method {self.name!r} does not take {what} yet (reml and ml do)"
                )

    def check(self, model: Any, options: Options | None) -> None:
        """Fail as the fit would on options that do not fit ``model``; nothing is fitted."""
        self.require_built()
        self._require_weighted(model)
        if self.checker is not None:
            _resolve(self.checker)(model, options or self.options())

    def fit(self, model: Any, options: Options | None) -> Any:
        """Fit ``model`` with validated ``options`` (defaults when None)."""
        self.require_built()
        self._require_weighted(model)
        return _resolve(self.fitter)(model, options or self.options(), **self.fixed)


def _resolve(spec: str) -> Any:
    """The function a ``"module:function"`` spec names, its module imported on first use."""
    module, func = spec.split(":")
    with collector_paused():  # the fitters' libraries make many objects (lmmjax.memory)
        return getattr(importlib.import_module(module), func)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "reml", "reml", RemlOptions, "lmmjax.reml.fit:fit_reml", {"reml": True}, weighted=True
        ),
        Method(
            "ml", "reml", RemlOptions, "lmmjax.reml.fit:fit_reml", {"reml": False}, weighted=True
        ),  # fmt: skip
        Method(
            "nuts",
            "nuts",
            NutsOptions,
            "lmmjax.bayes.fit:fit_nuts",
            checker="lmmjax.bayes.model:check_options",
        ),  # fmt: skip
        Method("map", "map", MapOptions, "lmmjax.em.fit:fit_map"),
        Method("sparse", "sparse", SparseOptions, "lmmjax.sparse.fit:fit_sparse"),
    )
}


def get_method(name: str) -> Method:
    """The registry entry of ``name``.

    Raises
    ------
    LmmInputError
        If no method has that name.
    """
    if name not in METHODS:
        raise LmmInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]

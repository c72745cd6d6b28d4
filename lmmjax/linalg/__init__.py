"""The single blocked factorisation behind every method; nothing else knows its layout."""

from lmmjax.linalg.blocked import (
    Factor,
    blocked_to_terms,
    factorize,
    lambda_zt,
    logdet,
    logdet_and_quad,
    make_lambdas,
    solve_lower,
    solve_upper,
    z_lambda,
)
from lmmjax.linalg.structure import Layout, Structure, build_structure

__all__ = [
    "Factor",
    "Layout",
    "Structure",
    "blocked_to_terms",
    "build_structure",
    "factorize",
    "lambda_zt",
    "logdet_and_quad",
    "logdet",
    "make_lambdas",
    "solve_lower",
    "solve_upper",
    "z_lambda",
]

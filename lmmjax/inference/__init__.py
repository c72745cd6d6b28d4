"""Fitting methods built on the blocked factorisation (REML/ML here; NUTS in lmmjax.bayes)."""

from lmmjax.inference.reml import fit

__all__ = ["fit"]

"""lme4 formula syntax: bar terms are split here, everything else goes to formulaic."""

from lmmjax.formula.bars import BarTerm, ParsedFormula, parse_formula
from lmmjax.formula.dot import expand_dot, has_dot
from lmmjax.formula.fixed import (
    CONTRASTS,
    apply_contrasts,
    lme4_name,
    model_matrix,
    quote_names,
    required_columns,
)

__all__ = [
    "CONTRASTS",
    "BarTerm",
    "apply_contrasts",
    "ParsedFormula",
    "expand_dot",
    "has_dot",
    "lme4_name",
    "model_matrix",
    "parse_formula",
    "quote_names",
    "required_columns",
]

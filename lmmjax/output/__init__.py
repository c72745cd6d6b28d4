"""What every method's result shares: the Fit protocol, VarCorr, lme4 tables, JSON."""

from lmmjax.output.fit import Fit, result_dict, to_jsonable, write_json
from lmmjax.output.tables import coef_table, random_effects_table, residuals_and_groups
from lmmjax.output.varcorr import sd_and_corr, varcorr_rows

__all__ = [
    "Fit",
    "coef_table",
    "random_effects_table",
    "result_dict",
    "residuals_and_groups",
    "to_jsonable",
    "write_json",
    "sd_and_corr",
    "varcorr_rows",
]

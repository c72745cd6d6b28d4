"""The single blocked factorisation behind every method; nothing else knows its layout.

The names below are the only way in: :func:`build_structure` precomputes the
Z-only structure, :func:`cross_products` the products with dense columns,
:func:`gls_gram` gives ``log|V|`` and ``M' V^{-1} M`` for the likelihoods, and
:func:`conditional_moments` the conditional distribution of the random effects;
:func:`scale_rows` gives the structure of a row-weighted ``Z`` per evaluation.
:func:`row_sums`, :class:`BEntries` and :func:`assemble_from_sums` build the same
structure from sums over row batches (streamed or split across devices).
:func:`small_system` holds a model with few random effects densely, padded to
shared shapes, behind the same :func:`gls_gram` and :func:`conditional_moments`.
The ``eigen_*`` functions are the fast path for covariances known up to a scale.
"""

from lmmjax.linalg.blocked import (
    Factor,
    Moments,
    conditional_moments,
    factor_entries,
    factorize,
    gls_gram,
    level_sums,
    logdet,
    make_lambdas,
)
from lmmjax.linalg.dense import cholesky, lapack_blocks, logdet_quad, tri_solve
from lmmjax.linalg.eigen import (
    EigenSystem,
    eigen_gls_gram,
    eigen_moments,
    eigen_precompute,
)
from lmmjax.linalg.products import (
    ColumnMap,
    CrossProducts,
    DenseProducts,
    column_map,
    cross_products,
    linear_predictor,
    z_times,
)
from lmmjax.linalg.small import (
    SmallDerivatives,
    SmallLayout,
    SmallSystem,
    closed_form_fits,
    small_derivatives,
    small_system,
)
from lmmjax.linalg.structure import (
    Structure,
    build_structure,
    dense_gram,
    device_array,
    rows_scalable,
    scale_rows,
    term_layouts,
)
from lmmjax.linalg.sums import BEntries, RowSums, assemble_from_sums, row_sums

__all__ = [
    "BEntries",
    "RowSums",
    "assemble_from_sums",
    "row_sums",
    "term_layouts",
    "ColumnMap",
    "CrossProducts",
    "DenseProducts",
    "EigenSystem",
    "Factor",
    "Moments",
    "SmallDerivatives",
    "SmallLayout",
    "SmallSystem",
    "Structure",
    "build_structure",
    "cholesky",
    "closed_form_fits",
    "column_map",
    "conditional_moments",
    "cross_products",
    "dense_gram",
    "device_array",
    "eigen_gls_gram",
    "eigen_moments",
    "eigen_precompute",
    "factor_entries",
    "factorize",
    "gls_gram",
    "level_sums",
    "lapack_blocks",
    "linear_predictor",
    "logdet",
    "logdet_quad",
    "make_lambdas",
    "rows_scalable",
    "scale_rows",
    "small_derivatives",
    "small_system",
    "tri_solve",
    "z_times",
]

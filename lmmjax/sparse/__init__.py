"""Sparse high-dimensional fixed effects: quasi-likelihood transform, then selection.

The method of Li, Cai & Li (2022, JASA): whiten each cluster by the working
covariance ``a Z_i Z_i' + I`` (:mod:`~lmmjax.sparse.transform`), select the
fixed effects by best subset or the lasso on the whitened data
(:mod:`~lmmjax.sparse.select`), choose ``a`` and ``k`` by cluster-wise
cross-validation or an information criterion (:mod:`~lmmjax.sparse.cv`), and
refit the selected columns by REML (:func:`~lmmjax.sparse.fit.fit_sparse`).
"""

from lmmjax.sparse.fit import fit_sparse
from lmmjax.sparse.result import SparseFit

__all__ = ["SparseFit", "fit_sparse"]

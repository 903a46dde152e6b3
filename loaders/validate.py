"""Checks that a matrix holds raw counts: the model's normalisation is only meaningful on counts."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from loaders.errors import DataError


def check_raw_counts(matrix, where: str, max_values: int = 2_000_000) -> None:
    """Raise `DataError` for NaN/inf, negative or non-integer values (checks up to `max_values` stored values).

    Non-integer values almost always mean the data were already normalised or log-transformed.
    """
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    values = values[:max_values]
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        n_bad = int(np.sum(~np.isfinite(values)))
        raise DataError(f"{where}: the count matrix holds {n_bad} NaN or infinite values. Remove or fix those cells.")
    if values.min() < 0:
        raise DataError(
            f"{where}: the count matrix holds negative values (min {values.min():.3g}). Expected raw counts; "
            "scaled or centred data cannot be used."
        )
    frac = np.abs(values - np.round(values))
    if np.any(frac > 1e-3):
        raise DataError(
            f"{where}: the matrix holds non-integer values (e.g. {values[frac > 1e-3][0]:.4g}); it looks "
            "normalised or log-transformed. Provide raw counts: the layer holding them via --layer (e.g. counts), or "
            "--layer raw when an h5ad's `.raw` holds them."
        )

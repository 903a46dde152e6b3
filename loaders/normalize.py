"""Per-cell normalisation, applied identically when training and when mapping a query."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Normalization:
    """Scale each cell's counts over the model's genes to `target_sum`, then log1p.

    The library size is taken over the selected genes, so the same computation is possible on any
    source and on a query that holds only the model's genes.
    """

    target_sum: float = 1e4
    log1p: bool = True

    def apply_csr(self, counts: sp.csr_matrix, copy: bool = True) -> sp.csr_matrix:
        """`copy=False` normalises a float32 CSR in place (a loader's freshly read IO batch): same values."""
        if copy or not (sp.issparse(counts) and counts.format == "csr" and counts.dtype == np.float32):
            counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        elif not counts.data.flags.writeable:  # e.g. zero-copy Arrow buffers: copy the values only
            counts = sp.csr_matrix((counts.data.copy(), counts.indices, counts.indptr), shape=counts.shape)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        scale = np.divide(self.target_sum, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
        counts.data *= np.repeat(scale.astype(np.float32), np.diff(counts.indptr))  # cast per row, not per value
        if self.log1p:
            np.log1p(counts.data, out=counts.data)
        return counts

    def apply_dense(self, counts: sp.csr_matrix) -> np.ndarray:
        return self.apply_csr(counts).toarray()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(**d)

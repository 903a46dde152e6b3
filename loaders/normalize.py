"""Per-cell normalisation, applied identically when training and when mapping a query."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

ALL_GENES = "all_genes"
MODEL_GENES = "model_genes"


@dataclass(frozen=True)
class Normalization:
    """Scale each cell's counts to `target_sum` by its library size, then log1p.

    `library_size="all_genes"` (what training writes now): the library size is the cell's total counts over
    ALL of its genes, handed over as `totals`, so a query missing some model genes is scaled like the
    reference. `"model_genes"` (the default, and what checkpoints written before this field mean): the sum
    over the given columns (the model's genes); `totals` are then ignored.
    """

    target_sum: float = 1e4
    log1p: bool = True
    library_size: Literal["all_genes", "model_genes"] = MODEL_GENES

    def __post_init__(self) -> None:
        if self.library_size not in (ALL_GENES, MODEL_GENES):
            raise ValueError(f"library_size must be {ALL_GENES!r} or {MODEL_GENES!r}; got {self.library_size!r}")

    @property
    def needs_totals(self) -> bool:
        return self.library_size == ALL_GENES

    def apply_csr(self, counts: sp.csr_matrix, totals: np.ndarray | None = None, copy: bool = True) -> sp.csr_matrix:
        """`totals`: each row's total counts over all its genes (needed when `needs_totals`).

        `copy=False` normalises a float32 CSR in place (a loader's freshly read IO batch): same values.
        """
        if copy or not (sp.issparse(counts) and counts.format == "csr" and counts.dtype == np.float32):
            counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        elif not counts.data.flags.writeable:  # e.g. zero-copy Arrow buffers: copy the values only
            counts = sp.csr_matrix((counts.data.copy(), counts.indices, counts.indptr), shape=counts.shape)
        lib = self._library_sizes(counts, totals)
        scale = np.divide(self.target_sum, lib, out=np.zeros(len(lib), dtype=np.float64), where=lib > 0)
        counts.data *= np.repeat(scale.astype(np.float32), np.diff(counts.indptr))  # cast per row, not per value
        if self.log1p:
            np.log1p(counts.data, out=counts.data)
        return counts

    def apply_dense(self, counts: sp.csr_matrix, totals: np.ndarray | None = None) -> np.ndarray:
        return self.apply_csr(counts, totals).toarray()

    def _library_sizes(self, counts: sp.csr_matrix, totals: np.ndarray | None) -> np.ndarray:
        if not self.needs_totals:
            return np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
        if totals is None:
            raise ValueError("this normalisation divides by each cell's total counts over all its genes: pass "
                             "`totals` (one per row)")
        lib = np.asarray(totals, dtype=np.float64).ravel()
        if len(lib) != counts.shape[0]:
            raise ValueError(f"{len(lib)} totals for {counts.shape[0]} rows")
        return lib

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        """A dict without `library_size` was written before it existed: those models used the model genes."""
        return cls(**{"library_size": MODEL_GENES, **d})

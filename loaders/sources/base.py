"""The contract every atlas source meets: obs and var in memory, counts read on demand by row."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp


@runtime_checkable
class CellSource(Protocol):
    """An opened atlas restricted to a `CellSelection`.

    - `obs`: one row per selected cell, in storage order, with a RangeIndex (row position = cell id
      used everywhere in `loaders`), a `soma_joinid` column (storage row), the standardised `label`
      and `batch` columns (categoricals over strings, built on codes: no per-cell string; label <NA> =
      unlabelled), and any extra requested columns.
    - `var`: one row per selected gene, in the requested order, with `feature_id` and `feature_name`.
    - `read_counts(rows)`: raw counts of cells at the given obs positions (sorted ascending, unique),
      as float32 CSR of shape (len(rows), n_genes), columns in `var` order. One call = one IO batch:
      implementations make few large sorted reads.
    - `chunk_ids()`: the storage chunk (tile row block) of each cell, so samplers can favour
      partners from other chunks and plan reads with locality.
    """

    obs: pd.DataFrame
    var: pd.DataFrame

    @property
    def n_cells(self) -> int: ...

    @property
    def n_genes(self) -> int: ...

    def read_counts(self, rows: np.ndarray) -> sp.csr_matrix: ...

    def chunk_ids(self) -> np.ndarray: ...

    def close(self) -> None: ...


class SizedFromFrames:
    """`n_cells`/`n_genes` derived from `obs`/`var`, shared by the concrete sources."""

    obs: pd.DataFrame
    var: pd.DataFrame

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    @property
    def n_genes(self) -> int:
        return len(self.var)


class SourceSpec(Protocol):
    """A picklable recipe that opens a `CellSource` (so DataLoader workers can reopen it after spawn)."""

    def open(self) -> CellSource: ...

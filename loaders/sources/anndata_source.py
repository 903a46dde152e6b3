"""An in-memory AnnData as a `CellSource`: small references and queries take the same data path as atlases."""
from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.errors import DataError
from loaders.selection import CellSelection, resolve_genes, standardize_obs
from loaders.sources.base import SizedFromFrames

CHUNK_ROWS = 2048  # same row-block size as Census X tiles, so chunk ids mean the same thing everywhere


def var_with_feature_columns(var: pd.DataFrame) -> pd.DataFrame:
    """AnnData var → `feature_id`/`feature_name`, guessing which of var_names/columns hold Ensembl ids."""
    names = var.index.astype(str)
    out = pd.DataFrame(index=pd.RangeIndex(len(var)))
    id_col = next((c for c in ("feature_id", "gene_ids", "gene_id", "ensembl_id") if c in var.columns), None)
    name_col = next((c for c in ("feature_name", "gene_symbols", "gene_symbol", "symbol") if c in var.columns), None)
    looks_ensembl = names.str.startswith(("ENSG", "ENSMUSG")).mean() > 0.5 if len(names) else False
    ids = var[id_col].astype(str).to_numpy() if id_col else (names.to_numpy() if looks_ensembl else None)
    symbols = var[name_col].astype(str).to_numpy() if name_col else (None if looks_ensembl else names.to_numpy())
    out["feature_id"] = ids if ids is not None else symbols
    out["feature_name"] = symbols if symbols is not None else ids
    return out


RAW_LAYER = "raw"  # with no layer of that name, `.raw` (X and var): where scanpy workflows keep the counts


def counts_and_var(adata: ad.AnnData, layer: str | None, where: str):
    """The matrix `layer` names and the genes it is over: X (None), `layers[layer]`, or `.raw` for "raw".

    `.raw` has its own var (often more genes than a filtered X), so the two travel together.
    """
    if layer is None:
        matrix, var = adata.X, adata.var
    elif layer in adata.layers:
        matrix, var = adata.layers[layer], adata.var
    elif layer == RAW_LAYER and adata.raw is not None:
        matrix, var = adata.raw.X, adata.raw.var
    else:
        hint = " (nor a .raw)" if layer == RAW_LAYER else ""
        also = "; --layer raw reads adata.raw" if adata.raw is not None else ""
        raise DataError(f"{where}: no layer {layer!r}{hint}; layers are {list(adata.layers)}{also}. "
                        "Omit --layer to use X.")
    if matrix is None:
        raise DataError(f"{where}: X is empty; pass --layer with the layer holding raw counts.")
    return matrix, var


@dataclass
class AnnDataSource(SizedFromFrames):
    """Wraps an AnnData whose `X` (or `layer`, or `.raw` as layer "raw") holds raw counts."""

    adata: ad.AnnData | None  # None once compacted (compact())
    selection: CellSelection = CellSelection()
    layer: str | None = None
    where: str = "AnnData"

    def __post_init__(self) -> None:
        if self.adata.n_obs == 0:
            raise DataError(f"{self.where}: the file has no cells.")
        matrix, var = counts_and_var(self.adata, self.layer, self.where)
        if var.shape[0] == 0:
            raise DataError(f"{self.where}: the file has no genes.")
        obs = self.adata.obs
        if self.selection.obs_value_filter:
            try:
                keep = obs.eval(self.selection.obs_value_filter).to_numpy(dtype=bool)
            except Exception as exc:  # pandas raises many types for a bad expression
                raise DataError(f"{self.where}: bad obs_value_filter {self.selection.obs_value_filter!r}: {exc}") from exc
        else:
            keep = np.ones(self.adata.n_obs, dtype=bool)
        if not keep.any():
            raise DataError(f"{self.where}: obs_value_filter {self.selection.obs_value_filter!r} matches no cell.")
        self._rows = np.flatnonzero(keep)
        std = standardize_obs(obs.iloc[self._rows], self.selection, self.where)
        std.insert(0, "soma_joinid", self._rows.astype(np.int64))
        std["obs_name"] = std.index.astype(str)
        std.index = pd.RangeIndex(len(std))  # as reset_index(drop=True), without copying every column
        self.obs = std
        full_var = var_with_feature_columns(var)
        self._genes = resolve_genes(full_var, self.selection.genes, self.where)
        self.var = full_var.iloc[self._genes].reset_index(drop=True)
        self._x = sp.csr_matrix(matrix, dtype=np.float32)

    def read_counts(self, rows: np.ndarray) -> sp.csr_matrix:
        sub = self._x[self._rows[np.asarray(rows, dtype=np.int64)]]
        return sub[:, self._genes] if len(self._genes) != self._x.shape[1] or not _is_identity(self._genes) else sub

    def chunk_ids(self) -> np.ndarray:
        return self.obs["soma_joinid"].to_numpy() // CHUNK_ROWS

    def compact(self) -> "AnnDataSource":
        """The same source holding only its selected cells x genes and no AnnData: what to hand to another
        process (a full-gene matrix would be pickled otherwise; a reopened file re-reads every gene)."""
        out = object.__new__(AnnDataSource)
        out.__dict__.update(self.__dict__)
        out.adata = None
        out._x = self.read_counts(np.arange(len(self._rows)))
        out._rows, out._genes = np.arange(len(self._rows)), np.arange(len(self._genes))
        return out

    def close(self) -> None:
        pass


def _is_identity(pos: np.ndarray) -> bool:
    return bool(np.array_equal(pos, np.arange(len(pos))))

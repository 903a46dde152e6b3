"""An h5ad file as a `CellSource`: small files load into memory, big ones read sorted rows on demand.

The on-demand path keeps only obs, var and the CSR row pointer in memory and reads each IO batch as
a few coalesced slices of the HDF5 `data`/`indices` arrays, so an h5ad is "just another source" at scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.errors import DataError
from loaders.selection import CellSelection, resolve_genes, standardize_obs
from loaders.sources.anndata_source import CHUNK_ROWS, RAW_LAYER, AnnDataSource, var_with_feature_columns
from loaders.validate import check_raw_counts
from loaders.sources.base import SizedFromFrames

IN_MEMORY_MAX_BYTES = 2 * 1024**3  # files above this size are read row-wise on demand (backed=None)
GAP_VALUES = 1 << 16  # read through gaps of up to this many stored values rather than issue a new read
GAP_ROWS = 64  # same for dense matrices, in rows
VALIDATE_ROWS = 1000  # rows checked for raw counts when opening, so a wrong layer fails early


@dataclass(frozen=True)
class H5adSpec:
    """Picklable recipe for an h5ad source; `backed=None` chooses by file size."""

    path: str
    selection: CellSelection = field(default_factory=CellSelection)
    layer: str | None = None
    backed: bool | None = None

    def open(self):
        path = Path(self.path)
        where = f"h5ad {path}"
        if not path.exists():
            raise DataError(f"{where}: file not found. Check the path.")
        if path.is_dir():
            raise DataError(f"{where}: is a directory, not an h5ad file (a SOMA store? use its URI as a SOMA source).")
        import h5py

        if not h5py.is_hdf5(path):
            raise DataError(f"{where}: not an h5ad file (not HDF5). Provide an AnnData .h5ad file with raw counts.")
        backed = self.backed if self.backed is not None else path.stat().st_size > IN_MEMORY_MAX_BYTES
        if backed:
            source = H5adBackedSource(str(path), self.selection, self.layer, where)
        else:
            source = _open_in_memory(path, self.selection, self.layer, where)
        n = min(VALIDATE_ROWS, source.n_cells)
        check_raw_counts(source.read_counts(np.arange(n)), f"{where} ({'layer ' + self.layer if self.layer else 'X'})")
        source.spec = self
        return source


def _open_in_memory(path: Path, selection: CellSelection, layer: str | None, where: str) -> AnnDataSource:
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a non-AnnData HDF5 file
        raise DataError(f"{where}: could not be read as AnnData ({type(exc).__name__}: {exc}).") from exc
    return _Reopenable(adata, selection, layer, where)


class _Reopenable(AnnDataSource):
    """AnnDataSource that pickles as its spec (workers reopen the file instead of receiving the matrix)."""

    spec: H5adSpec | None = None

    def __reduce__(self):
        return (_open_spec, (self.spec,)) if self.spec is not None else super().__reduce__()


def _open_spec(spec):
    return spec.open()


def h5ad_counts_matrix(f, layer: str | None, where: str):
    """The HDF5 nodes of the counts and of their var in an open h5ad file: X, `layers/<layer>`, or `raw/X` with
    `raw/var` for layer "raw" when no layer has that name (as `counts_and_var` in memory); clear errors when absent."""
    if "obs" not in f or "var" not in f:
        raise DataError(f"{where}: HDF5 file without AnnData obs/var groups: not an h5ad file.")
    key = f"layers/{layer}" if layer else "X"
    if key in f:
        return f[key], f["var"]
    if layer == RAW_LAYER and "raw/X" in f and "raw/var" in f:
        return f["raw/X"], f["raw/var"]
    avail = list(f["layers"].keys()) if "layers" in f else []
    also = "; layer raw reads the file's .raw" if "raw/X" in f else ""
    what = f"no layer {layer!r}" if layer else "no X"
    raise DataError(f"{where}: {what} in the file (layers: {avail}{also}). Name the layer holding raw counts "
                    "(--layer).")


class H5adBackedSource(SizedFromFrames):
    """Rows of an h5ad read on demand; obs/var and the row pointer in memory."""

    spec: H5adSpec | None = None

    def __init__(self, path: str, selection: CellSelection, layer: str | None, where: str) -> None:
        import h5py
        from anndata.io import read_elem

        self.where = where
        self._file = h5py.File(path, "r")
        try:
            f = self._file
            matrix, var_node = h5ad_counts_matrix(f, layer, where)
            obs, full_var = read_elem(f["obs"]), var_with_feature_columns(read_elem(var_node))
            self._matrix = _RowReader(matrix, where)
            n_obs, n_vars = self._matrix.shape
            if n_obs == 0 or len(obs) == 0:
                raise DataError(f"{where}: the file has no cells.")
            if n_vars == 0 or len(full_var) == 0:
                raise DataError(f"{where}: the file has no genes.")
            self._rows = _filter_rows(obs, selection, where)
            kept = obs if len(self._rows) == len(obs) else obs.iloc[self._rows]  # obs is ours: no copy needed
            std = standardize_obs(kept, selection, where)
            std.insert(0, "soma_joinid", self._rows.astype(np.int64))
            std["obs_name"] = std.index.astype(str)
            std.index = pd.RangeIndex(len(std))  # as reset_index(drop=True), without copying every column
            self.obs = std
            self._genes = resolve_genes(full_var, selection.genes, where)
            self.var = full_var.iloc[self._genes].reset_index(drop=True)
            self._all_genes = np.array_equal(self._genes, np.arange(n_vars))
        except BaseException:
            self._file.close()
            raise

    def read_counts(self, rows: np.ndarray) -> sp.csr_matrix:
        x = self._matrix.read(self._rows[np.asarray(rows, dtype=np.int64)])
        return x if self._all_genes else x[:, self._genes]

    def chunk_ids(self) -> np.ndarray:
        return self.obs["soma_joinid"].to_numpy() // CHUNK_ROWS

    def close(self) -> None:
        self._file.close()

    def __reduce__(self):
        if self.spec is None:
            raise TypeError("H5adBackedSource opened without a spec cannot be pickled; open it via H5adSpec.")
        return (_open_spec, (self.spec,))


def _filter_rows(obs: pd.DataFrame, selection: CellSelection, where: str) -> np.ndarray:
    if not selection.obs_value_filter:
        return np.arange(len(obs))
    try:
        keep = obs.eval(selection.obs_value_filter).to_numpy(dtype=bool)
    except Exception as exc:  # pandas raises many types for a bad expression
        raise DataError(f"{where}: bad obs_value_filter {selection.obs_value_filter!r}: {exc}") from exc
    if not keep.any():
        raise DataError(f"{where}: obs_value_filter {selection.obs_value_filter!r} matches no cell.")
    return np.flatnonzero(keep)


class _RowReader:
    """Sorted-row reads from an on-disk CSR group or dense dataset, coalescing nearby rows into one slice."""

    def __init__(self, elem, where: str) -> None:
        import h5py

        self.dense = isinstance(elem, h5py.Dataset)
        if self.dense:
            self.shape, self._ds = tuple(elem.shape), elem
            return
        enc = elem.attrs.get("encoding-type", "")
        if enc != "csr_matrix":
            raise DataError(
                f"{where}: the count matrix is stored as {enc or 'an unknown encoding'}; reading rows on demand "
                "needs CSR. Open it in memory (backed=False) or rewrite it as CSR (adata.X = adata.X.tocsr())."
            )
        self.shape = tuple(int(s) for s in elem.attrs["shape"])
        self._data, self._indices = elem["data"], elem["indices"]
        self._indptr = elem["indptr"][:].astype(np.int64)

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        if self.dense:
            return self._read_dense(rows)
        starts, ends = self._indptr[rows], self._indptr[rows + 1]
        breaks = np.flatnonzero(starts[1:] - ends[:-1] > GAP_VALUES) + 1
        data, indices = [], []
        for run in np.split(np.arange(len(rows)), breaks):
            lo, hi = starts[run[0]], ends[run[-1]]
            keep = _gather_positions(starts[run] - lo, ends[run] - lo)
            data.append(self._data[lo:hi][keep])
            indices.append(self._indices[lo:hi][keep])
        indptr = np.concatenate([[0], np.cumsum(ends - starts)])
        return sp.csr_matrix((np.concatenate(data).astype(np.float32, copy=False), np.concatenate(indices), indptr),
                             shape=(len(rows), self.shape[1]))

    def _read_dense(self, rows: np.ndarray) -> sp.csr_matrix:
        breaks = np.flatnonzero(np.diff(rows) > GAP_ROWS) + 1
        parts = [sp.csr_matrix(self._ds[run[0]: run[-1] + 1][run - run[0]], dtype=np.float32)
                 for run in np.split(rows, breaks)]
        return sp.vstack(parts, format="csr")


def _gather_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray | slice:
    """Positions [s0, e0) + [s1, e1) + ... as one index array (a slice when the ranges touch)."""
    if len(starts) == 1 or np.array_equal(starts[1:], ends[:-1]):
        return slice(int(starts[0]), int(ends[-1]))
    lengths = ends - starts
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(int(lengths.sum())) + offsets

"""h5ad -> SOMA Experiment, streaming row chunks so files larger than memory can be converted.

Writes obs (+ obs_name, raw_sum, nnz), ms["RNA"].var (feature_id, feature_name, other columns) and
ms["RNA"].X["raw"] (Census X layout). Every chunk is checked to hold raw counts; the store is built
in a temporary sibling directory and renamed at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from loaders.atomic import atomic_directory, check_new_directory
from loaders.errors import DataError
from loaders.soma_layout import WRITE_SORTED, coo_table_global_order, reopen_for_write, x_platform_config
from loaders.sources.anndata_source import var_with_feature_columns
from loaders.sources.h5ad import _RowReader, h5ad_counts_matrix
from loaders.validate import check_raw_counts

TARGET_CHUNK_NNZ = 8_000_000  # stored values per chunk (~64 MB as CSR + COO copies)


def ingest_h5ad(h5ad_path: str | os.PathLike, store_uri: str | os.PathLike, *, layer: str | None = None,
                chunk_cells: int | None = None, progress: bool = True) -> dict:
    """Convert `h5ad_path` into a SOMA Experiment at `store_uri` (a new local directory); returns a summary."""
    import h5py
    import tiledbsoma as soma
    from anndata.io import read_elem

    src, dest = Path(h5ad_path), Path(store_uri)
    where = f"h5ad {src}"
    if not src.is_file():
        raise DataError(f"{where}: file not found. Check the path.")
    if not h5py.is_hdf5(src):
        raise DataError(f"{where}: not an h5ad file (not HDF5).")
    check_new_directory(dest)
    t0 = time.perf_counter()
    with atomic_directory(dest) as tmp:
        with h5py.File(src, "r") as f:
            matrix, var_node = h5ad_counts_matrix(f, layer, where)
            reader = _reader(matrix, where, read_elem)
            obs, var = _obs_frame(read_elem(f["obs"])), _var_frame(read_elem(var_node))
            n, g = reader.shape
            if n == 0 or g == 0:
                raise DataError(f"{where}: the matrix is empty ({n} cells x {g} genes).")
            if len(obs) != n or len(var) != g:
                raise DataError(f"{where}: obs/var lengths ({len(obs)}, {len(var)}) do not match X {reader.shape}.")
            chunk = chunk_cells or _default_chunk(reader, n, g)
            nnz = _write(tmp, obs, var, reader, chunk, where, progress, soma)
    return dict(uri=str(dest), n_cells=int(n), n_genes=int(g), nnz=int(nnz), seconds=time.perf_counter() - t0)


def _write(tmp: Path, obs: pd.DataFrame, var: pd.DataFrame, reader, chunk: int, where: str, progress: bool,
           soma) -> int:
    n, g = reader.shape
    obs_schema = _arrow_schema(obs)
    var_table = pa.Table.from_pandas(var, schema=_arrow_schema(var), preserve_index=False)
    with soma.Experiment.create(str(tmp)) as exp:
        obs_arr = exp.add_new_dataframe("obs", schema=obs_schema, index_column_names=["soma_joinid"],
                                        domain=[(0, n - 1)])
        rna = exp.add_new_collection("ms").add_new_collection("RNA", soma.Measurement)
        var_arr = rna.add_new_dataframe("var", schema=var_table.schema, index_column_names=["soma_joinid"],
                                        domain=[(0, g - 1)])
        x_arr = rna.add_new_collection("X").add_new_sparse_ndarray("raw", type=pa.float32(), shape=(n, g),
                                                                   platform_config=x_platform_config())
    with reopen_for_write(var_arr, _categories(var)) as var_w:
        var_w.write(var_table)
    total = 0
    from tqdm.auto import tqdm

    starts = tqdm(range(0, n, chunk), desc="ingest", unit="chunk", disable=not progress)
    with reopen_for_write(obs_arr, _categories(obs)) as obs_w, reopen_for_write(x_arr) as x_w:
        for start in starts:
            stop = min(start + chunk, n)
            x = reader.read(np.arange(start, stop))
            check_raw_counts(x, f"{where}, cells {start}..{stop - 1}")
            part = obs.iloc[start:stop].copy()
            part["raw_sum"] = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
            part["nnz"] = np.diff(x.indptr).astype(np.int64)
            obs_w.write(pa.Table.from_pandas(part, schema=obs_schema, preserve_index=False))
            x.eliminate_zeros()  # explicit zeros are not stored values in SOMA
            x_w.write(coo_table_global_order(x, start), platform_config=WRITE_SORTED)
            total += x.nnz
    return total


def _obs_frame(obs: pd.DataFrame) -> pd.DataFrame:
    """obs with soma_joinid, obs_name, the original columns in SOMA-storable types, and count columns."""
    out = pd.DataFrame({"soma_joinid": np.arange(len(obs), dtype=np.int64),
                        "obs_name": obs.index.astype(str).to_numpy()})
    for col in obs.columns:
        if str(col) in ("soma_joinid", "obs_name", "raw_sum", "nnz"):
            continue
        out[str(col)] = _storable(obs[col].reset_index(drop=True))
    out["raw_sum"] = np.zeros(len(obs))
    out["nnz"] = np.zeros(len(obs), dtype=np.int64)
    return out


def _var_frame(var: pd.DataFrame) -> pd.DataFrame:
    feats = var_with_feature_columns(var)
    out = pd.DataFrame({"soma_joinid": np.arange(len(var), dtype=np.int64),
                        "feature_id": feats["feature_id"].astype(str).to_numpy(),
                        "feature_name": feats["feature_name"].astype(str).to_numpy(),
                        "var_name": var.index.astype(str).to_numpy()})
    for col in var.columns:
        if str(col) not in out.columns:
            out[str(col)] = _storable(var[col].reset_index(drop=True))
    return out


def _categories(df: pd.DataFrame) -> dict[str, list[str]]:
    return {str(c): [str(v) for v in df[c].cat.categories] for c in df.columns
            if isinstance(df[c].dtype, pd.CategoricalDtype)}


def _arrow_schema(df: pd.DataFrame) -> pa.Schema:
    """Object (string) columns as large_string even when all values are missing; others as pandas infers."""
    inferred = pa.Schema.from_pandas(df.iloc[:1000], preserve_index=False)
    return pa.schema([pa.field(f.name, pa.large_string()) if df[f.name].dtype == object else f for f in inferred])


def _storable(s: pd.Series) -> pd.Series:
    """Categoricals of strings, numbers and bools as they are; anything else as nullable strings."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.rename_categories([str(c) for c in s.cat.categories])
    if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
        return s
    return s.astype("string").astype(object).where(s.notna(), None)


def _reader(elem, where: str, read_elem):
    """Row reader for the count matrix; a CSC matrix is converted in memory (it cannot be streamed by row)."""
    import h5py

    if isinstance(elem, h5py.Group) and elem.attrs.get("encoding-type", "") == "csc_matrix":
        return _InMemory(sp.csr_matrix(read_elem(elem), dtype=np.float32))
    return _RowReader(elem, where)


class _InMemory:
    def __init__(self, x: sp.csr_matrix) -> None:
        self.x, self.shape = x, x.shape

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        return self.x[rows]


def _default_chunk(reader, n: int, g: int) -> int:
    mean_nnz = (reader._indptr[-1] / max(n, 1)) if hasattr(reader, "_indptr") else g
    return int(np.clip(TARGET_CHUNK_NNZ / max(mean_nnz, 1), 1024, 262_144))

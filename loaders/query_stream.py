"""A query's cells streamed from a SOMA Experiment or Census-shaped collection, a bounded chunk at a time.

Mapping a query of millions of cells must not hold them all: the obs filter is resolved to sorted
soma_joinids reading that one column (8 bytes a cell), var is read once, and each chunk is one coordinate
read of X over ALL the query's genes (so a library size over all of them is possible), assembled as CSR.
obs names, when the store has them, are read per chunk. A chunk holds at most `chunk_cells` cells and, when
obs has the per-cell `nnz` column (Census and `scpermut ingest` stores do), at most `chunk_nnz` stored values:
cells vary ~10x in depth across datasets, so a cell count alone lets the largest chunk (hence the peak memory)
grow with the query. The next chunk is read in a background thread while the caller works on the current one.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from loaders.errors import DataError

DEFAULT_CHUNK_CELLS = 8192
DEFAULT_CHUNK_NNZ = 2_500_000  # stored values per chunk: ~50 MB as Arrow coordinates, ~20 MB as CSR
TRIM_EVERY_CHUNKS = 8


@dataclass
class QueryChunk:
    joinids: np.ndarray  # int64, sorted soma_joinids of these cells
    obs_names: np.ndarray | None  # obs["obs_name"] when the store has it (an ingested h5ad does; Census does not)
    x: sp.csr_matrix  # float32 raw counts, cells x every gene of `QueryStream.var` (in its order)


class QueryStream:
    """An open query: `joinids` (the filter's cells), `var` (all genes, feature_id/feature_name), `chunks()`."""

    def __init__(self, experiment, *, obs_filter: str | None = None, measurement: str = "RNA", layer: str = "raw",
                 chunk_cells: int = DEFAULT_CHUNK_CELLS, chunk_nnz: int = DEFAULT_CHUNK_NNZ,
                 where: str = "SOMA query", owned: tuple = ()) -> None:
        if chunk_cells < 1 or chunk_nnz < 1:
            raise DataError(f"{where}: chunk_cells and chunk_nnz must be >= 1 (got {chunk_cells}, {chunk_nnz}).")
        self.where, self.obs_filter, self._owned = where, obs_filter, tuple(owned)
        self.chunk_cells, self.chunk_nnz = int(chunk_cells), int(chunk_nnz)
        from loaders.sources.soma import measurement_with_layer

        ms = measurement_with_layer(experiment, measurement, layer, where)
        self._obs, self._x = experiment.obs, ms.X[layer]
        self.has_obs_name = "obs_name" in self._obs.schema.names
        self.joinids, nnz = self._resolve(obs_filter)
        self.bounds = chunk_bounds(nnz, self.chunk_cells, self.chunk_nnz) if nnz is not None else \
            np.append(np.arange(0, self.n_cells, self.chunk_cells), self.n_cells)
        var = ms.var.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        if len(var) == 0:
            raise DataError(f"{where}: the measurement has no genes (var is empty).")
        if "feature_id" not in var.columns and "feature_name" not in var.columns:
            raise DataError(f"{where}: var has neither feature_id nor feature_name; columns are {list(var.columns)}.")
        for key, other in (("feature_id", "feature_name"), ("feature_name", "feature_id")):
            if key not in var.columns:
                var[key] = var[other]
        var_ids = var["soma_joinid"].to_numpy(dtype=np.int64)
        self._var_lookup = np.full(int(var_ids.max()) + 1, -1, dtype=np.int64)  # var soma_joinid -> column
        self._var_lookup[var_ids] = np.arange(len(var_ids))
        names = var["var_name"] if "var_name" in var.columns else var["feature_id"]  # var_name: an ingested h5ad's
        self.var = var.drop(columns="soma_joinid").set_index(pd.Index(names.astype(str).to_numpy()))

    @property
    def n_cells(self) -> int:
        return len(self.joinids)

    @property
    def n_genes(self) -> int:
        return len(self.var)

    def _resolve(self, obs_filter: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Sorted soma_joinids of the cells the filter keeps, and their nnz when obs has it (only those columns
        are read)."""
        field = self._obs.schema.field("nnz") if "nnz" in self._obs.schema.names else None
        with_nnz = field is not None and pa.types.is_integer(field.type)
        cols = ["soma_joinid", "nnz"] if with_nnz else ["soma_joinid"]
        try:
            tables = list(self._obs.read(column_names=cols, value_filter=obs_filter))
        except Exception as exc:  # tiledbsoma raises SOMAError/ValueError/TileDBError for a bad filter
            columns = ", ".join(self._obs.schema.names[:30])
            raise DataError(f"{self.where}: bad --obs-filter {obs_filter!r}: {exc}. A SOMA value_filter looks like "
                            f"\"dataset_id == 'abc' and is_primary_data == True\"; obs columns: {columns}.") from exc
        ids = np.concatenate([t.column("soma_joinid").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
        if len(ids) == 0:
            what = f"--obs-filter {obs_filter!r} matches" if obs_filter else "obs has"
            raise DataError(f"{self.where}: {what} no cell; nothing to map.")
        order = np.argsort(ids, kind="stable")
        nnz = np.concatenate([t.column("nnz").fill_null(0).to_numpy() for t in tables])[order] if with_nnz else None
        return ids[order].astype(np.int64, copy=False), nnz

    def read_chunk(self, ids: np.ndarray) -> QueryChunk:
        from loaders.sources.soma import _local_rows, _to_csr

        table = self._x.read(coords=(pa.array(ids),)).tables().concat()
        rows = _local_rows(ids, table.column("soma_dim_0").to_numpy())
        cols = self._var_lookup[table.column("soma_dim_1").to_numpy()]
        x = _to_csr(rows, cols, table.column("soma_data").to_numpy(), (len(ids), self.n_genes))
        names = None
        if self.has_obs_name:
            obs = self.read_obs(ids, ["obs_name"])
            names = obs["obs_name"].astype(str).to_numpy()
        return QueryChunk(ids, names, x)

    def read_obs(self, ids: np.ndarray, columns: list[str] | None = None) -> pd.DataFrame:
        """obs rows of `ids` (sorted), in that order; `columns=None`: every column."""
        cols = None if columns is None else ["soma_joinid", *[c for c in columns if c != "soma_joinid"]]
        obs = self._obs.read(coords=(pa.array(ids),), column_names=cols).concat().to_pandas()
        pos = np.searchsorted(ids, obs["soma_joinid"].to_numpy())
        out = obs.iloc[np.argsort(pos, kind="stable")].reset_index(drop=True)
        if len(out) != len(ids):
            raise DataError(f"{self.where}: obs returned {len(out)} rows for {len(ids)} cells.")
        return out

    def chunks(self) -> Iterator[QueryChunk]:
        """The query's cells in joinid order, `chunk_cells` at a time (the next one read while this one is used)."""
        from loaders.memory import release_free_memory

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for i, (start, stop) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
                if i % TRIM_EVERY_CHUNKS == TRIM_EVERY_CHUNKS - 1:
                    release_free_memory()  # freed chunk buffers back to the OS: no slow creep over millions of cells
                ahead = pool.submit(self.read_chunk, self.joinids[start:stop])
                if pending is not None:
                    yield pending.result()
                pending = ahead
            if pending is not None:
                yield pending.result()

    def close(self) -> None:
        for handle in self._owned:
            handle.close()
        self._owned = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunk_bounds(nnz: np.ndarray, max_cells: int, max_nnz: int) -> np.ndarray:
    """Chunk start positions (and the end) such that each chunk has <= max_cells cells and <= max_nnz stored
    values (a single cell above max_nnz is a chunk of its own)."""
    cum = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
    bounds, start, n = [0], 0, len(nnz)
    while start < n:
        stop = int(np.searchsorted(cum, cum[start] + max_nnz, side="right")) - 1  # last end within budget
        stop = min(max(stop, start + 1), start + max_cells, n)
        bounds.append(stop)
        start = stop
    return np.asarray(bounds, dtype=np.int64)


def open_query_stream(uri: str, obs_filter: str | None = None, *, organism: str | None = None,
                      measurement: str = "RNA", layer: str | None = None, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                      chunk_nnz: int = DEFAULT_CHUNK_NNZ, tiledb_config: dict | None = None) -> QueryStream:
    """Open a SOMA Experiment, or a Census-shaped collection through `cellxgene_census.open_soma` (census_data/
    <organism>, default 'Homo sapiens'), as a query stream. Refuses an h5ad (it is not a store)."""
    import tiledbsoma

    from loaders.sources.census import CensusSpec, organism_key
    from loaders.sources.soma import open_experiment, open_soma_object, soma_context

    uri, layer = str(uri), layer or "raw"
    probe = open_soma_object(uri)
    try:
        is_experiment = isinstance(probe, tiledbsoma.Experiment)
        is_census = isinstance(probe, tiledbsoma.Collection) and "census_data" in probe
        kind = type(probe).__name__
    finally:
        probe.close()
    if is_experiment:
        if organism is not None:
            raise DataError(f"{uri}: is a SOMA Experiment; --organism applies to a Census-shaped collection only.")
        exp = open_experiment(uri, soma_context(tiledb_config))
        owned, where = (exp,), f"SOMA Experiment {uri}"
    elif is_census:
        spec = CensusSpec(census_version=None, uri=uri, organism=organism or "Homo sapiens",
                          tiledb_config=tiledb_config)
        census = spec._open_census()
        try:
            exp = spec._experiment(census)
        except BaseException:
            census.close()
            raise
        owned, where = (exp, census), f"{spec.where} [{organism_key(spec.organism)}]"
    else:
        raise DataError(f"{uri}: is a SOMA {kind}, not an Experiment nor a Census-shaped collection "
                        "(which holds 'census_data').")
    try:
        return QueryStream(exp, obs_filter=obs_filter, measurement=measurement, layer=layer,
                           chunk_cells=chunk_cells, chunk_nnz=chunk_nnz, where=where, owned=owned)
    except BaseException:
        for handle in owned:
            handle.close()
        raise

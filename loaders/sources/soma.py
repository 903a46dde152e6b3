"""A TileDB-SOMA Experiment as a `CellSource`: obs/var in memory, X read by sorted soma_joinid batches.

Each `read_counts` call is ONE coordinate read of X for the batch's (sorted) cell joinids and the
selected gene joinids, re-indexed to local positions and assembled as CSR without densifying.
The same class serves Census (see `census.py`), which passes an already-open Experiment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from loaders.errors import DataError
from loaders.selection import CellSelection, resolve_genes, standardize_obs
from loaders.sources.anndata_source import CHUNK_ROWS
from loaders.sources.base import SizedFromFrames

VALIDATE_ROWS = 256  # rows checked for raw counts when opening
# TileDB's reader budget defaults to 10 GiB: bound it so loader memory is set by configuration, not by the
# store (measured: same cells/s as the default on a 1M-cell store, ~1.5 GB less peak RSS).
DEFAULT_TILEDB_CONFIG = {"sm.mem.total_budget": str(256 * 2**20)}


def tiledb_config_with_defaults(tiledb_config: dict | None = None, init_buffer_bytes: int | None = None) -> dict:
    """The user's TileDB settings over our defaults; `soma.init_buffer_bytes` bounds one read's result buffers."""
    cfg = {**DEFAULT_TILEDB_CONFIG, **(tiledb_config or {})}
    if init_buffer_bytes is not None:
        cfg["soma.init_buffer_bytes"] = int(init_buffer_bytes)
    return cfg


def soma_context(tiledb_config: dict | None = None, init_buffer_bytes: int | None = None):
    import tiledbsoma

    return tiledbsoma.SOMATileDBContext(tiledb_config=tiledb_config_with_defaults(tiledb_config, init_buffer_bytes))


@dataclass(frozen=True)
class SomaExperimentSpec:
    """Picklable recipe for a SOMA Experiment source (workers open it lazily themselves)."""

    uri: str
    selection: CellSelection = field(default_factory=CellSelection)
    measurement: str = "RNA"
    layer: str = "raw"
    tiledb_config: dict | None = None
    init_buffer_bytes: int | None = None

    def open(self, joinids: np.ndarray | None = None) -> "SomaExperimentSource":
        """`joinids`: the selection's storage rows, already known (a training rank's counts reader: obs unread)."""
        exp = open_experiment(self.uri, soma_context(self.tiledb_config, self.init_buffer_bytes))
        try:
            src = SomaExperimentSource(exp, self.selection, self.measurement, self.layer,
                                       where=f"SOMA Experiment {self.uri}", owned=(exp,), joinids=joinids)
        except BaseException:
            exp.close()
            raise
        src.spec = self
        return src


def open_soma_object(uri: str, context=None):
    """Open any SOMA object read-only, turning 'not there' / 'not SOMA' into a DataError."""
    import tiledbsoma

    try:
        return tiledbsoma.open(str(uri), mode="r", context=context)
    except (tiledbsoma.DoesNotExistError, tiledbsoma.SOMAError, ValueError, TypeError) as exc:
        raise DataError(
            f"{uri}: does not exist or is not a SOMA object ({type(exc).__name__}: {exc}). "
            "Give the path of a SOMA Experiment, a Census-shaped Collection, or an .h5ad file."
        ) from exc


def open_experiment(uri: str, context=None):
    import tiledbsoma

    obj = open_soma_object(uri, context)
    if isinstance(obj, tiledbsoma.Experiment):
        return obj
    kind = type(obj).__name__
    keys = list(obj.keys()) if isinstance(obj, tiledbsoma.Collection) else []
    obj.close()
    hint = (" It looks like a Census collection: open it with CensusSpec(uri=...) (or spec_from_uri)."
            if "census_data" in keys else "")
    raise DataError(f"{uri}: is a SOMA {kind}, not an Experiment (keys: {keys[:10]}).{hint}")


class SomaExperimentSource(SizedFromFrames):
    """An open SOMA Experiment restricted to a `CellSelection`."""

    spec: SomaExperimentSpec | None = None

    def __init__(self, experiment, selection: CellSelection = CellSelection(), measurement: str = "RNA",
                 layer: str = "raw", where: str = "SOMA Experiment", owned: tuple = (),
                 joinids: np.ndarray | None = None) -> None:
        self.where, self._owned = where, tuple(owned)
        ms = measurement_with_layer(experiment, measurement, layer, where)
        self._x = ms.X[layer]
        # Given joinids (shared, read-only), obs is never read: no per-cell strings, no per-cell copy.
        self.obs = self._read_obs(experiment.obs, selection) if joinids is None else \
            pd.DataFrame({"soma_joinid": np.asarray(joinids)}, copy=False)
        var = ms.var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
        var = var.sort_values("soma_joinid").reset_index(drop=True)
        if len(var) == 0:
            raise DataError(f"{where}: the measurement has no genes (var is empty).")
        pos = resolve_genes(var, selection.genes, where)
        self._var_ids = var["soma_joinid"].to_numpy(dtype=np.int64)[pos]
        self.var = var.iloc[pos][["feature_id", "feature_name"]].reset_index(drop=True)
        self._all_genes = len(pos) == len(var)
        lookup_size = int(var["soma_joinid"].max()) + 1
        self._var_lookup = np.full(lookup_size, -1, dtype=np.int64)  # var soma_joinid -> local column
        self._var_lookup[self._var_ids] = np.arange(len(self._var_ids))
        self._joinids = np.asarray(joinids) if joinids is not None else self.obs["soma_joinid"].to_numpy(dtype=np.int64)
        n = min(VALIDATE_ROWS, self.n_cells)
        from loaders.validate import check_raw_counts

        check_raw_counts(self.read_counts(np.arange(n)), f"{where} X[{layer!r}]")

    def _read_obs(self, obs_df, selection: CellSelection) -> pd.DataFrame:
        names = set(obs_df.schema.names)
        missing = [c for c in selection.obs_columns_needed if c not in names]
        if missing:
            raise DataError(
                f"{self.where}: obs has no column(s) {missing}. Available columns: {sorted(names)[:40]}. "
                "Pass an existing column as the label/batch key."
            )
        cols = ["soma_joinid", *[c for c in selection.obs_columns_needed if c != "soma_joinid"]]
        tables = [dictionary_encoded(t) for t in self._obs_tables(obs_df, cols, selection.obs_value_filter)]
        obs = pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame()
        if len(obs) == 0:
            what = f"obs_value_filter {selection.obs_value_filter!r} matches" if selection.obs_value_filter else "obs has"
            raise DataError(f"{self.where}: {what} no cell.")
        if not obs["soma_joinid"].is_monotonic_increasing:
            obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
        std = standardize_obs(obs, selection, self.where)
        return std

    def _obs_tables(self, obs_df, cols: list[str], value_filter: str | None):
        """The obs read batch by batch (so string columns are encoded before all cells are in memory)."""
        try:
            yield from obs_df.read(column_names=cols, value_filter=value_filter)
        except Exception as exc:  # tiledbsoma raises SOMAError/ValueError/TileDBError for a bad filter
            raise DataError(f"{self.where}: bad obs_value_filter {value_filter!r}: {exc}") from exc

    def read_counts(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        ids = self._joinids[rows]
        if len(ids) == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        coords = (pa.array(ids),) if self._all_genes else (pa.array(ids), pa.array(self._var_ids))
        table = self._x.read(coords=coords).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy()
        return _to_csr(_local_rows(ids, dim0), self._var_lookup[dim1], data, (len(ids), self.n_genes))

    def chunk_ids(self) -> np.ndarray:
        return self._joinids // CHUNK_ROWS

    def close(self) -> None:
        for handle in self._owned:
            handle.close()
        self._owned = ()

    def __reduce__(self):
        if self.spec is None:
            raise TypeError(f"{self.where}: a source built on an open Experiment cannot be pickled; use its spec.")
        return (_open_spec, (self.spec,))


def measurement_with_layer(experiment, measurement: str, layer: str, where: str):
    """`experiment.ms[measurement]`, checked to hold X layer `layer` (a clear error naming what exists)."""
    if measurement not in experiment.ms:
        raise DataError(f"{where}: no measurement {measurement!r}; measurements are {list(experiment.ms.keys())}.")
    ms = experiment.ms[measurement]
    if "X" not in ms or layer not in ms.X:
        layers = list(ms.X.keys()) if "X" in ms else []
        raise DataError(f"{where}: measurement {measurement!r} has no X layer {layer!r}; layers are {layers}.")
    return ms


def _open_spec(spec):
    return spec.open()


def dictionary_encoded(table: pa.Table) -> pa.Table:
    """String columns dictionary-encoded, so `to_pandas()` makes categoricals, not one Python str per cell.

    Census stores obs columns such as cell_type dictionary-encoded or as plain strings depending on the
    version; both end up categorical. Other columns (soma_joinid: int64) are left as they are.
    """
    import pyarrow.compute as pc

    for i, col in enumerate(table.columns):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
            table = table.set_column(i, table.field(i).name, pc.dictionary_encode(col))
    return table


def _local_rows(ids: np.ndarray, dim0: np.ndarray) -> np.ndarray:
    """Position in `ids` of each returned joinid. TileDB returns a cell's values together, so the
    lookup runs once per run of equal joinids (O(nnz) overall, not O(nnz log n))."""
    if len(dim0) == 0:
        return dim0
    starts = np.concatenate([[0], np.flatnonzero(dim0[1:] != dim0[:-1]) + 1])
    lengths = np.diff(np.append(starts, len(dim0)))
    heads = dim0[starts]
    if np.all(ids[1:] > ids[:-1]):  # the contract: sorted rows, and obs is in joinid order
        pos = np.searchsorted(ids, heads)
    else:
        pos = pd.Index(ids).get_indexer(heads)
    return np.repeat(pos, lengths)


def _to_csr(rows: np.ndarray, cols: np.ndarray, data: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """COO -> float32 CSR with sorted indices, via tiledbsoma's multi-threaded builder when available."""
    data = data.astype(np.float32, copy=False)
    try:
        from tiledbsoma._fastercsx import CompressedMatrix

        return CompressedMatrix.from_ijd(rows, cols, data, shape=shape, format="csr", make_sorted=True,
                                         context=_csx_context()).to_scipy()
    except ImportError:  # older/newer tiledbsoma without the private builder
        return sp.csr_matrix((data, (rows, cols)), shape=shape)


_CSX_CONTEXT = None


def _csx_context():
    global _CSX_CONTEXT
    if _CSX_CONTEXT is None:
        import tiledbsoma

        _CSX_CONTEXT = tiledbsoma.SOMATileDBContext()
    return _CSX_CONTEXT

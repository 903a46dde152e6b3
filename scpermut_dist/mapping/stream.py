"""Map a query held in a SOMA Experiment or Census-shaped collection, streamed chunk by chunk.

The gene alignment is planned once from the store's var; each chunk of cells (counts over all the query's
genes) goes through the same per-chunk mapping as an h5ad query, and is appended to the output: a parquet
file (one row group per chunk, memory bounded whatever the query size) keyed by `soma_joinid`, or, for
small queries, the annotated AnnData of the existing h5ad path. Both are written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from loaders.errors import DataError
from loaders.query_stream import (
    DEFAULT_CHUNK_CELLS,
    DEFAULT_CHUNK_NNZ,
    QueryChunk,
    QueryStream,
    open_query_stream,
)
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.align import (
    MIN_GENE_FRACTION,
    QueryPlan,
    plan_query,
    prepare_query_chunk,
)
from scpermut_dist.mapping.output import MappingResult, write_h5ad_atomic
from scpermut_dist.mapping.predict import Predictor
from scpermut_dist.mapping.reference import Reference

MAX_H5AD_CELLS = 500_000  # above this an h5ad output (which holds the counts in memory) is refused: use parquet
OUTPUT_SUFFIXES = (".h5ad", ".parquet")


@dataclass
class StreamSummary:
    out: Path
    n_cells: int
    n_genes_found: int
    n_genes_model: int
    matched_by: str
    label_counts: dict[str, int]
    where: str


def map_chunk(predictor: Predictor, x_all_genes: sp.csr_matrix, plan: QueryPlan, obs_names: list[str]
              ) -> MappingResult:
    """One chunk through the h5ad path's own steps: `prepare_query_chunk` (checked counts, library size over
    all query genes, model gene order) then the reference's `Predictor` (calibration, neighbours, unknown)."""
    x_ng = torch.from_numpy(prepare_query_chunk(x_all_genes, plan))
    return predictor.predict(x_ng, obs_names, plan.n_genes_found, plan.n_genes_model, plan.matched_by,
                             chunk=max(len(obs_names), 1))


def check_output_path(out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give an .h5ad or .parquet file path")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {out}: the output must end in .h5ad (small queries) or .parquet (any size)")
    return out


def map_store(ref: Reference, uri: str, out: str | Path, *, obs_filter: str | None = None,
              organism: str | None = None, layer: str | None = None, chunk_cells: int = DEFAULT_CHUNK_CELLS,
              chunk_nnz: int = DEFAULT_CHUNK_NNZ, probabilities: bool = True, max_h5ad_cells: int = MAX_H5AD_CELLS,
              progress: bool = True, tiledb_config: dict | None = None, gene_key: str | None = None,
              min_gene_fraction: float = MIN_GENE_FRACTION, unknown_confidence: float | None = None,
              unknown_quantile: float | None = None) -> StreamSummary:
    """Map every cell of `uri` that `obs_filter` keeps and write `out` (.parquet or .h5ad) atomically."""
    out = check_output_path(out)
    with open_query_stream(uri, obs_filter, organism=organism, layer=layer, chunk_cells=chunk_cells,
                           chunk_nnz=chunk_nnz, tiledb_config=tiledb_config) as stream:
        if out.suffix.lower() == ".h5ad" and stream.n_cells > max_h5ad_cells:
            raise UsageError(f"{stream.where}: the query has {stream.n_cells:,} cells, above the {max_h5ad_cells:,} "
                             f"an .h5ad output allows (it holds the counts in memory); write --out "
                             f"{out.with_suffix('.parquet')} instead (streamed, keyed by soma_joinid).")
        plan = plan_query(stream.var, ref.genes, ref.normalization, gene_key, min_gene_fraction, where=stream.where)
        predictor = ref.predictor(unknown_confidence, unknown_quantile)
        if out.suffix.lower() == ".parquet":
            writer = ParquetResultWriter(out, ref, probabilities)
        else:
            writer = H5adResultWriter(out, ref, stream)
        labels = pd.Series(0, index=list(ref.classes), dtype=np.int64)
        with writer:
            for chunk, result in _mapped_chunks(predictor, stream, plan, progress):
                writer.append(chunk, result)
                labels = labels.add(pd.Series(result.labels).value_counts(), fill_value=0)
        return StreamSummary(out=out, n_cells=stream.n_cells, n_genes_found=plan.n_genes_found,
                             n_genes_model=plan.n_genes_model, matched_by=plan.matched_by,
                             label_counts={k: int(v) for k, v in labels.items()}, where=stream.where)


def _mapped_chunks(predictor: Predictor, stream: QueryStream, plan: QueryPlan, progress: bool):
    from tqdm.auto import tqdm

    with tqdm(total=stream.n_cells, desc="map", unit="cell", unit_scale=True, disable=not progress) as bar:
        for chunk in stream.chunks():
            yield chunk, map_chunk(predictor, chunk.x, plan, _names(chunk))
            bar.update(len(chunk.joinids))


def _names(chunk: QueryChunk) -> list[str]:
    return list(chunk.obs_names) if chunk.obs_names is not None else [str(j) for j in chunk.joinids]


def _tmp_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}"


class ParquetResultWriter:
    """One row group per chunk into a temporary sibling, renamed onto `out` only when every chunk is in.

    Columns: soma_joinid, obs_name (when the store has it), label, confidence, every other per-cell result
    field the reference gives (label_raw, unknown, unknown_score, neighbor_label, neighbor_agreement),
    z0..z{d-1} (latent) and, unless disabled, p_<class> per class.
    The schema metadata `scpermut` holds the model info, classes and gene overlap as JSON.
    """

    def __init__(self, out: Path, ref: Reference, probabilities: bool = True) -> None:
        self.out, self.ref, self.probabilities = Path(out).absolute(), ref, probabilities
        self.tmp = _tmp_sibling(self.out)
        self._writer: pq.ParquetWriter | None = None

    def table(self, chunk: QueryChunk, result: MappingResult) -> pa.Table:
        n = len(chunk.joinids)
        cols: dict[str, pa.Array] = {"soma_joinid": pa.array(chunk.joinids, pa.int64())}
        if chunk.obs_names is not None:
            cols["obs_name"] = pa.array(chunk.obs_names.astype(str), pa.string())
        cols["label"] = pa.array(result.labels.astype(str), pa.string())
        cols["confidence"] = pa.array(result.confidence.astype(np.float32))
        for f in dataclasses.fields(result):  # further per-cell results (unknown flag/score, ...)
            v = getattr(result, f.name)
            if f.name not in ("labels", "confidence", "latent") and isinstance(v, np.ndarray) and v.shape == (n,):
                name = {"labels_raw": "label_raw"}.get(f.name, f.name)
                cols[name] = pa.array(v.astype(np.float32) if v.dtype.kind == "f" else
                                      v.astype(str) if v.dtype.kind in "OU" else v)
        for d in range(result.latent.shape[1]):
            cols[f"z{d}"] = pa.array(result.latent[:, d].astype(np.float32))
        if self.probabilities:
            for c, name in enumerate(result.probabilities.columns):
                cols[f"p_{name}"] = pa.array(result.probabilities.iloc[:, c].to_numpy(dtype=np.float32))
        return pa.table(cols)

    def append(self, chunk: QueryChunk, result: MappingResult) -> None:
        table = self.table(chunk, result)
        if self._writer is None:
            info = {**self.ref.model_info(), "classes": list(self.ref.classes),
                    "n_genes_model": result.n_genes_model, "n_genes_found": result.n_genes_found,
                    "genes_matched_by": result.matched_by}
            schema = table.schema.with_metadata({"scpermut": json.dumps(info, default=str)})
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self._writer.write_table(table.replace_schema_metadata(self._writer.schema.metadata),
                                 row_group_size=max(table.num_rows, 1))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if exc_type is None:
                if self._writer is None:
                    raise DataError(f"{self.out}: no cell was mapped; nothing written.")
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self.tmp, self.out)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


class H5adResultWriter:
    """Small queries: collects the chunks, then the h5ad path's annotate + write_h5ad_atomic.

    The AnnData holds the query's raw counts over all its genes, obs (every store column, soma_joinid
    among them) and the mapping annotations, exactly as `scpermut map` writes for an h5ad query.
    """

    def __init__(self, out: Path, ref: Reference, stream: QueryStream) -> None:
        self.out, self.ref, self.stream = out, ref, stream
        self.chunks: list[QueryChunk] = []
        self.results: list[MappingResult] = []

    def append(self, chunk: QueryChunk, result: MappingResult) -> None:
        self.chunks.append(chunk), self.results.append(result)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        if not self.chunks:
            raise DataError(f"{self.out}: no cell was mapped; nothing written.")
        joinids = np.concatenate([c.joinids for c in self.chunks])
        obs = self.stream.read_obs(joinids)
        names = [n for c in self.chunks for n in _names(c)]
        obs.index = pd.Index(names, name=None)
        obs = obs.drop(columns=[c for c in ("obs_name",) if c in obs.columns])
        var = self.stream.var.copy()
        adata = ad.AnnData(X=sp.vstack([c.x for c in self.chunks], format="csr"), obs=obs, var=var)
        adata.obs_names_make_unique(), adata.var_names_make_unique()
        self.ref.annotate(adata, MappingResult.concat(self.results))
        write_h5ad_atomic(adata, self.out)

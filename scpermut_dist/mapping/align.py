"""Map a query onto a trained reference: align genes (mapping/genes.py), normalise as in training, predict
in chunks.

The query needs raw counts only (no label, no batch column). Model genes absent from the query are
zero-filled with a warning; fewer than `min_gene_fraction` (default half) found is refused, since
predictions would be meaningless. Each cell is divided by its own total counts over ALL of its genes
(as the reference cells were), so a query missing model genes is not scaled up against the reference.

Streaming interface (any chunked reader, e.g. SOMA): `plan = plan_query(var, genes, normalization, ...)`
once, then `x_ng = prepare_query_chunk(x_chunk, plan)` per chunk of raw counts over all query genes.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from loaders.errors import DataError
from loaders.normalize import Normalization
from loaders.sources.anndata_source import RAW_LAYER, counts_and_var
from loaders.validate import check_raw_counts
from scpermut_dist.mapping.genes import MIN_GENE_FRACTION, Duplicates, GeneAlignment
from scpermut_dist.mapping.genes import align_genes as _align
from scpermut_dist.mapping.output import MappingResult
from scpermut_dist.mapping.predict import Predictor
from scpermut_dist.model.module import ScPermutModule

log = logging.getLogger(__name__)
CHUNK_CELLS = 4096  # cells densified at a time: memory stays bounded whatever the query size

__all__ = ["CHUNK_CELLS", "MIN_GENE_FRACTION", "QueryPlan", "map_anndata",
           "plan_query", "prepare_query_chunk"]


@dataclass(frozen=True)
class QueryPlan:
    """How every chunk of one query becomes model input: the gene alignment and the model's normalisation."""

    alignment: GeneAlignment
    normalization: Normalization
    where: str = "query"

    @property
    def n_query_genes(self) -> int:
        return self.alignment.n_query_genes

    @property
    def n_genes_found(self) -> int:
        return self.alignment.n_found

    @property
    def n_genes_model(self) -> int:
        return self.alignment.n_model_genes

    @property
    def matched_by(self) -> str:
        return self.alignment.matched_by


def plan_query(query_var: pd.DataFrame, genes: pd.DataFrame, normalization: Normalization,
               gene_key: str | None = None, min_gene_fraction: float = MIN_GENE_FRACTION,
               duplicates: Duplicates = "sum", where: str = "query") -> QueryPlan:
    """Align the query's var (all of its genes, in column order) to the model genes; DataError below the floor."""
    if len(query_var) == 0:
        raise DataError(f"{where}: the query has no genes.")
    alignment = _align(query_var, genes, gene_key=gene_key, min_gene_fraction=min_gene_fraction,
                       duplicates=duplicates, where=where)
    return QueryPlan(alignment, normalization, where)


def prepare_query_chunk(x_chunk, plan: QueryPlan) -> np.ndarray:
    """Raw counts of some query cells over ALL query genes (CSR, or anything scipy converts) -> the
    normalised dense float32 model input x_ng (cells x model genes).

    Every value is checked (DataError for negative, NaN/inf or non-integer counts); each cell's library
    size is its total over all its genes; duplicated genes are summed as the plan says.
    """
    x = x_chunk if sp.issparse(x_chunk) and x_chunk.format == "csr" else sp.csr_matrix(x_chunk)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if x.shape[1] != plan.n_query_genes:
        raise DataError(f"{plan.where}: a chunk has {x.shape[1]} genes, the query's var {plan.n_query_genes}.")
    check_raw_counts(x, plan.where, max_values=max(x.nnz, 1))
    totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    counts = plan.alignment.aligned(x)
    return plan.normalization.apply_csr(counts, totals=totals, copy=False).toarray()


def map_anndata(module: ScPermutModule | Sequence[ScPermutModule], classes: list[str], genes: pd.DataFrame,
                normalization: Normalization, adata: ad.AnnData, layer: str | None = None, where: str = "query",
                chunk_cells: int = CHUNK_CELLS, gene_key: str | None = None,
                min_gene_fraction: float = MIN_GENE_FRACTION, duplicates: Duplicates = "sum") -> MappingResult:
    """Predict labels, probabilities and latent coordinates for every cell of `adata`.

    `module` may be an ensemble's members: the latent is the first member's, the probabilities their mean;
    or a `Predictor` (calibration, reference neighbours, unknown rule: `Predictor.from_reference`).
    """
    matrix, var = query_matrix(adata, layer, where)
    predictor = module if isinstance(module, Predictor) else Predictor(
        [module] if isinstance(module, ScPermutModule) else list(module), list(classes))
    obs_names = adata.obs_names.astype(str)
    parts = []
    with suggest_raw(adata, layer):
        plan = plan_query(var, genes, normalization, gene_key, min_gene_fraction, duplicates, where)
        for start in range(0, adata.n_obs, chunk_cells):
            x_ng = torch.from_numpy(prepare_query_chunk(matrix[start:start + chunk_cells], plan))
            parts.append(predictor.predict(x_ng, obs_names[start:start + chunk_cells], plan.n_genes_found,
                                           plan.n_genes_model, plan.matched_by, chunk=chunk_cells))
    return MappingResult.concat(parts)


@contextmanager
def suggest_raw(adata: ad.AnnData, layer: str | None):
    """A query refused for its genes or values while its `.raw` went unread: say that `--layer raw` reads it (the
    scanpy layout keeps log-normalised values of filtered genes in X, the counts of all genes in `.raw`)."""
    try:
        yield
    except DataError as exc:
        if adata.raw is None or layer == RAW_LAYER or "--layer raw" in str(exc):
            raise
        raise DataError(f"{exc} The file's .raw holds {adata.raw.n_vars} genes: if it holds the raw counts, "
                        "--layer raw reads them.") from exc


def query_matrix(adata: ad.AnnData, layer: str | None, where: str) -> tuple[object, pd.DataFrame]:
    """The query's raw-count matrix and the var of its columns (`.raw`'s for layer "raw"), with clear errors for no
    cells, no genes, a missing layer or no counts."""
    if adata.n_obs == 0:
        raise DataError(f"{where}: the query has no cells.")
    matrix, var = counts_and_var(adata, layer, where)
    if var.shape[0] == 0:
        raise DataError(f"{where}: the query has no genes.")
    nonzero = matrix.count_nonzero() if sp.issparse(matrix) else np.count_nonzero(np.asarray(matrix))
    if nonzero == 0:
        raise DataError(f"{where}: the count matrix {('layer ' + repr(layer)) if layer else 'X'} is all zeros; "
                        "give the raw counts (e.g. --layer counts).")
    return matrix, var

"""Map a query onto a trained reference: align genes by name, normalise as in training, predict in chunks.

The query needs raw counts only (no label, no batch column). Model genes absent from the query are
zero-filled with a warning; fewer than half found is refused, since predictions would be meaningless.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from loaders.errors import DataError
from loaders.normalize import Normalization
from loaders.sources.anndata_source import var_with_feature_columns
from loaders.validate import check_raw_counts
from scpermut_dist.mapping.output import MappingResult
from scpermut_dist.mapping.predict import predict_proba
from scpermut_dist.model.module import ScPermutModule

log = logging.getLogger(__name__)
MIN_GENE_FRACTION = 0.5
CHUNK_CELLS = 4096  # cells densified at a time: memory stays bounded whatever the query size


def align_genes(query_var: pd.DataFrame, model_genes: pd.DataFrame, where: str = "query"
                ) -> tuple[np.ndarray, str]:
    """Query column of each model gene (-1 if absent), matching by feature_id or symbol, whichever finds more."""
    qv = var_with_feature_columns(query_var)
    best = None
    for key in ("feature_id", "feature_name"):
        index = pd.Index(qv[key].astype(str))
        first = np.flatnonzero(~index.duplicated())  # first occurrence wins for duplicated names
        hit = index[first].get_indexer(model_genes[key].astype(str))
        pos = np.where(hit >= 0, first[np.maximum(hit, 0)], -1)
        if best is None or (pos >= 0).sum() > (best[0] >= 0).sum():
            best = (pos, key)
    pos, key = best
    n_found, n_model = int((pos >= 0).sum()), len(model_genes)
    if n_found < MIN_GENE_FRACTION * n_model:
        example = ", ".join(model_genes["feature_id"].astype(str).head(3)) + " / " + \
            ", ".join(model_genes["feature_name"].astype(str).head(3))
        raise DataError(
            f"{where}: only {n_found} of the model's {n_model} genes are in the query (need at least "
            f"{MIN_GENE_FRACTION:.0%}). Genes are matched by Ensembl id or symbol (model genes look like: {example}); "
            "check the query's var_names / feature_id column and the organism."
        )
    if n_found < n_model:
        log.warning("%s: %d of %d model genes are missing from the query and are filled with zeros",
                    where, n_model - n_found, n_model)
    return pos, key


def aligned_counts(x, pos: np.ndarray) -> sp.csr_matrix:
    """Query counts in model gene order; absent genes are all-zero columns."""
    x = sp.csr_matrix(x, dtype=np.float32)
    found = np.flatnonzero(pos >= 0)
    sub = x[:, pos[found]].tocoo()
    return sp.csr_matrix((sub.data, (sub.row, found[sub.col])), shape=(x.shape[0], len(pos)), dtype=np.float32)


def map_anndata(module: ScPermutModule | Sequence[ScPermutModule], classes: list[str], genes: pd.DataFrame,
                normalization: Normalization, adata: ad.AnnData, layer: str | None = None, where: str = "query",
                chunk_cells: int = CHUNK_CELLS) -> MappingResult:
    """Predict labels, probabilities and latent coordinates for every cell of `adata`.

    `module` may be an ensemble's members: the latent is the first member's, the probabilities their mean.
    """
    if adata.n_obs == 0:
        raise DataError(f"{where}: the query has no cells.")
    if adata.n_vars == 0:
        raise DataError(f"{where}: the query has no genes.")
    if layer is not None and layer not in adata.layers:
        raise DataError(f"{where}: no layer {layer!r}; layers are {list(adata.layers)}. Omit --layer to use X.")
    matrix = adata.layers[layer] if layer else adata.X
    if matrix is None:
        raise DataError(f"{where}: X is empty; pass --layer with the raw counts.")
    pos, key = align_genes(adata.var, genes, where)
    latents, probas = [], []
    for start in range(0, adata.n_obs, chunk_cells):
        x = aligned_counts(matrix[start:start + chunk_cells], pos)
        check_raw_counts(x, where)
        x_ng = torch.from_numpy(normalization.apply_dense(x))
        z, p = predict_proba(module, x_ng, chunk=chunk_cells)
        latents.append(z), probas.append(p)
    proba = np.concatenate(probas)
    names = np.asarray(classes, dtype=object)
    return MappingResult(labels=names[proba.argmax(axis=1)].astype(str), confidence=proba.max(axis=1),
                         probabilities=pd.DataFrame(proba, index=adata.obs_names.astype(str), columns=list(classes)),
                         latent=np.concatenate(latents), n_genes_found=int((pos >= 0).sum()),
                         n_genes_model=len(genes), matched_by=key)

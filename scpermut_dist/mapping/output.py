"""What mapping produces and how it is written: `MappingResult`, AnnData annotation, atomic h5ad I/O."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from loaders.errors import DataError


@dataclass
class MappingResult:
    labels: np.ndarray  # predicted class name per cell (str)
    confidence: np.ndarray  # max class probability
    probabilities: pd.DataFrame  # cells x classes
    latent: np.ndarray  # cells x latent_dim
    n_genes_found: int
    n_genes_model: int
    matched_by: str  # "feature_id" or "feature_name"


def annotate(adata: ad.AnnData, result: MappingResult, model_info: dict) -> ad.AnnData:
    """Write the result into `adata`.

    obs: `scpermut_label` (categorical over the reference classes), `scpermut_confidence` (max class
    probability); obsm: `X_scpermut` (latent), `scpermut_probabilities` (cells x classes float32 array
    whose column order is `uns["scpermut"]["classes"]`: an array, not a DataFrame, because class names
    such as "CD4+/CD25 T Reg" are not valid HDF5 column keys); uns: `scpermut` (model info, classes).
    `MappingResult.probabilities` is the same as a labelled DataFrame.
    """
    classes = list(result.probabilities.columns)
    adata.obs["scpermut_label"] = pd.Categorical(result.labels, categories=classes)
    adata.obs["scpermut_confidence"] = result.confidence.astype(np.float32)
    adata.obsm["X_scpermut"] = result.latent.astype(np.float32)
    adata.obsm["scpermut_probabilities"] = result.probabilities.to_numpy(dtype=np.float32)
    adata.uns["scpermut"] = {**model_info, "classes": classes, "n_genes_model": result.n_genes_model,
                             "n_genes_found": result.n_genes_found, "genes_matched_by": result.matched_by,
                             "confidence": "max class probability"}
    return adata


def read_h5ad(path: str | Path, where: str | None = None) -> ad.AnnData:
    """Read an h5ad with clear DataErrors for missing, empty or non-AnnData files."""
    p = Path(path)
    where = where or f"h5ad {p}"
    if not p.is_file():
        raise DataError(f"{where}: file not found. Check the path.")
    import h5py

    if p.stat().st_size == 0 or not h5py.is_hdf5(p):
        raise DataError(f"{where}: not an h5ad file (empty or not HDF5). Provide an AnnData .h5ad file with raw counts.")
    try:
        return ad.read_h5ad(p)
    except Exception as exc:  # anndata/h5py raise many types for a malformed file
        raise DataError(f"{where}: could not be read as AnnData ({type(exc).__name__}: {exc}).") from exc


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write to a temporary sibling, fsync, then rename: readers never see a half-written file."""
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}.h5ad"
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out

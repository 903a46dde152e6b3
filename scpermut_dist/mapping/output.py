"""What mapping produces and how it is written: `MappingResult`, AnnData annotation, atomic h5ad I/O."""
from __future__ import annotations

import dataclasses
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
    """Per-cell outputs (arrays / a frame, concatenable chunk by chunk) and run-level fields."""

    labels: np.ndarray  # predicted class name per cell (str); "unknown" where the model abstains
    confidence: np.ndarray  # max class probability (calibrated when `calibrated`)
    probabilities: pd.DataFrame  # cells x classes
    latent: np.ndarray  # cells x latent_dim
    n_genes_found: int
    n_genes_model: int
    matched_by: str  # "feature_id" or "feature_name"
    labels_raw: np.ndarray | None = None  # the model's argmax class, before abstention
    unknown: np.ndarray | None = None  # bool: abstained (None: the reference has no unknown rule)
    unknown_score: np.ndarray | None = None  # float, higher = more likely a type absent from the reference
    neighbor_label: np.ndarray | None = None  # majority type of the k nearest reference cells (None: no sample)
    neighbor_agreement: np.ndarray | None = None  # fraction of those neighbours of that type
    thresholds: dict | None = None  # the unknown rule applied (confidence, quantile, distance, k)
    calibrated: bool = False

    @classmethod
    def concat(cls, parts: list[MappingResult]) -> MappingResult:
        """Chunk results as one: per-cell arrays and frames concatenated, run-level fields from the first."""
        values = {}
        for f in dataclasses.fields(cls):
            first = getattr(parts[0], f.name)
            if isinstance(first, np.ndarray):
                values[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
            elif isinstance(first, pd.DataFrame):
                values[f.name] = pd.concat([getattr(p, f.name) for p in parts])
            else:
                values[f.name] = first
        return cls(**values)


# What `annotate` (and the --server client) write: obs columns and obsm keys named `scpermut_*`, the latent
# `obsm["X_scpermut"]` and `uns["scpermut"]`. `clear_annotations` removes all of them (and `uns["scpermut_*"]`,
# e.g. scanpy's `scpermut_label_colors`) before a new result is written, so a re-mapped file holds only its
# new model's results.
PREFIX = "scpermut_"
LATENT_KEY = "X_scpermut"
PROBABILITIES_KEY = "scpermut_probabilities"
UNS_KEY = "scpermut"


def clear_annotations(adata: ad.AnnData) -> list[str]:
    """Remove every obs column, obsm key and uns key a previous `scpermut map` wrote; returns what was removed
    (as "obs/NAME", "obsm/NAME", "uns/NAME")."""
    removed = []
    for col in [c for c in adata.obs.columns if str(c).startswith(PREFIX)]:
        del adata.obs[col]
        removed.append(f"obs/{col}")
    for key in [k for k in adata.obsm.keys() if k == LATENT_KEY or str(k).startswith(PREFIX)]:
        del adata.obsm[key]
        removed.append(f"obsm/{key}")
    for key in [k for k in adata.uns.keys() if k == UNS_KEY or str(k).startswith(PREFIX)]:
        del adata.uns[key]
        removed.append(f"uns/{key}")
    return removed


def annotate(adata: ad.AnnData, result: MappingResult, model_info: dict) -> ad.AnnData:
    """Write the result into `adata`, after removing any earlier mapping's outputs (`clear_annotations`).

    obs: `scpermut_label` (categorical over the reference classes, plus "unknown" when the reference
    abstains), `scpermut_confidence` (max class probability, calibrated when the checkpoint is),
    `scpermut_label_raw` (the argmax before abstention), `scpermut_unknown` (bool), `scpermut_unknown_score`,
    `scpermut_neighbor_label` / `scpermut_neighbor_agreement` (when the checkpoint has reference
    neighbours); obsm: `X_scpermut` (latent), `scpermut_probabilities` (cells x classes float32 array
    whose column order is `uns["scpermut"]["classes"]`: an array, not a DataFrame, because class names
    such as "CD4+/CD25 T Reg" are not valid HDF5 column keys); uns: `scpermut` (model info, classes).
    `MappingResult.probabilities` is the same as a labelled DataFrame.
    """
    from scpermut_dist.mapping.unknown import UNKNOWN_LABEL

    clear_annotations(adata)
    classes = list(result.probabilities.columns)
    label_categories = classes + ([UNKNOWN_LABEL] if result.unknown is not None and UNKNOWN_LABEL not in classes else [])
    adata.obs["scpermut_label"] = pd.Categorical(result.labels, categories=label_categories)
    adata.obs["scpermut_confidence"] = result.confidence.astype(np.float32)
    if result.labels_raw is not None:
        adata.obs["scpermut_label_raw"] = pd.Categorical(result.labels_raw, categories=classes)
    if result.unknown is not None:
        adata.obs["scpermut_unknown"] = np.asarray(result.unknown, dtype=bool)
        adata.obs["scpermut_unknown_score"] = np.asarray(result.unknown_score, dtype=np.float32)
    if result.neighbor_label is not None:
        adata.obs["scpermut_neighbor_label"] = pd.Categorical(result.neighbor_label, categories=classes)
        adata.obs["scpermut_neighbor_agreement"] = np.asarray(result.neighbor_agreement, dtype=np.float32)
    adata.obsm[LATENT_KEY] = result.latent.astype(np.float32)
    adata.obsm[PROBABILITIES_KEY] = result.probabilities.to_numpy(dtype=np.float32)
    n_model = max(int(result.n_genes_model), 1)
    adata.uns[UNS_KEY] = _h5ad_safe({
        **model_info, "classes": classes, "n_genes_model": result.n_genes_model,
        "n_genes_found": result.n_genes_found, "gene_overlap": result.n_genes_found / n_model,
        "genes_matched_by": result.matched_by,
        "confidence": "calibrated max class probability" if result.calibrated else "max class probability",
        **({"unknown_thresholds": result.thresholds} if result.thresholds else {})})
    return adata


def _h5ad_safe(value):
    """uns content h5ad can store: None dropped, tuples as lists, numpy scalars as Python numbers, and a list of
    dicts (an ensemble's per-member calibration) as a dict keyed "0", "1", ... (h5ad has no list of groups)."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, dict) for v in value):
            return {str(i): _h5ad_safe(v) for i, v in enumerate(value) if v is not None}
        return [_h5ad_safe(v) for v in value if v is not None]
    if isinstance(value, np.generic):
        return value.item()
    return value


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

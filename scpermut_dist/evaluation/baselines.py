"""Two reference-only baselines that every scPermut number is compared against.

- `logreg`: CellTypist's recipe. Each data set is normalised on its own full transcriptome
  (total counts to 1e4, log1p), genes are restricted to those shared by reference and query, scaled
  with the REFERENCE's per-gene mean/std and clipped to +-10, then a multinomial logistic regression
  (L2, C=1, lbfgs) is fitted on the reference. `celltypist.train(..., use_SGD=False)` differs in one
  point: it fits one-vs-rest (`multi_class='ovr'`), which is its whole edge on Kang (0.920 vs 0.913 LOBO,
  docs/scripts/linear_ceilings.py); the real package is the `celltypist` method of `scpermut evaluate`.
- `knn_pca`: the usual "project onto the reference PCA" transfer. Batch-aware HVGs on the
  reference's log-CP10k (scanpy 'seurat' flavour), genes scaled with the reference's mean/std
  (clip 10), PCA fitted on the reference, the query projected, 15-NN majority vote.

Both see only the reference's labels; the query provides counts alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from loaders.errors import DataError


@dataclass
class BaselineResult:
    """Predictions for the query; `latent_*` are the embeddings the method classified in (if any)."""

    labels: np.ndarray
    latent_ref: np.ndarray | None = None
    latent_query: np.ndarray | None = None
    confidence: np.ndarray | None = None  # max class probability per query cell (1 - it scores "unknown")
    unknown: np.ndarray | None = None  # cells the method itself leaves unassigned, where it has such a rule


def log_cp10k(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """Total counts per cell to 1e4 (over all genes of the data set), then log1p."""
    x = sp.csr_matrix(adata.layers[layer] if layer else adata.X, dtype=np.float32, copy=True)
    lib = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    np.log1p(x.data, out=x.data)
    return x


def shared_genes(ref: ad.AnnData, query: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the genes both data sets hold, in the reference's order."""
    q_index = pd.Index(query.var_names.astype(str))
    pos_q = q_index.get_indexer(ref.var_names.astype(str))
    pos_r = np.flatnonzero(pos_q >= 0)
    if len(pos_r) == 0:
        raise DataError("the reference and the query share no gene names (var_names); use the same gene ids.")
    return pos_r, pos_q[pos_r]


class _Scaler:
    """Per-gene standardisation with the reference's statistics, clipped like scanpy/CellTypist."""

    def __init__(self, x_ref: np.ndarray, clip: float = 10.0):
        self.mean = x_ref.mean(axis=0)
        std = x_ref.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        self.clip = clip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean) / self.std, -self.clip, self.clip).astype(np.float32)


def _labelled(labels) -> np.ndarray:
    s = pd.Series(np.asarray(labels, dtype=object))
    return (s.notna() & (s.astype(str) != "<NA>")).to_numpy()


def logreg_celltypist(ref: ad.AnnData, ref_labels, query: ad.AnnData, *, layer: str | None = None,
                      max_iter: int = 1000, seed: int = 0) -> BaselineResult:
    """CellTypist-style multinomial logistic regression trained on the reference only."""
    pos_r, pos_q = shared_genes(ref, query)
    keep = _labelled(ref_labels)
    x_ref = log_cp10k(ref, layer)[:, pos_r][keep].toarray()
    x_q = log_cp10k(query, layer)[:, pos_q].toarray()
    scaler = _Scaler(x_ref)
    y = np.asarray(ref_labels, dtype=object)[keep].astype(str)
    clf = LogisticRegression(C=1.0, max_iter=max_iter, random_state=seed)
    clf.fit(scaler(x_ref), y)
    proba = clf.predict_proba(scaler(x_q))
    return BaselineResult(labels=clf.classes_[proba.argmax(axis=1)].astype(str), confidence=proba.max(axis=1))


def reference_hvgs(ref: ad.AnnData, x_log: sp.csr_matrix, batches, n_top: int = 2000) -> np.ndarray:
    """Positions of the reference's highly variable genes (batch-aware when it has > 1 batch)."""
    import scanpy as sc

    n_top = min(n_top, ref.n_vars)
    tmp = ad.AnnData(X=x_log, var=pd.DataFrame(index=ref.var_names.astype(str)))
    batch_key = None
    if batches is not None and len(pd.unique(np.asarray(batches))) > 1:
        tmp.obs["batch"] = np.asarray(batches).astype(str)
        batch_key = "batch"
    tmp.var["detected"] = np.asarray((x_log > 0).sum(axis=0)).ravel() > 0
    tmp = tmp[:, tmp.var["detected"].to_numpy()].copy()
    try:
        sc.pp.highly_variable_genes(tmp, n_top_genes=min(n_top, tmp.n_vars), flavor="seurat",
                                    batch_key=batch_key)
    except Exception:  # a tiny batch can break the per-batch binning; fall back to pooled HVGs
        sc.pp.highly_variable_genes(tmp, n_top_genes=min(n_top, tmp.n_vars), flavor="seurat")
    chosen = tmp.var_names[tmp.var["highly_variable"].to_numpy()]
    return pd.Index(ref.var_names.astype(str)).get_indexer(chosen)


def knn_pca(ref: ad.AnnData, ref_labels, query: ad.AnnData, *, ref_batches=None, layer: str | None = None,
            n_hvg: int = 2000, n_pcs: int = 50, k: int = 15, seed: int = 0) -> BaselineResult:
    """kNN majority vote in the reference's PCA space (HVGs chosen on the reference)."""
    pos_r, pos_q = shared_genes(ref, query)
    x_ref_all = log_cp10k(ref, layer)
    hvg = reference_hvgs(ref, x_ref_all, ref_batches, n_top=n_hvg)
    hvg = np.intersect1d(hvg, pos_r)  # only genes the query can provide
    q_of = dict(zip(pos_r, pos_q))
    x_ref = x_ref_all[:, hvg].toarray()
    x_q = log_cp10k(query, layer)[:, [q_of[g] for g in hvg]].toarray()
    scaler = _Scaler(x_ref)
    n_pcs = max(1, min(n_pcs, x_ref.shape[0] - 1, x_ref.shape[1]))
    pca = PCA(n_components=n_pcs, random_state=seed, svd_solver="arpack" if n_pcs < min(x_ref.shape) else "full")
    z_ref = pca.fit_transform(scaler(x_ref))
    z_q = pca.transform(scaler(x_q))
    keep = _labelled(ref_labels)
    y = np.asarray(ref_labels, dtype=object)[keep].astype(str)
    clf = KNeighborsClassifier(n_neighbors=min(k, int(keep.sum())))
    clf.fit(z_ref[keep], y)
    proba = clf.predict_proba(z_q)  # neighbour vote fractions
    return BaselineResult(labels=clf.classes_[proba.argmax(axis=1)].astype(str), latent_ref=z_ref, latent_query=z_q,
                          confidence=proba.max(axis=1))


BASELINES = {"logreg": logreg_celltypist, "knn_pca": knn_pca}

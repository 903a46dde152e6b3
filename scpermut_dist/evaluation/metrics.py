"""Label-transfer and latent-space metrics, as the scPermut authors reported them.

All implementations are scikit-learn / numpy (scib-metrics is not a dependency: it pins jax and would
not add anything at our sizes). Conventions, chosen so numbers are comparable across methods:

- Classification metrics score the query cells that have a true label. Balanced accuracy is the
  mean recall over the classes present in the truth (sklearn's definition); macro F1 and per-class
  F1 use sklearn's default label set, the union of true and predicted labels, so predicting a
  class that is absent from the query costs F1.
- Size bins group cell types by their frequency in the *reference* (what the model saw); query
  types unknown to the reference go to the bin "unseen".
- Batch-mixing entropy: for each cell, the Shannon entropy of the batch distribution among its
  k = min(100, n-1) nearest neighbours (Euclidean, self excluded), divided by the entropy of the
  global batch distribution of the same cells (the batch prior); the score is the mean over cells.
  1 means neighbourhoods look like the whole data set, 0 means each neighbourhood is one batch.
- Within-type batch mixing: the same score computed inside each cell type (neighbours among the
  type's cells, prior = the type's batch distribution), averaged over cells. When batches hold types
  in different proportions, the global score cannot reach 1 without mixing types; this one can, so
  it measures batch removal alone (as scib's batch ASW does per label). Types in < 2 batches skip.
- Rare types: the `RARE_N` rarest types of the reference plus every type below `RARE_BELOW` of its cells;
  their precision, recall and F1 are sklearn's `precision_recall_fscore_support` (zero_division=0), so a
  type never predicted gets precision 0 and a type absent from the query support 0.
- Unknown detection (held-out type): AUROC of the method's unknown score (higher = more unknown) for the
  held-out type's cells against all other query cells (sklearn `roc_auc_score`), and the fraction of the
  held-out type's cells the method labels unknown (where it has such a rule).
- Silhouette of the latent by cell type: sklearn's silhouette score in [-1, 1] (not rescaled),
  on at most 5,000 cells sampled with a fixed seed.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    matthews_corrcoef,
    normalized_mutual_info_score,
    precision_recall_fscore_support,
    roc_auc_score,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

# (name, lower, upper) in fraction of reference cells: [lower, upper)
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<0.1%", 0.0, 0.001),
    ("0.1-1%", 0.001, 0.01),
    ("1-10%", 0.01, 0.1),
    (">=10%", 0.1, np.inf),
)
UNSEEN_BIN = "unseen"
RARE_N, RARE_BELOW = 3, 0.01


def _as_str(a) -> np.ndarray:
    return np.asarray(a).astype(str)


def classification_metrics(y_true, y_pred) -> dict:
    """Headline and secondary label-transfer metrics of predictions against the truth.

    Cells whose true label is missing (None/NaN/<NA>) are ignored.
    """
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.shape} vs {y_pred.shape}")
    keep = np.array([t is not None and t == t and str(t) != "<NA>" for t in y_true], dtype=bool)
    t, p = _as_str(y_true[keep]), _as_str(y_pred[keep])
    if len(t) == 0:
        return {"n_cells": 0}
    labels = np.unique(np.concatenate([t, p]))
    with warnings.catch_warnings():  # "y_pred has classes not in y_true" is expected in label transfer
        warnings.simplefilter("ignore", UserWarning)
        return _scores(t, p, labels)


def _scores(t: np.ndarray, p: np.ndarray, labels: np.ndarray) -> dict:
    per_class = f1_score(t, p, labels=labels, average=None, zero_division=0)
    return {
        "n_cells": int(len(t)),
        "balanced_accuracy": float(balanced_accuracy_score(t, p)),
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(t, p)),
        "cohen_kappa": float(cohen_kappa_score(t, p)) if len(labels) > 1 else 1.0,
        "ari": float(adjusted_rand_score(t, p)),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "per_class_f1": {str(c): float(f) for c, f in zip(labels, per_class)},
    }


def per_class_report(y_true, y_pred, labels=None) -> dict[str, dict]:
    """Precision, recall, F1 and support (true cells) per type; default types: those present in the truth."""
    t, p = _as_str(y_true), _as_str(y_pred)
    labels = sorted(set(t)) if labels is None else [str(x) for x in labels]
    if not labels:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=labels, average=None, zero_division=0)
    return {c: {"precision": float(a), "recall": float(b), "f1": float(f), "support": int(n)}
            for c, a, b, f, n in zip(labels, prec, rec, f1, sup)}


def rare_types(class_freq: dict[str, float], n: int = RARE_N, below: float = RARE_BELOW) -> list[str]:
    """The n rarest types of the reference and all types under `below` of its cells, rarest first."""
    ranked = sorted(class_freq, key=lambda c: (class_freq[c], c))
    return [c for i, c in enumerate(ranked) if i < n or class_freq[c] < below]


def unknown_detection(is_novel, score, unknown=None) -> dict:
    """How well an unknown score separates a type absent from the reference from the known types."""
    is_novel = np.asarray(is_novel, dtype=bool)
    score = np.asarray(score, dtype=float)
    both = 0 < is_novel.sum() < len(is_novel)
    out = {"n_novel": int(is_novel.sum()), "n_known": int((~is_novel).sum()),
           "auroc": float(roc_auc_score(is_novel, score)) if both else None,
           "mean_score_novel": float(score[is_novel].mean()) if is_novel.any() else None,
           "mean_score_known": float(score[~is_novel].mean()) if (~is_novel).any() else None}
    if unknown is not None and is_novel.any():
        unknown = np.asarray(unknown, dtype=bool)
        out["fraction_novel_unknown"] = float(unknown[is_novel].mean())
        out["fraction_known_unknown"] = float(unknown[~is_novel].mean()) if (~is_novel).any() else None
    else:
        out["fraction_novel_unknown"] = out["fraction_known_unknown"] = None
    return out


def size_bin_of(class_freq: dict[str, float], label: str) -> str:
    """The size bin of one cell type, from its frequency among the reference cells."""
    f = class_freq.get(str(label))
    if f is None or f <= 0:
        return UNSEEN_BIN
    return next(name for name, lo, hi in SIZE_BINS if lo <= f < hi)


def reference_class_freq(ref_labels) -> dict[str, float]:
    """Fraction of labelled reference cells per type."""
    labels = _as_str([x for x in ref_labels if x is not None and x == x and str(x) != "<NA>"])
    classes, counts = np.unique(labels, return_counts=True)
    return {str(c): float(n) / max(len(labels), 1) for c, n in zip(classes, counts)}


def size_bin_metrics(y_true, y_pred, class_freq: dict[str, float]) -> dict:
    """`classification_metrics` restricted to the query cells of each size bin (only bins with cells).

    Within a bin, per-class F1 keeps the bin's own types (F1 of a type does not depend on the bin).
    """
    t, p = _as_str(y_true), _as_str(y_pred)
    bins = np.array([size_bin_of(class_freq, x) for x in t])
    out = {}
    for name in [b[0] for b in SIZE_BINS] + [UNSEEN_BIN]:
        mask = bins == name
        if not mask.any():
            continue
        m = classification_metrics(t[mask], p[mask])
        full = classification_metrics(t, p)["per_class_f1"]
        types = sorted(set(t[mask]))
        m["per_class_f1"] = {c: full.get(c, 0.0) for c in types}
        m["macro_f1_of_types"] = float(np.mean([m["per_class_f1"][c] for c in types]))
        m["types"] = types
        out[name] = m
    return out


def _entropy(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    p = counts / np.clip(counts.sum(axis=axis, keepdims=True), 1e-12, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(p > 0, np.log(p), 0.0)
    return -(p * logp).sum(axis=axis)


def batch_mixing_entropy(latent: np.ndarray, batches, k: int = 100) -> float:
    """Mean over cells of H(batches among the k nearest neighbours) / H(global batch distribution).

    Returns NaN with fewer than two batches (mixing is undefined). See the module docstring.
    """
    latent = np.asarray(latent, dtype=np.float32)
    codes, b = np.unique(_as_str(batches), return_inverse=True)
    n, n_batches = len(b), len(codes)
    if n_batches < 2 or n < 2:
        return float("nan")
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(latent)
    _, idx = nn.kneighbors(latent)
    # drop each cell itself (usually column 0, but exact duplicates may put it elsewhere or beyond k+1)
    drop = idx == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    idx = idx[~drop].reshape(n, k)
    counts = np.zeros((n, n_batches))
    np.add.at(counts, (np.repeat(np.arange(n), k), b[idx].ravel()), 1.0)
    prior = _entropy(np.bincount(b, minlength=n_batches).astype(float))
    return float(_entropy(counts, axis=1).mean() / prior)


def batch_mixing_entropy_within_type(latent: np.ndarray, batches, labels, k: int = 100,
                                     min_cells: int = 10) -> float:
    """Cell-weighted mean over types (>= min_cells cells, >= 2 batches) of the type's own mixing entropy."""
    latent, batches, labels = np.asarray(latent, dtype=np.float32), _as_str(batches), _as_str(labels)
    scores, weights = [], []
    for t in np.unique(labels):
        m = labels == t
        if m.sum() < min_cells or len(np.unique(batches[m])) < 2:
            continue
        scores.append(batch_mixing_entropy(latent[m], batches[m], k=k))
        weights.append(m.sum())
    return float(np.average(scores, weights=weights)) if scores else float("nan")


def silhouette_by_label(latent: np.ndarray, labels, max_cells: int = 5000, seed: int = 0) -> float:
    """Silhouette (Euclidean, in [-1, 1]) of the latent grouped by cell type; NaN if < 2 types."""
    labels = _as_str(labels)
    if len(np.unique(labels)) < 2 or len(labels) < 3:
        return float("nan")
    sample = min(max_cells, len(labels))
    return float(silhouette_score(np.asarray(latent), labels, sample_size=sample, random_state=seed))


def latent_metrics(latent: np.ndarray, labels, batches, k: int = 100) -> dict:
    """Batch mixing and type separation of one embedding."""
    return {"batch_entropy": batch_mixing_entropy(latent, batches, k=k),
            "batch_entropy_within_type": batch_mixing_entropy_within_type(latent, batches, labels, k=k),
            "silhouette_label": silhouette_by_label(latent, labels)}


def mean_over_folds(fold_metrics: list[dict]) -> dict:
    """Mean (and std) of each scalar metric over folds; per-class F1 averaged over the folds holding the class."""
    out: dict = {}
    scalars = sorted({k for m in fold_metrics for k, v in m.items() if isinstance(v, (int, float))})
    for key in scalars:
        vals = np.array([m[key] for m in fold_metrics if key in m], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[key] = float(vals.mean()) if len(vals) else float("nan")
        if key != "n_cells" and len(vals):
            out[f"{key}_std"] = float(vals.std())
    per_class: dict[str, list[float]] = {}
    for m in fold_metrics:
        for c, f in m.get("per_class_f1", {}).items():
            per_class.setdefault(c, []).append(f)
    out["per_class_f1"] = {c: float(np.mean(v)) for c, v in sorted(per_class.items())}
    return out

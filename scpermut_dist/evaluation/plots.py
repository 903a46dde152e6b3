"""Report figures: row-normalised confusion matrices and 2-D views of a latent space.

Matplotlib runs headless (Agg); every function writes one PNG and closes its figure.
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

log = logging.getLogger(__name__)


def _row_normalised(y_true, y_pred, classes_true, classes_pred) -> np.ndarray:
    labels = list(dict.fromkeys([*classes_true, *classes_pred]))
    cm = confusion_matrix(np.asarray(y_true, str), np.asarray(y_pred, str), labels=labels).astype(float)
    cm = cm[[labels.index(c) for c in classes_true]][:, [labels.index(c) for c in classes_pred]]
    return cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)


def confusion_matrices(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """One panel per method: rows = true types (fractions summing to 1), columns = predicted types."""
    n = len(panels)
    all_true = sorted({str(x) for t, _ in panels.values() for x in t})
    all_pred = sorted({str(x) for _, p in panels.values() for x in p} | set(all_true))
    size = 0.45 * max(len(all_pred), 4) + 2.5
    fig, axes = plt.subplots(1, n, figsize=(size * n, 0.45 * max(len(all_true), 4) + 2.5), squeeze=False)
    for ax, (name, (y_true, y_pred)) in zip(axes[0], panels.items()):
        cm = _row_normalised(y_true, y_pred, all_true, all_pred)
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(all_pred)), all_pred, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(all_true)), all_true, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
        if len(all_true) * len(all_pred) <= 400:
            for i in range(cm.shape[0]):
                for j in range(cm.shape[1]):
                    if cm[i, j] >= 0.005:
                        ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if cm[i, j] > 0.6 else "black")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embed_2d(latent: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """UMAP of the latent (PCA if umap-learn fails, e.g. on a handful of cells)."""
    latent = np.asarray(latent, dtype=np.float32)
    if len(latent) >= 10:
        try:
            import umap

            reducer = umap.UMAP(n_neighbors=min(15, len(latent) - 1), random_state=seed, n_jobs=1)
            return reducer.fit_transform(latent), "UMAP"
        except Exception as exc:  # noqa: BLE001 - any failure falls back to PCA
            log.warning("UMAP failed (%s); plotting PCA instead", exc)
    from sklearn.decomposition import PCA

    n = min(2, latent.shape[1], len(latent))
    xy = PCA(n_components=n).fit_transform(latent) if n >= 1 else np.zeros((len(latent), 2))
    if xy.shape[1] < 2:
        xy = np.column_stack([xy, np.zeros(len(xy))])
    return xy, "PCA"


def _scatter(ax, xy: np.ndarray, values, title: str, markers=None) -> None:
    values = np.asarray(values).astype(str)
    cats = sorted(set(values))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    size = max(1.0, min(12.0, 3e4 / max(len(xy), 1)))
    for i, c in enumerate(cats):
        m = values == c
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(i % cmap.N), label=c, linewidths=0,
                   marker="o")
    if markers is not None:  # outline the query cells
        m = np.asarray(markers, bool)
        ax.scatter(xy[m, 0], xy[m, 1], s=size * 2.5, facecolors="none", edgecolors="k", linewidths=0.2)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(cats) <= 30:
        ax.legend(fontsize=6, markerscale=2, loc="best", frameon=False)


def latent_views(latent: np.ndarray, labels, batches, path: Path, *, is_query=None, title: str = "",
                 seed: int = 0) -> str:
    """Two panels of the same 2-D embedding, coloured by cell type and by batch. Returns the method used."""
    xy, how = embed_2d(latent, seed=seed)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    _scatter(axes[0], xy, labels, f"{how}: cell type", markers=is_query)
    _scatter(axes[1], xy, batches, f"{how}: batch", markers=is_query)
    fig.suptitle(title + ("  (query cells outlined)" if is_query is not None else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return how

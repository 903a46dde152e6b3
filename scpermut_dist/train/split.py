"""A seeded, stratified train/validation split of the labelled cells.

Validation is the minority (default 20 %, capped at `max_val` cells so an atlas validates on a fixed
sample): the original CLI trained on 20 % and validated on 80 %, a bug not reproduced here.
"""
from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float = 0.2, max_val: int | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train_positions, val_positions) over cells with label code >= 0, stratified by class.

    Each class gives round(fraction * n_c) cells to validation, never all of them (a class of one cell
    stays in training). When the total exceeds `max_val`, the fraction is scaled down uniformly.
    Unlabelled cells (code -1) are in neither set. Both outputs are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels >= 0)
    if max_val is not None and len(labelled) and fraction * len(labelled) > max_val:
        fraction = max_val / len(labelled)
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels[labelled]):
        members = labelled[labels[labelled] == c]
        n_val = min(int(round(fraction * len(members))), len(members) - 1)
        if n_val > 0:
            val_parts.append(rng.choice(members, size=n_val, replace=False))
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    if max_val is not None and len(val) > max_val:  # rounding can overshoot by a few cells
        val = np.sort(rng.choice(val, size=max_val, replace=False))
    train = np.setdiff1d(labelled, val, assume_unique=True)
    return train.astype(np.int64), val.astype(np.int64)

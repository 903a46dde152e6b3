"""A seeded, stratified train/validation split of the labelled cells.

Validation is the minority (default 20 %, capped at `max_val` cells so an atlas validates on a fixed
sample): the original CLI trained on 20 % and validated on 80 %, a bug not reproduced here.
"""
from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float = 0.2, max_val: int | None = None, seed: int = 0,
                     min_per_class: int = 0, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_positions, val_positions) over cells with label code >= 0, stratified by class.

    Each class gives round(fraction * n_c) cells to validation, never all of them (a class of one cell
    stays in training). When the total exceeds `max_val`, the fraction is scaled down uniformly.
    Unlabelled cells (code -1) are in neither set. Both outputs are sorted.
    At atlas scale the capped fraction would leave rare types without validation cells: each class keeps
    at least `min_per_class` (never more than the uncapped fraction gives it). With `groups` (e.g. batch
    codes: donors, datasets) whole groups are held out instead, until the fraction is reached.
    """
    if groups is not None:
        return group_split(labels, groups, fraction, max_val, seed)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels >= 0)
    uncapped = fraction
    if max_val is not None and len(labelled) and fraction * len(labelled) > max_val:
        fraction = max_val / len(labelled)
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels[labelled]):
        members = labelled[labels[labelled] == c]
        floor = min(min_per_class, int(round(uncapped * len(members))))
        n_val = min(max(int(round(fraction * len(members))), floor), len(members) - 1)
        if n_val > 0:
            val_parts.append(rng.choice(members, size=n_val, replace=False))
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    if max_val is not None and len(val) > max_val and not min_per_class:  # rounding can overshoot by a few cells
        val = np.sort(rng.choice(val, size=max_val, replace=False))
    train = np.setdiff1d(labelled, val, assume_unique=True)
    return train.astype(np.int64), val.astype(np.int64)


def group_split(labels: np.ndarray, groups: np.ndarray, fraction: float = 0.2, max_val: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups (donors, datasets) in a seeded order until `fraction` of the labelled cells
    (at most `max_val`, sampled from those groups) are held out: validation on unseen donors."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    labelled = np.flatnonzero(labels >= 0)
    ids, counts = np.unique(groups[labelled], return_counts=True)
    if len(ids) < 2:
        raise ValueError("a split by group needs at least 2 groups among labelled cells; use data.val_split=cell")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    target = fraction * len(labelled)
    take = order[: max(1, int(np.searchsorted(np.cumsum(counts[order]), target) + 1))][: len(ids) - 1]
    val = labelled[np.isin(groups[labelled], ids[take])]
    if max_val is not None and len(val) > max_val:
        val = np.sort(rng.choice(val, size=max_val, replace=False))
    train = labelled[~np.isin(groups[labelled], ids[take])]
    return train.astype(np.int64), np.sort(val).astype(np.int64)

"""Shuffle-quality measures: do minibatches mix batches (datasets) as a true random sample would?

Census rows are grouped by dataset, so a loader that reads contiguous blocks yields minibatches
from one dataset; training then sees a biased gradient per step. We compare the mean entropy of the
batch labels inside each minibatch with the same quantity for truly random minibatches.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def minibatch_entropy(codes: np.ndarray) -> float:
    """Shannon entropy (nats) of the label distribution inside one minibatch."""
    _, counts = np.unique(np.asarray(codes), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_entropy(minibatches: Iterable[np.ndarray]) -> float:
    values = [minibatch_entropy(c) for c in minibatches if len(c)]
    return float(np.mean(values)) if values else 0.0


def random_entropy(codes: np.ndarray, batch_size: int, n_batches: int, seed: int = 0,
                   weights: np.ndarray | None = None) -> float:
    """Mean minibatch entropy of `n_batches` i.i.d. random minibatches (optionally weighted by cell)."""
    rng = np.random.default_rng(seed)
    codes = np.asarray(codes)
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    picks = rng.choice(len(codes), size=(n_batches, batch_size), replace=True, p=p)
    return mean_entropy(codes[row] for row in picks)


def batch_entropy_ratio(minibatch_codes: list[np.ndarray], all_codes: np.ndarray, seed: int = 0,
                        weights: np.ndarray | None = None) -> float:
    """Mean minibatch batch-label entropy relative to true random sampling of as many minibatches.

    1.0 means as mixed as random; contiguous-block loaders on dataset-grouped stores score far lower.
    `weights` makes the random reference follow the same (class-balanced) cell distribution.
    """
    if not minibatch_codes:
        return float("nan")
    size = int(np.median([len(c) for c in minibatch_codes]))
    ref = random_entropy(all_codes, size, len(minibatch_codes), seed=seed, weights=weights)
    ours = mean_entropy(minibatch_codes)
    if ref == 0.0:
        return 1.0 if ours == 0.0 else float("inf")
    return ours / ref

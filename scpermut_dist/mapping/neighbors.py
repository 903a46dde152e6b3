"""Reference neighbours: a sample of reference cells' latents with their type and batch, searched at map time.

The sample is stored in the checkpoint as extras["neighbors"] (arrays: latent float16, label/batch codes,
cell = the cell's row in the prepared reference). A query cell's k nearest sample cells give its
neighbour majority type and agreement fraction, and their mean distance feeds the "unknown" score.

The search is scikit-learn's exact NearestNeighbors (k-d tree): at the default 20,000 stored cells of
latent dimension <= ~100 it builds in milliseconds and answers 10^4 queries in about a second. An
approximate index (pynndescent) measured 26-95 s per fresh process here, mostly numba compilation, for
no gain at this size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXTRA = "neighbors"
DEFAULT_K = 15
MAX_CELLS = 20_000


def sample_reference_cells(label_codes: np.ndarray, cells: np.ndarray, max_cells: int = MAX_CELLS,
                           seed: int = 0) -> np.ndarray:
    """Up to `max_cells` labelled cells of `cells`, stratified by type with one per-type cap (rare types whole).

    The cap is the largest c with sum_t min(n_t, c) <= max_cells, so the budget is spent on the common
    types only once every rarer type is in whole.
    """
    cells = np.asarray(cells)
    cells = cells[np.asarray(label_codes)[cells] >= 0]
    codes = np.asarray(label_codes)[cells]
    types, counts = np.unique(codes, return_counts=True)
    if counts.sum() <= max_cells:
        return np.sort(cells)
    cap = _type_cap(counts, max_cells)
    rng = np.random.default_rng(seed)
    take = [rng.choice(cells[codes == t], size=min(n, cap), replace=False) for t, n in zip(types, counts)]
    return np.sort(np.concatenate(take))


def _type_cap(counts: np.ndarray, budget: int) -> int:
    """Water-filling: the rarest types whole while the rest can still each take as many, then an equal share."""
    ordered = np.sort(counts)
    for i, n in enumerate(ordered):
        left = len(ordered) - i
        if n * left > budget:
            return max(1, budget // left)
        budget -= n
    return int(ordered[-1])


def neighbor_extra(latent_nl: np.ndarray, label_codes: np.ndarray, batch_codes: np.ndarray,
                   cells: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint extra of sampled cells (their latents by member 0's encoder)."""
    return {"latent": np.asarray(latent_nl, dtype=np.float16), "label": np.asarray(label_codes, dtype=np.int32),
            "batch": np.asarray(batch_codes, dtype=np.int32), "cell": np.asarray(cells, dtype=np.int64)}


@dataclass
class NeighborVote:
    label: np.ndarray  # majority class code among the k neighbours
    agreement: np.ndarray  # fraction of the k neighbours of that class
    distance: np.ndarray  # mean latent distance to the k neighbours


class NeighborIndex:
    """Exact k-nearest-neighbour search over the stored reference sample."""

    def __init__(self, latent_nl: np.ndarray, label: np.ndarray, batch: np.ndarray | None = None,
                 cell: np.ndarray | None = None) -> None:
        from sklearn.neighbors import NearestNeighbors

        if len(latent_nl) == 0:
            raise ValueError("a neighbour index needs at least one reference cell")
        self.label = np.asarray(label, dtype=np.int64)
        self.batch = None if batch is None else np.asarray(batch, dtype=np.int64)
        self.cell = None if cell is None else np.asarray(cell, dtype=np.int64)
        self._nn = NearestNeighbors(algorithm="kd_tree").fit(np.asarray(latent_nl, dtype=np.float32))

    @classmethod
    def from_extra(cls, extra: dict[str, np.ndarray]) -> NeighborIndex:
        return cls(extra["latent"], extra["label"], extra.get("batch"), extra.get("cell"))

    def __len__(self) -> int:
        return len(self.label)

    def kneighbors(self, z_nl: np.ndarray, k: int = DEFAULT_K, exclude_cells: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, indices) of each row's k nearest stored cells; `exclude_cells` (a reference row per
        query row, e.g. validation cells that are in the sample) leaves each row's own stored copy out."""
        k = min(k, len(self) - (exclude_cells is not None))
        if k < 1:
            raise ValueError("the neighbour index holds too few cells for this k")
        z = np.asarray(z_nl, dtype=np.float32)
        if exclude_cells is None or self.cell is None:
            return self._nn.kneighbors(z, n_neighbors=k)
        dist, idx = self._nn.kneighbors(z, n_neighbors=k + 1)
        own = self.cell[idx] == np.asarray(exclude_cells)[:, None]
        own[~own.any(axis=1), -1] = True  # not in the sample: drop the farthest instead
        keep = ~own
        return dist[keep].reshape(len(z), k), idx[keep].reshape(len(z), k)

    def vote(self, z_nl: np.ndarray, k: int = DEFAULT_K, exclude_cells: np.ndarray | None = None) -> NeighborVote:
        """Majority type, its agreement fraction and the mean distance of each row's k nearest stored cells."""
        if len(z_nl) == 0:
            return NeighborVote(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        dist, idx = self.kneighbors(z_nl, k, exclude_cells)
        labels = self.label[idx]
        n_codes = int(self.label.max()) + 1
        counts = np.stack([(labels == c).sum(axis=1) for c in range(n_codes)], axis=1)
        top = counts.argmax(axis=1)
        return NeighborVote(label=top, agreement=counts[np.arange(len(top)), top] / labels.shape[1],
                            distance=dist.mean(axis=1))

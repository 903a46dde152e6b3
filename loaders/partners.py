"""Permutation partners: for each anchor, a random other cell of the same type, from another batch and
another storage chunk whenever the data allow (that is what teaches batch invariance).

Everything is vectorised: cells are sorted by (class, key) once, so "a uniform draw among same-class
cells whose key differs from mine" is one random integer per anchor plus a gap skip.
"""
from __future__ import annotations

import numpy as np


class GroupIndex:
    """Cells sorted by (class, key) with the ranges needed to draw 'same class, other key' in O(1)."""

    def __init__(self, cells: np.ndarray, classes: np.ndarray, keys: np.ndarray, n_classes: int):
        # One stable argsort of a combined (class, key) code, and group boundaries read off the sorted codes:
        # the same order as a lexsort, at about a third of its peak memory (this runs over the whole atlas).
        keys = np.asarray(keys)
        self._span = int(keys.max()) + 1 if len(keys) else 1
        wide = (n_classes + 1) * self._span >= 2**31
        combined = np.asarray(classes).astype(np.int64 if wide else np.int32) * self._span
        combined += keys.astype(combined.dtype, copy=False)
        order = np.argsort(combined, kind="stable")
        dtype = np.int32 if len(cells) == 0 or int(np.max(cells)) < 2**31 - 1 else np.int64
        self.cells = np.asarray(cells)[order].astype(dtype, copy=False)
        combined = combined[order]
        del order
        starts = np.flatnonzero(np.concatenate([[True], combined[1:] != combined[:-1]])) if len(combined) \
            else np.zeros(0, np.int64)
        self._groups = combined[starts].astype(np.int64)
        self._gstart = starts.astype(np.int64)
        self._gcount = np.diff(np.append(starts, len(combined))).astype(np.int64)
        classes = np.asarray(classes)
        counts = np.bincount(classes[classes >= 0], minlength=n_classes) if len(classes) else np.zeros(n_classes, np.int64)
        self._cstart = np.concatenate([[0], np.cumsum(counts)]) + int(np.sum(classes < 0))  # unlabelled sort first
        self.class_counts = counts

    _ARRAYS = ("cells", "_groups", "_gstart", "_gcount", "_cstart", "class_counts")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (built once, shareable read-only across processes, e.g. through shared memory)."""
        return {"span": np.array(self._span), **{k: getattr(self, k) for k in self._ARRAYS}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "GroupIndex":
        """The index over `to_arrays()` output, without copying (arrays may be read-only views)."""
        index = cls.__new__(cls)
        index._span = int(arrays["span"])
        for k in cls._ARRAYS:
            setattr(index, k, arrays[k])
        return index

    def draw_other(self, classes: np.ndarray, keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniform draw per query among same-class cells whose key differs; -1 where none exists."""
        classes = np.asarray(classes, dtype=np.int64)
        cs, ce = self._cstart[classes], self._cstart[classes + 1]
        combined = classes * self._span + np.asarray(keys, dtype=np.int64)
        g = np.searchsorted(self._groups, combined)
        g_ok = g < len(self._groups)
        g_ok[g_ok] = self._groups[g[g_ok]] == combined[g_ok]
        g = np.where(g_ok, g, 0)
        bs = np.where(g_ok, self._gstart[g], cs)
        bl = np.where(g_ok, self._gcount[g], 0)
        m = (ce - cs) - bl
        u = np.floor(rng.random(len(classes)) * np.maximum(m, 1)).astype(np.int64)
        idx = cs + u + np.where(u >= bs - cs, bl, 0)
        out = np.full(len(classes), -1, dtype=np.int64)
        ok = m > 0
        out[ok] = self.cells[idx[ok]]
        return out

    def draw_same_class(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniform draw among all cells of the class; -1 for classes absent here."""
        classes = np.asarray(classes, dtype=np.int64)
        cs, ce = self._cstart[classes], self._cstart[classes + 1]
        m = ce - cs
        idx = cs + np.floor(rng.random(len(classes)) * np.maximum(m, 1)).astype(np.int64)
        out = np.full(len(classes), -1, dtype=np.int64)
        ok = m > 0
        out[ok] = self.cells[idx[ok]]
        return out

    def draw_not_self(self, cells: np.ndarray, classes: np.ndarray, rng: np.random.Generator, tries: int = 64) -> np.ndarray:
        """Any same-class cell but the anchor itself (rejection; classes of size >= 2 succeed fast)."""
        out = np.full(len(cells), -1, dtype=np.int64)
        todo = np.flatnonzero(self.class_counts[classes] >= 2) if len(cells) else np.zeros(0, np.int64)
        for _ in range(tries):
            if len(todo) == 0:
                break
            pick = self.draw_same_class(classes[todo], rng)
            good = pick != cells[todo]
            out[todo[good]] = pick[good]
            todo = todo[~good]
        return out


class PartnerIndex:
    """Global (whole selection) indices, built lazily: most partners are found inside the IO pool."""

    def __init__(self, cells: np.ndarray, labels: np.ndarray, batches: np.ndarray, chunks: np.ndarray, n_classes: int):
        self._cells, self._labels, self._batches, self._chunks = cells, labels, batches, chunks
        self._n_classes = n_classes
        self._by: dict[str, GroupIndex] = {}

    KINDS = ("batch", "chunk")

    def by(self, what: str) -> GroupIndex:
        if what not in self._by:
            labelled = self._cells[self._labels[self._cells] >= 0]
            key = (self._batches if what == "batch" else self._chunks)[labelled]
            self._by[what] = GroupIndex(labelled, self._labels[labelled], key, self._n_classes)
        return self._by[what]


def choose_partners(anchors: np.ndarray, pool_cells: np.ndarray, labels: np.ndarray, batches: np.ndarray,
                    chunks: np.ndarray, global_index: PartnerIndex, n_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Partner of each anchor: same type, not itself; other batch AND other chunk when possible.

    Preference order (first that exists): other batch in the pool (free: already read), other batch
    anywhere, other chunk in the pool, other chunk anywhere, any other cell in the pool, anywhere.
    Unlabelled anchors and singleton classes pair with themselves.
    """
    partners = anchors.astype(np.int64, copy=True)
    a_lab = labels[anchors].astype(np.int64)
    todo = np.flatnonzero(a_lab >= 0)
    if len(todo) == 0:
        return partners
    lab_pool = pool_cells[labels[pool_cells] >= 0]
    pool_lab = labels[lab_pool]
    pool_by_batch = GroupIndex(lab_pool, pool_lab, batches[lab_pool], n_classes)

    def attempt(index: GroupIndex, key: np.ndarray | None, also_chunk: bool) -> None:
        nonlocal todo
        if len(todo) == 0:
            return
        a = anchors[todo]
        if key is None:
            pick = index.draw_not_self(a, a_lab[todo], rng)
        else:
            pick = index.draw_other(a_lab[todo], key[a], rng)
            if also_chunk:  # a different batch almost always means a different chunk; retry the rare clash
                for _ in range(3):
                    clash = np.flatnonzero((pick >= 0) & (chunks[np.maximum(pick, 0)] == chunks[a]))
                    if len(clash) == 0:
                        break
                    pick[clash] = index.draw_other(a_lab[todo[clash]], key[a[clash]], rng)
        got = pick >= 0
        partners[todo[got]] = pick[got]
        todo = todo[~got]

    attempt(pool_by_batch, batches, True)
    attempt(global_index.by("batch"), batches, True)
    if len(todo):
        attempt(GroupIndex(lab_pool, pool_lab, chunks[lab_pool], n_classes), chunks, False)
        attempt(global_index.by("chunk"), chunks, False)
        attempt(pool_by_batch, None, False)
        attempt(global_index.by("batch"), None, False)
    return partners  # what is left in `todo` are singleton classes: they keep themselves

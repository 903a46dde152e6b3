"""The sampling plan: which anchors and partners each (rank, worker) streams, per epoch, from obs alone.

Design (IO vs. shuffle): cells are cut into small storage-aligned blocks (`block_cells`, within one
storage chunk). Each epoch permutes the blocks (from (seed, epoch)) and groups them into IO pools of
about `io_batch_cells` cells; one pool = one sorted read. Inside a pool, anchors are drawn by
systematic weighted resampling (class-balanced with exponent `balance`), partners are preferably
taken from the pool (already read), and everything is shuffled, so minibatches mix datasets like a
random sample of the pool's many blocks. Pools carry exactly a whole number of minibatches, which
makes shards, step counts and mid-epoch resume simple integer bookkeeping.

All arrays are int numpy, vectorised; the only per-epoch work over the whole selection is a block
permutation. Pool contents are drawn lazily and deterministically from (seed, epoch, pool id).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loaders.errors import DataError
from loaders.partners import GroupIndex, PartnerIndex, choose_partners
from loaders.sharding import assign_pools, largest_remainder

# Measured on a 1M-cell Census-shaped store (`scpermut bench loader --sweep`): 128-cell blocks gathered into
# 32,768-cell pools mix datasets like random sampling (entropy ratio 0.97) and keep peak RSS flat from 10^5 to
# 2*10^6 cells; 65,536-cell pools are ~15 % faster per CPU-second but their peak grows with the store.
DEFAULT_BLOCK_CELLS = 128
DEFAULT_IO_BATCH_CELLS = 32768


def encode_obs(obs, classes=None, batches=None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Integer codes of a source's standardised `label` (<NA> -> -1) and `batch` columns.

    Pass `classes`/`batches` to encode against a fixed vocabulary (e.g. a trained model's classes);
    labels outside it become -1 (unlabelled), unknown batches get new codes after the given ones.
    Works on the categories, never on per-cell strings: at 10^8 cells those would cost gigabytes.
    """
    lab_cats, lab_raw = _categories_and_codes(obs["label"])
    present = np.unique(lab_raw[lab_raw >= 0])
    cls = sorted(lab_cats[present]) if classes is None else [str(c) for c in classes]
    lab_codes = _recode(lab_cats, lab_raw, cls, missing=-1)
    bat_cats, bat_raw = _categories_and_codes(obs["batch"])
    if (bat_raw < 0).any():  # a missing batch value is its own batch "NA"
        bat_cats = np.append(bat_cats, "NA")
        bat_raw = np.where(bat_raw < 0, len(bat_cats) - 1, bat_raw)
    seen = set(bat_cats[np.unique(bat_raw)])
    names = [str(b) for b in (batches or [])]
    names += sorted(seen - set(names))
    return lab_codes, _recode(bat_cats, bat_raw, names, missing=-1), cls, names


def _categories_and_codes(col) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    cat = col.array if isinstance(col.dtype, pd.CategoricalDtype) else pd.Categorical(col)
    return np.asarray(cat.categories.astype(str), dtype=object), np.asarray(cat.codes)


def _recode(categories: np.ndarray, codes: np.ndarray, vocabulary: list[str], missing: int) -> np.ndarray:
    """Map codes over `categories` to positions in `vocabulary` (absent -> `missing`), as int32."""
    where = {v: i for i, v in enumerate(vocabulary)}
    lookup = np.array([where.get(c, missing) for c in categories] + [missing], dtype=np.int32)
    return lookup[np.where(codes < 0, len(categories), codes)]


@dataclass(frozen=True)
class PoolTask:
    """One IO pool of one epoch: its id (seeds its draws), blocks, and the minibatch sizes it emits."""

    pool_id: int
    blocks: np.ndarray
    batch_sizes: tuple[int, ...]


@dataclass
class PoolDraw:
    """Anchors and partners (source obs positions) of one pool, in emission order."""

    anchors: np.ndarray
    partners: np.ndarray
    bounds: np.ndarray  # minibatch k = anchors[bounds[k]:bounds[k+1]]

    def rows_for_steps(self, first_step: int) -> np.ndarray:
        """Sorted unique rows needed for minibatches first_step..end (what a resumed pool must read)."""
        lo = int(self.bounds[first_step])
        return np.unique(np.concatenate([self.anchors[lo:], self.partners[lo:]]))


@dataclass
class EpochLayout:
    """Pools of an epoch, their owner rank and minibatch sizes; identical on every rank."""

    epoch: int
    world: int
    steps: int  # minibatches per rank (same on every rank)
    tasks: list[list[PoolTask]] = field(default_factory=list)  # per rank, in stream order

    def rank_tasks(self, rank: int) -> list[PoolTask]:
        return self.tasks[rank]


def _quota(expected: np.ndarray, steps: int) -> np.ndarray:
    """Whole minibatches per pool summing to `steps`, never above a pool's expected count when possible."""
    q = np.floor(expected).astype(np.int64)
    if q.sum() >= steps:
        return largest_remainder(q, steps)  # elementwise <= q
    extra = largest_remainder(expected - q + 1e-12, steps - int(q.sum()))  # a few repeats on this rank
    return q + extra


class SamplingPlan:
    """Class-balanced, permutation-paired sampling over a cell subset (see module docstring).

    labels: class code per source cell (-1 = unlabelled); batches: batch code; chunks: storage chunk
    (`source.chunk_ids()`); cells: the positions to sample from (None = all); balance in [0, 1]:
    target class probability ∝ n_c^(1-balance) (0 natural, 1 uniform over types; unlabelled cells keep
    their natural share); permute=False pairs every cell with itself; cells_per_epoch: anchors per
    epoch over all ranks (None = number of selected cells; larger values chain several passes).
    """

    def __init__(self, labels, batches, chunks, cells=None, balance: float = 0.0, permute: bool = True,
                 seed: int = 0, cells_per_epoch: int | None = None, block_cells: int = DEFAULT_BLOCK_CELLS,
                 n_classes: int | None = None):
        self.labels = np.asarray(labels).astype(np.int32, copy=False)
        self.batches = np.asarray(batches).astype(np.int32, copy=False)
        self.chunks = np.asarray(chunks)
        self.chunks = self.chunks.astype(np.int32 if self.chunks.max(initial=0) < 2**31 else np.int64, copy=False)
        n = len(self.labels)
        if len(self.batches) != n or len(self.chunks) != n:
            raise DataError(f"SamplingPlan: labels ({n}), batches ({len(self.batches)}) and chunks "
                            f"({len(self.chunks)}) must have one entry per source cell.")
        if n and (self.labels.min() < -1 or self.batches.min() < 0):
            raise DataError("SamplingPlan: label codes must be >= -1 (-1 = unlabelled) and batch codes >= 0.")
        pos_dtype = np.int32 if n < 2**31 else np.int64  # 100M cells: 400 MB per position array, not 800
        cells = np.arange(n, dtype=pos_dtype) if cells is None else np.unique(np.asarray(cells, dtype=np.int64))
        if len(cells) == 0:
            raise DataError("SamplingPlan: the cell subset is empty; select at least one cell.")
        if cells[0] < 0 or cells[-1] >= n:
            raise DataError(f"SamplingPlan: cell positions must lie in [0, {n}); got {cells[0]}..{cells[-1]}.")
        cells = cells.astype(pos_dtype, copy=False)
        if not 0.0 <= float(balance) <= 1.0:
            raise DataError(f"SamplingPlan: balance must be in [0, 1] (0 natural, 1 uniform); got {balance}.")
        if cells_per_epoch is not None and int(cells_per_epoch) < 1:
            raise DataError(f"SamplingPlan: cells_per_epoch must be >= 1; got {cells_per_epoch}.")
        if int(block_cells) < 1:
            raise DataError(f"SamplingPlan: block_cells must be >= 1; got {block_cells}.")
        self.cells = cells
        self.balance, self.permute, self.seed = float(balance), bool(permute), int(seed)
        self.cells_per_epoch = None if cells_per_epoch is None else int(cells_per_epoch)
        self.block_cells = int(block_cells)
        self.n_classes = int(n_classes) if n_classes is not None else int(max(self.labels.max(initial=-1) + 1, 0))
        sel_labels = self.labels[cells]
        if n_classes is not None and sel_labels.max(initial=-1) >= self.n_classes:
            raise DataError(f"SamplingPlan: a label code is >= n_classes={n_classes}.")
        self.class_counts = np.bincount(sel_labels[sel_labels >= 0], minlength=self.n_classes)
        self.n_unlabelled = int(np.sum(sel_labels < 0))
        self._weights = self._class_weights()
        self._blocks: dict[int, np.ndarray] = {}
        self._index: PartnerIndex | None = None

    @classmethod
    def from_source(cls, source, classes=None, **kwargs) -> "SamplingPlan":
        """Plan over a `CellSource` using its standardised label/batch columns and chunk ids."""
        labels, batches, names, _ = encode_obs(source.obs, classes=classes)
        kwargs.setdefault("n_classes", len(names))
        return cls(labels, batches, source.chunk_ids(), **kwargs)

    # ---- class balance -------------------------------------------------------------------
    def _class_weights(self) -> np.ndarray:
        """Per-cell sampling weight by class code + 1 (slot 0 = unlabelled), summing to 1 over the selection."""
        n_sel = len(self.cells)
        counts = self.class_counts.astype(np.float64)
        tempered = np.where(counts > 0, counts ** (1.0 - self.balance), 0.0)
        labelled_share = (n_sel - self.n_unlabelled) / n_sel
        self.target_class_freq = tempered / tempered.sum() if tempered.sum() > 0 else tempered
        per_cell = np.divide(self.target_class_freq * labelled_share, counts, out=np.zeros_like(counts), where=counts > 0)
        unl = 1.0 / n_sel if self.n_unlabelled else 0.0
        return np.concatenate([[unl], per_cell])

    @property
    def sampled_class_freq(self) -> np.ndarray:
        """Expected class frequencies among labelled anchors as delivered (focal-loss alpha uses these).

        Systematic resampling inside pools and pool quotas proportional to pool weight make the
        expectation equal to the target; rounding to whole minibatches moves it by < 1/steps.
        """
        return self.target_class_freq.copy()

    def cell_weights(self, cells: np.ndarray) -> np.ndarray:
        return self._weights[self.labels[cells].astype(np.int64) + 1]

    # ---- blocks and pools ----------------------------------------------------------------
    def blocks(self, block_cells: int) -> np.ndarray:
        """Start offsets (into `cells`, plus the end) of runs of <= block_cells cells within one chunk.

        Memory O(chunks + blocks), not O(cells): chunk ids change rarely along storage order.
        """
        if block_cells not in self._blocks:
            ch = self.chunks[self.cells]
            n = len(ch)
            run_lo = np.flatnonzero(np.concatenate([[True], ch[1:] != ch[:-1]])).astype(np.int64)
            run_len = np.diff(np.append(run_lo, n))
            per_run = -(-run_len // block_cells)
            first = np.repeat(np.cumsum(per_run) - per_run, per_run)
            starts = np.repeat(run_lo, per_run) + (np.arange(per_run.sum()) - first) * block_cells
            self._blocks[block_cells] = np.append(starts, n).astype(np.int64)
        return self._blocks[block_cells]

    def block_weights(self, block_cells: int) -> np.ndarray:
        """Sum of sampling weights per block (cached: pools' anchor quotas are proportional to it)."""
        key = -block_cells  # shares the cache dict with `blocks`
        if key not in self._blocks:
            self._blocks[key] = np.add.reduceat(self.cell_weights(self.cells), self.blocks(block_cells)[:-1])
        return self._blocks[key]

    def epoch_cells(self) -> int:
        return self.cells_per_epoch if self.cells_per_epoch is not None else len(self.cells)

    def layout(self, epoch: int, batch_size: int, io_batch_cells: int, world: int = 1,
               drop_last: bool = True) -> EpochLayout:
        """Pools of `epoch`, assigned to ranks, each with whole minibatches; every rank gets `steps`.

        `steps` does not depend on the epoch. With drop_last, a pool emits at most the whole
        minibatches its expected anchor count fills (so a natural-frequency epoch repeats no cell),
        which costs up to one minibatch per pool: steps = total // (world * batch_size) - pools per rank
        when pools are made of blocks (< batch_size / io_batch_cells of an epoch). Without drop_last
        every cell counts: quotas are rounded to whole minibatches per pool (with several pools a few
        cells may then be drawn twice or skipped) and each rank's last minibatch may be short.
        """
        if batch_size < 1 or io_batch_cells < 1 or world < 1:
            raise DataError("batch_size, io_batch_cells and world size must all be >= 1.")
        total = self.epoch_cells()
        pool_blocks, block = self._pools(epoch, io_batch_cells, world)
        per_rank_pools = len(pool_blocks) // world
        if drop_last:
            steps = total // (world * batch_size) - (per_rank_pools if block > 1 else 0)
            if steps < 1:
                raise DataError(
                    f"batch_size={batch_size} x {world} rank(s) leaves no full minibatch in the {total} cells per "
                    f"epoch with drop_last=True (IO pools of <= {io_batch_cells} cells). Lower batch_size, raise "
                    "cells_per_epoch or io_batch_cells, or set drop_last=False.")
            last = batch_size
        else:
            per_rank = -(-total // world)
            steps = -(-per_rank // batch_size)
            last = per_rank - (steps - 1) * batch_size
        w_block = self.block_weights(block)
        w_pool = np.array([w_block[b].sum() for b in pool_blocks])
        owner = assign_pools(w_pool, world)
        expected = total * w_pool / w_pool.sum() / batch_size  # minibatches each pool can fill
        tasks: list[list[PoolTask]] = []
        for r in range(world):
            mine = np.flatnonzero(owner == r)
            quota = _quota(expected[mine], steps) if drop_last else largest_remainder(w_pool[mine], steps)
            rank_tasks = [PoolTask(int(k), pool_blocks[k], tuple([batch_size] * int(q)))
                          for k, q in zip(mine, quota) if q > 0]
            if last != batch_size:  # drop_last=False: the rank's final minibatch is short
                t = rank_tasks[-1]
                rank_tasks[-1] = PoolTask(t.pool_id, t.blocks, t.batch_sizes[:-1] + (last,))
            tasks.append(rank_tasks)
        return EpochLayout(epoch=epoch, world=world, steps=steps, tasks=tasks)

    def _pools(self, epoch: int, io_batch_cells: int, world: int) -> tuple[list[np.ndarray], int]:
        """Block ids of each pool in epoch order (a multiple of `world` pools), and the block size used."""
        n_sel, total = len(self.cells), self.epoch_cells()
        block = 1 if n_sel <= io_batch_cells else self.block_cells  # tiny data: perfect shuffle, it is cached
        sizes = np.diff(self.blocks(block))
        n_pools = world * -(-n_sel // (io_batch_cells * world))  # equal pool counts per rank
        if len(sizes) < n_pools:
            raise DataError(f"{n_sel} selected cells in {len(sizes)} blocks cannot feed {n_pools} IO pools for "
                            f"{world} rank(s); lower block_cells or the world size.")
        n_passes = -(-total // n_sel)
        keep = min(n_passes * n_pools, world * -(-total * n_pools // (n_sel * world)))  # the epoch's prefix
        pool_blocks: list[np.ndarray] = []
        for p in range(n_passes):  # cells_per_epoch > n_sel chains passes, each its own permutation
            rng = np.random.default_rng([self.seed, epoch, p, 0x5EED])
            perm = rng.permutation(len(sizes))
            cut = np.searchsorted(np.cumsum(sizes[perm]), np.arange(1, n_pools) * (n_sel / n_pools), side="left") + 1
            pool_blocks += np.split(perm, cut)
        return pool_blocks[:keep], block

    def pool_cells(self, task: PoolTask, block_cells: int) -> np.ndarray:
        starts = self.blocks(block_cells)
        lo, hi = starts[task.blocks], starts[task.blocks + 1]
        lens = hi - lo
        offs = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        return self.cells[offs]

    def draw(self, epoch: int, task: PoolTask, io_batch_cells: int) -> PoolDraw:
        """Anchors (weighted systematic resampling) and partners of one pool; deterministic."""
        block = 1 if len(self.cells) <= io_batch_cells else self.block_cells
        rng = np.random.default_rng([self.seed, epoch, task.pool_id, 0xD2A3])
        cells = self.pool_cells(task, block)
        cells = cells[rng.permutation(len(cells))]
        count = int(sum(task.batch_sizes))
        cw = np.cumsum(self.cell_weights(cells))
        cw *= count / cw[-1]
        cw[-1] = count
        u = 1.0 - rng.random()  # in (0, 1]: points u, u+1, ..., u+count-1 all lie in (0, count]
        n_le = np.maximum(np.floor(cw - u) + 1, 0).astype(np.int64)
        reps = np.diff(np.concatenate([[0], n_le]))
        anchors = np.repeat(cells, reps)[rng.permutation(count)]
        if self.permute:
            partners = choose_partners(anchors, cells, self.labels, self.batches, self.chunks,
                                       self.partner_index(), self.n_classes, rng)
        else:
            partners = anchors.copy()
        bounds = np.concatenate([[0], np.cumsum(task.batch_sizes)]).astype(np.int64)
        return PoolDraw(anchors=anchors.astype(np.int64), partners=partners, bounds=bounds)

    def partner_index(self) -> PartnerIndex:
        if self._index is None:
            self._index = PartnerIndex(self.cells, self.labels, self.batches, self.chunks, self.n_classes)
        return self._index

    def iter_minibatches(self, epoch: int, batch_size: int, io_batch_cells: int = DEFAULT_IO_BATCH_CELLS, world: int = 1,
                         rank: int = 0, drop_last: bool = True):
        """(anchors, partners) per minibatch of one rank, without reading data (tests, benchmarks)."""
        lay = self.layout(epoch, batch_size, io_batch_cells, world, drop_last)
        for task in lay.rank_tasks(rank):
            d = self.draw(epoch, task, io_batch_cells)
            for k in range(len(task.batch_sizes)):
                yield d.anchors[d.bounds[k]:d.bounds[k + 1]], d.partners[d.bounds[k]:d.bounds[k + 1]]

    # ---- sharing one plan between processes -------------------------------------------------
    def to_arrays(self, io_batch_cells: int = DEFAULT_IO_BATCH_CELLS) -> dict[str, np.ndarray]:
        """Every per-cell array the plan streams from, caches built: build once (one process), share read-only.

        With `from_arrays` in each rank, per-rank memory no longer grows with the atlas (the arrays can sit
        in shared memory, e.g. Ray's object store), and no rank repeats the O(cells) sorts of the partner index.
        """
        block = 1 if len(self.cells) <= io_batch_cells else self.block_cells
        out = {"labels": self.labels, "batches": self.batches, "chunks": self.chunks, "cells": self.cells,
               "class_counts": self.class_counts, "n_unlabelled": np.array(self.n_unlabelled),
               "n_classes": np.array(self.n_classes), "block_size": np.array(block),
               "blocks": self.blocks(block), "block_weights": self.block_weights(block),
               "balance": np.array(self.balance)}  # block weights depend on it
        if self.permute:
            for kind in PartnerIndex.KINDS:
                out.update({f"partners_{kind}.{k}": v for k, v in self.partner_index().by(kind).to_arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], balance: float = 0.0, permute: bool = True, seed: int = 0,
                    cells_per_epoch: int | None = None, block_cells: int = DEFAULT_BLOCK_CELLS) -> "SamplingPlan":
        """A plan over `to_arrays()` output with no per-cell work or copy (the arrays may be read-only)."""
        plan = cls.__new__(cls)
        plan.labels, plan.batches, plan.chunks, plan.cells = (arrays[k] for k in ("labels", "batches", "chunks", "cells"))
        plan.class_counts, plan.n_unlabelled = arrays["class_counts"], int(arrays["n_unlabelled"])
        plan.n_classes = int(arrays["n_classes"])
        plan.balance, plan.permute, plan.seed = float(balance), bool(permute), int(seed)
        plan.cells_per_epoch = None if cells_per_epoch is None else int(cells_per_epoch)
        plan.block_cells = int(block_cells)
        plan._weights = plan._class_weights()
        block = int(arrays["block_size"])
        plan._blocks = {block: arrays["blocks"]}
        if float(balance) == float(arrays.get("balance", balance)):
            plan._blocks[-block] = arrays["block_weights"]
        plan._index = None
        if permute and "partners_batch.cells" in arrays:
            plan._index = PartnerIndex(plan.cells, plan.labels, plan.batches, plan.chunks, plan.n_classes)
            for kind in PartnerIndex.KINDS:
                prefix = f"partners_{kind}."
                plan._index._by[kind] = GroupIndex.from_arrays(
                    {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        return plan

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_index"] = None  # rebuilt lazily in each worker; keeps pickles to spawn workers small
        state["_blocks"] = {}
        return state

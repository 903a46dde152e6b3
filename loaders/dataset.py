"""`PairedCellDataset`: streams normalised (anchor, partner) minibatches from any `CellSource`.

One sorted, de-duplicated `read_counts` call per IO pool (anchors and partners together), done by
`io_threads` background threads a bounded number of pools ahead (pools are read concurrently but
emitted in order); data stay sparse (CSR) until another thread densifies each minibatch, so the
consumer (training) thread only receives ready tensors. Memory is bounded by `io_batch_cells` x
(`prefetch` + `io_threads`) plus a few minibatches, not by the atlas size. A
selection that fits in one IO pool is read once and cached, so tiny datasets pay no per-epoch IO.

`read_counts` must hand over a fresh matrix (all sources do): it is normalised in place. A normalisation
over all genes (`Normalization.needs_totals`) divides each cell by its entry of `totals` (one per source
cell: its total counts over all of its genes, not only the genes read).

State and resume: the stream position is (epoch, minibatches consumed by this rank). Resuming skips
fully consumed pools without reading them and, for the pool in progress, reads only the rows the
remaining minibatches need (rows are normalised independently, so the tail is bitwise identical).
With DataLoader workers use `ds.loader(num_workers=...)`, which counts consumed minibatches in the
main process; workers receive the position when the DataLoader pickles the dataset at `iter()` and
are rotated so the resumed stream is exactly the tail of the uninterrupted one (same num_workers,
in-order delivery, non-persistent workers). A raw DataLoader also works, but then call `set_epoch`
every epoch and `advance(n)` if you want `state_dict` to track position.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch
from torch.utils.data import IterableDataset

from loaders.batch import PairedBatch
from loaders.errors import DataError
from loaders.memory import release_free_memory
from loaders.normalize import Normalization
from loaders.sampling import DEFAULT_IO_BATCH_CELLS, EpochLayout, PoolDraw, SamplingPlan
from loaders.sharding import dist_rank_world, in_worker_process, round_robin_consumed, worker_id_num

_END = object()
ASSEMBLED_AHEAD = 4  # dense minibatches ready ahead of the consumer (each 2 x batch x genes float32)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Blocking put that gives up when the consumer has gone (generator closed)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class PairedCellDataset(IterableDataset):
    """Iterable of `PairedBatch` for one rank (and, inside a DataLoader worker, one worker's share)."""

    def __init__(self, source, plan: SamplingPlan, normalization: Normalization | None = None,
                 batch_size: int = 430, label_codes=None, batch_codes=None, io_batch_cells: int = DEFAULT_IO_BATCH_CELLS,
                 prefetch: int = 1, drop_last: bool = True, cache_small: bool = True, io_threads: int = 1,
                 rank: int | None = None, world_size: int | None = None, totals=None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1; got {batch_size}.")
        if io_batch_cells < batch_size:
            raise DataError(f"io_batch_cells ({io_batch_cells}) must be >= batch_size ({batch_size}).")
        if prefetch < 1 or io_threads < 1:
            raise DataError(f"prefetch and io_threads must be >= 1; got {prefetch}, {io_threads}.")
        is_source = hasattr(source, "read_counts")
        if not is_source and not hasattr(source, "open"):
            raise DataError(f"expected a CellSource or a SourceSpec (with .open()); got {type(source).__name__}.")
        self._spec = None if is_source else source
        self._source = source if is_source else None
        self.plan = plan
        self.normalization = normalization or Normalization()
        self.batch_size, self.io_batch_cells, self.prefetch = int(batch_size), int(io_batch_cells), int(prefetch)
        self.io_threads = int(io_threads)
        self.drop_last, self.cache_small = bool(drop_last), bool(cache_small)
        n = len(plan.labels)
        # kept as given (int32 plans: no 8-byte copy per atlas cell); cast to int64 per minibatch
        self.label_codes = np.asarray(plan.labels if label_codes is None else label_codes)
        self.batch_codes = np.asarray(plan.batches if batch_codes is None else batch_codes)
        if len(self.label_codes) != n or len(self.batch_codes) != n:
            raise DataError(f"label_codes/batch_codes must have one entry per source cell ({n}).")
        self.totals = None if totals is None else np.asarray(totals)  # kept as given (float32: 4 B per cell)
        if self.totals is None and self.normalization.needs_totals:
            raise DataError("this normalisation divides by each cell's total counts over all genes: pass `totals` "
                            "(one per source cell, e.g. PreparedReference.totals).")
        if self.totals is not None and len(self.totals) != n:
            raise DataError(f"totals must have one entry per source cell ({n}); got {len(self.totals)}.")
        if self._source is not None and self._source.n_cells != n:
            raise DataError(f"the plan covers {n} cells but the source has {self._source.n_cells}; build the plan "
                            "from this source's obs.")
        self._fixed_dist = (rank, world_size) if rank is not None and world_size is not None else None
        self._rank, self._world = self._fixed_dist or (0, 1)
        self._epoch, self._step, self._num_workers = 0, 0, 1
        self._cache: tuple[np.ndarray, object] | None = None
        self._cache_lock = threading.Lock()
        self._layout_cache: EpochLayout | None = None
        self._resolve_dist()
        self._layout(0)  # validate sizes now: a bad batch_size fails at construction, not mid-training

    # ---- position ------------------------------------------------------------------------
    def _resolve_dist(self) -> None:
        if self._fixed_dist is None and not in_worker_process():
            self._rank, self._world = dist_rank_world()

    def _layout(self, epoch: int) -> EpochLayout:
        if self._layout_cache is None or self._layout_cache.epoch != epoch or self._layout_cache.world != self._world:
            self._layout_cache = self.plan.layout(epoch, self.batch_size, self.io_batch_cells, self._world, self.drop_last)
        return self._layout_cache

    def __len__(self) -> int:
        self._resolve_dist()
        return self._layout(self._epoch).steps

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to stream; keeps a resumed mid-epoch position if it is the same epoch."""
        if int(epoch) != self._epoch:
            self._epoch, self._step = int(epoch), 0

    def advance(self, n: int = 1) -> None:
        """Count n minibatches as consumed (for callers driving a raw DataLoader)."""
        self._step += int(n)

    def _normalise_position(self) -> None:
        if self._step >= len(self):
            self._epoch, self._step = self._epoch + 1, 0

    def state_dict(self) -> dict:
        self._normalise_position()
        return {"epoch": self._epoch, "step": self._step, "seed": self.plan.seed, "num_workers": self._num_workers,
                "world_size": self._world}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.plan.seed:
            raise DataError(f"state was saved with seed {state['seed']} but the plan uses seed {self.plan.seed}.")
        self._resolve_dist()
        if int(state.get("world_size", self._world)) != self._world:
            raise DataError(f"state was saved with world size {state['world_size']}, now {self._world}; "
                            "an exact resume needs the same number of ranks.")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self._num_workers = int(state.get("num_workers", 1))

    def loader(self, num_workers: int = 0, **kwargs) -> "PairedLoader":
        """An iterable over minibatches, through a DataLoader when num_workers > 0, that tracks position."""
        return PairedLoader(self, num_workers, **kwargs)

    # ---- streaming -----------------------------------------------------------------------
    def _open(self):
        if self._source is None:
            self._source = self._spec.open()
        return self._source

    def _my_work(self) -> list[tuple[object, int]]:
        """(pool task, first minibatch to emit) for this process, in stream order."""
        wid, nw = worker_id_num()
        if in_worker_process() and nw != self._num_workers and self._step > 0:
            raise DataError(f"resuming a position saved with {self._num_workers} DataLoader worker(s) on {nw}; "
                            "use the same num_workers (or ds.loader(), which records it).")
        tasks = self._layout(self._epoch).rank_tasks(self._rank)
        counts = np.array([sum(len(t.batch_sizes) for t in tasks[w::nw]) for w in range(nw)], dtype=np.int64)
        taken, start = round_robin_consumed(counts, self._step)
        logical = (wid + start) % nw
        skip, work = int(taken[logical]), []
        for t in tasks[logical::nw]:
            if skip >= len(t.batch_sizes):
                skip -= len(t.batch_sizes)  # fully consumed: neither drawn nor read
                continue
            work.append((t, skip))
            skip = 0
        return work

    def _read(self, source, rows: np.ndarray):
        """Normalised CSR of `rows` (in place: `read_counts` hands over a fresh matrix)."""
        if self.cache_small and len(self.plan.cells) <= self.io_batch_cells:
            with self._cache_lock:  # several IO threads: read the tiny selection once
                if self._cache is None:
                    cells = self.plan.cells
                    self._cache = (cells, self._normalise(source.read_counts(cells), cells))
            cells, x = self._cache
            return x[np.searchsorted(cells, rows)]
        return self._normalise(source.read_counts(rows), rows)

    def _normalise(self, x, rows: np.ndarray):
        totals = None if self.totals is None else self.totals[rows]
        return self.normalization.apply_csr(x, totals=totals, copy=False)

    def _load(self, source, epoch: int, task, first: int):
        """Draw one pool and read + normalise the rows its remaining minibatches need (an IO thread)."""
        draw = self.plan.draw(epoch, task, self.io_batch_cells)
        rows = draw.rows_for_steps(first)
        return draw, first, rows, self._read(source, rows)

    def _pipeline(self, work, out: queue.Queue, stop: threading.Event, epoch: int) -> None:
        """Read pools on `io_threads` threads (each pool still ONE sorted read, kept in stream order) and
        densify their minibatches here, off the consumer's thread. At most prefetch + 2 pools live."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        executor = ThreadPoolExecutor(self.io_threads, thread_name_prefix="scpermut-loader-io")
        pending: deque = deque()
        todo = iter(work)

        def submit_next() -> None:
            item = next(todo, None)
            if item is not None:
                pending.append(executor.submit(self._load, source, epoch, *item))

        try:
            source = self._open()
            for _ in range(self.prefetch + self.io_threads - 1):
                submit_next()
            while pending and not stop.is_set():
                draw, first, rows, x = pending.popleft().result()
                submit_next()
                for k in range(first, len(draw.bounds) - 1):
                    if not _put(out, self._minibatch(draw, k, rows, x), stop):
                        return
                del draw, rows, x
            _put(out, _END, stop)
        except BaseException as exc:  # surfaced in the consumer thread
            _put(out, exc, stop)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def __iter__(self):
        self._resolve_dist()
        self._normalise_position()
        main = not in_worker_process()
        epoch, work = self._epoch, self._my_work()
        release_free_memory()  # the epoch's per-cell planning temporaries are gone: give their pages back
        batches: queue.Queue = queue.Queue(maxsize=ASSEMBLED_AHEAD)
        stop = threading.Event()
        thread = threading.Thread(target=self._pipeline, args=(work, batches, stop, epoch), daemon=True,
                                  name="scpermut-loader-assemble")
        thread.start()
        try:
            while True:
                item = batches.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if main:
                    self._step += 1
                yield item
            if main:
                self._normalise_position()
        finally:
            stop.set()
            thread.join(timeout=60)

    def _minibatch(self, draw: PoolDraw, k: int, rows: np.ndarray, x) -> PairedBatch:
        lo, hi = draw.bounds[k], draw.bounds[k + 1]
        a, p = draw.anchors[lo:hi], draw.partners[lo:hi]
        x_ng = torch.from_numpy(x[np.searchsorted(rows, a)].toarray())
        if np.array_equal(a, p):
            x_partner_ng = x_ng  # no permutation in this minibatch: share the tensor (treat as read-only)
        else:
            x_partner_ng = torch.from_numpy(x[np.searchsorted(rows, p)].toarray())
        return PairedBatch(x_ng=x_ng, x_partner_ng=x_partner_ng, label_n=torch.from_numpy(self.label_codes[a].astype(np.int64)),
                           batch_n=torch.from_numpy(self.batch_codes[a].astype(np.int64)), cell_n=torch.from_numpy(a.copy()))

    def __getstate__(self) -> dict:
        self._resolve_dist()  # pickled in the main process (DataLoader spawn): carry rank/world to workers
        state = self.__dict__.copy()
        state["_cache"] = None
        state["_cache_lock"] = None
        state["_layout_cache"] = None
        if self._spec is not None:
            state["_source"] = None  # reopened lazily in each worker
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()


class PairedLoader:
    """Iterates a `PairedCellDataset` directly or through a DataLoader, counting consumed minibatches."""

    def __init__(self, dataset: PairedCellDataset, num_workers: int = 0, **kwargs):
        self.dataset, self.num_workers, self.kwargs = dataset, int(num_workers), kwargs

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def __iter__(self):
        ds = self.dataset
        if self.num_workers == 0:
            ds._num_workers = 1
            yield from ds
            return
        from torch.utils.data import DataLoader

        if self.kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True would keep stale epoch/position copies in the workers; "
                             "PairedLoader needs fresh workers each epoch (the default).")
        ds._normalise_position()
        if ds._step > 0 and ds._num_workers != self.num_workers:
            raise DataError(f"resuming a position saved with {ds._num_workers} DataLoader worker(s) on "
                            f"{self.num_workers}; use the same num_workers.")
        ds._num_workers = self.num_workers
        kw = {"multiprocessing_context": "spawn", "persistent_workers": False, **self.kwargs}
        for batch in DataLoader(ds, batch_size=None, num_workers=self.num_workers, **kw):
            ds._step += 1
            yield batch
        ds._normalise_position()

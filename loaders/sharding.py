"""Who reads what: rank / DataLoader-worker identity, pool-to-rank assignment and worker interleaving.

Kept apart from the sampler so the arithmetic that makes shards disjoint, complete and equally long
(the property DDP needs: every rank runs the same number of steps) is small and testable on its own.
"""
from __future__ import annotations

import os

import numpy as np


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised (torchrun, Ray Train), else env RANK/WORLD_SIZE, else 0/1."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def worker_id_num() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (int(info.id), int(info.num_workers))


def in_worker_process() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` summing exactly to `total` (Hamilton apportionment)."""
    weights = np.asarray(weights, dtype=np.float64)
    if total <= 0 or len(weights) == 0:
        return np.zeros(len(weights), dtype=np.int64)
    s = weights.sum()
    share = weights / s * total if s > 0 else np.full(len(weights), total / len(weights))
    out = np.floor(share).astype(np.int64)
    short = int(total - out.sum())
    if short > 0:  # stable tie-break by index keeps this deterministic
        out[np.argsort(-(share - out), kind="stable")[:short]] += 1
    return out


def assign_pools(weights: np.ndarray, world: int) -> np.ndarray:
    """Rank of each pool: greedy longest-processing-time on the pools' sampling weights.

    Balances the anchors each rank draws (so equal step counts barely distort class frequencies);
    deterministic, so every rank computes the same assignment without communicating.
    """
    weights = np.asarray(weights, dtype=np.float64)
    owner = np.empty(len(weights), dtype=np.int64)
    load = np.zeros(world)
    count = np.zeros(world, dtype=np.int64)
    for k in np.argsort(-weights, kind="stable"):
        r = int(np.lexsort((np.arange(world), count, load))[0])  # least loaded, then fewest pools
        owner[k] = r
        load[r] += weights[k]
        count[r] += 1
    return owner


def round_robin_consumed(counts: np.ndarray, consumed: int) -> tuple[np.ndarray, int]:
    """How a DataLoader (in_order=True) interleaves iterable workers, inverted.

    Workers deliver in rounds: in round t, each worker (in id order) that still has a t-th batch
    delivers it. Given the batches each logical worker produces (`counts`) and how many batches the
    consumer took, return (batches taken from each worker, the logical worker that delivers next).
    Resumed workers are rotated so that physical worker 0 plays that next logical worker, which
    makes the resumed stream exactly the tail of the uninterrupted one.
    """
    counts = np.asarray(counts, dtype=np.int64)
    nw = len(counts)
    total = int(counts.sum())
    if consumed >= total:
        return counts.copy(), 0
    taken = np.zeros(nw, dtype=np.int64)
    left = consumed
    t = 0
    while True:
        active = np.flatnonzero(counts > t)
        if left < len(active):
            taken[active[:left]] += 1
            return taken, int(active[left])
        taken[active] += 1
        left -= len(active)
        t += 1


def rotated_logical(worker: int, num_workers: int, start: int) -> int:
    """The logical worker a physical worker plays when the round starts at logical worker `start`."""
    return (worker + start) % num_workers

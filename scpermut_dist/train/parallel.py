"""Ensemble members side by side in worker processes, on a multi-core CPU.

A member's steps (430 cells through the authors' 1,151/235/84 layers) keep few cores busy, so on a CPU members in
parallel, each on a share of the cores, finish sooner than members in turn with every core each. A worker trains
exactly what `train_members` trains for that member (`member_trainer` seeds from the member alone): at the same
thread count the weights are the same bit for bit, so the choice changes the time, not the model.

Workers are joblib's loky processes: they do not re-run the caller's `__main__` (a script without a
`if __name__ == "__main__"` guard still works), stay warm between calls (an `evaluate` run's folds reuse them),
and large arrays reach them memory-mapped. Ray runs keep members in turn: there every member uses the whole
worker group (DDP).
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from typing import Callable

from scpermut_dist.config import RunConfig, TrainConfig
from scpermut_dist.cpu import available_cores, set_torch_threads
from scpermut_dist.mapping.reference import Reference
from scpermut_dist.train.preprocess import PreparedReference, open_source
from scpermut_dist.train.reference import (
    MemberSplit,
    RunProgress,
    TrainedMember,
    _module_from_state,
    _reference,
    member_trainer,
    trained_member,
)

log = logging.getLogger(__name__)


def member_processes(train: TrainConfig, n_members: int, cores: int | None = None) -> tuple[int, int | None]:
    """(worker processes, torch threads per worker) for `n_members` members; (1, num_threads) means in turn."""
    cores = available_cores() if cores is None else cores
    if n_members < 2 or train.device != "cpu" or train.parallel_members == 1:
        return 1, train.num_threads
    if train.parallel_members == "auto":
        threads = train.num_threads or max(1, cores // min(n_members, cores))
        processes = min(n_members, max(1, cores // threads))
    else:
        processes = min(int(train.parallel_members), n_members)
        threads = train.num_threads or max(1, cores // processes)
    return (processes, threads) if processes > 1 else (1, train.num_threads)


def train_members_in_parallel(prep: PreparedReference, splits: list[MemberSplit], cfg: RunConfig, processes: int,
                              threads: int, quiet: bool = True, report: Callable[[dict], None] | None = None,
                              t_start: float | None = None) -> Reference:
    """Every member in its own loky worker; the reference is assembled in member order, as in turn."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    t_start = time.perf_counter() if t_start is None else t_start
    if not quiet:
        log.info("training %d ensemble members in %d processes x %d threads", len(splits), processes, threads)
    portable = portable_reference(prep)
    jobs = (delayed(_train_member)(portable, splits, k, cfg, threads) for k in range(len(splits)))
    done: dict[int, TrainedMember] = {}
    t0 = time.perf_counter()
    parallel = Parallel(n_jobs=processes, backend="loky", return_as="generator_unordered")
    outputs = parallel(jobs)
    # A member's epochs are reported when it finishes (workers have no live channel); the bar is for quiet reports.
    bar = tqdm(outputs, total=len(splits), unit="member", disable=quiet or report is not None, leave=False)
    finished = iter(bar)
    try:
        for member in finished:
            done[member.index] = member
            for record in member.history if report is not None else ():
                report(record)
    except BaseException:  # a member failed, Ctrl-C, SIGTERM (commands.main.Terminated), a failing report
        _kill_workers(finished, outputs)
        raise
    finally:
        bar.close()
    progress = RunProgress()
    for k in range(len(splits)):
        progress.add(done[k])
    progress.train_seconds = time.perf_counter() - t0  # wall time: the members overlapped
    members = [_module_from_state(cfg, prep, sd) for sd in progress.finished]
    return _reference(prep, cfg, splits, members, progress, t_start)


def _kill_workers(*generators) -> None:
    """Stop the members still training: their loky workers are killed, not left to finish (or orphaned).

    Closing joblib's output generator (and the progress bar's around it) aborts the call, which shuts the
    executor down with kill_workers=True (joblib does so itself when the exception came up through the
    generator); the reusable executor's `shutdown(wait=False, kill_workers=True)` then makes sure, should
    joblib have left it running."""
    for generator in generators:
        try:
            with warnings.catch_warnings():  # joblib's "tasks ... have been cancelled": that is the point here
                warnings.simplefilter("ignore", UserWarning)
                generator.close()
        except BaseException:  # noqa: BLE001 - the original exception is what the caller re-raises
            log.debug("closing the member generator failed", exc_info=True)
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)  # loky's process-wide reusable executor, if any
    if executor is not None:
        try:
            executor.shutdown(wait=False, kill_workers=True)
        except BaseException:  # noqa: BLE001
            log.debug("shutting the loky executor down failed", exc_info=True)


def portable_reference(prep: PreparedReference) -> PreparedReference:
    """`prep` as it travels to a worker: an in-memory AnnData as its model genes only, a file or store as the
    spec the worker opens itself (readers hold file handles and thread pools that do not cross processes)."""
    compact = getattr(prep.source, "compact", None)
    if compact is not None:
        small = compact()
        return replace(prep, spec=small, source=small)
    return replace(prep, source=None)


def _train_member(prep: PreparedReference, splits: list[MemberSplit], k: int, cfg: RunConfig,
                  threads: int) -> TrainedMember:
    set_torch_threads(threads)
    if prep.source is None:
        prep = replace(prep, source=open_source(prep.spec))
    try:
        trainer, validation = member_trainer(prep, splits, k, cfg)
        t0 = time.perf_counter()
        trainer.fit()
        return trained_member(trainer, validation, splits, k, time.perf_counter() - t0)
    finally:
        prep.source.close()

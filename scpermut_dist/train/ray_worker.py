"""The Ray Train worker loop: the one `Trainer` on every DDP rank, checkpoints and metrics through `ray.train`.

Each rank gets the driver's preparation (`WorkerJob`): the per-cell codes and the sampling plans' arrays
sit in Ray's object store (shared memory on a node, read zero-copy), so a rank holds no per-cell state of its
own and never repeats the preparation. A rank streams its own shard (rank / world size from the Ray Train
context; Ray never shards an IterableDataset). Checkpoints hold a `model/` folder that `scpermut map`
loads, and `train_state.pt`: ensemble progress, trainer state (stage, epoch, step, running epoch,
optimiser, loader position) and every rank's RNG. A restarted worker group resumes from the state inside
the checkpoint `ray.train.get_checkpoint()` returns, wherever that is in the run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scpermut_dist.config import RunConfig
from scpermut_dist.train.preprocess import PreparedReference
from scpermut_dist.train.reference import (
    MemberSplit,
    RunProgress,
    _reference,
    train_members,
)
from scpermut_dist.train.trainer import Trainer, rng_state

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"


@dataclass
class WorkerJob:
    """Everything a rank needs, small or by object reference (pickled once per worker group start)."""

    config: dict  # RunConfig.model_dump()
    spec: Any  # picklable source spec restricted to the model genes (each rank opens its own reader)
    meta: dict  # PreparedArrays.meta(): genes, normalisation, classes, batches, description
    codes_ref: Any  # ObjectRef -> {"label_codes", "batch_codes", "cells", "chunks", "joinids", "totals"}
    splits_ref: Any  # ObjectRef -> list[MemberSplit]
    plan_refs: dict  # (member, "all"|"labelled", permute) -> ObjectRef of SamplingPlan.to_arrays() minus codes
    run_dir: str
    use_gpu: bool = False


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train

    job: WorkerJob = config["job"]
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is noise at 500-step periods
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.validate_dict(job.config)
    device = _device(job.use_gpu)
    cfg = cfg.apply_overrides([f"train.device={device}"])
    torch.set_num_threads(cfg.train.num_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    _write_worker_file(job.run_dir, rank)
    codes = ray.get(job.codes_ref)  # read-only views on shared memory
    splits: list[MemberSplit] = ray.get(job.splits_ref)
    prep = _prepared(job, codes)
    plans = _plan_lookup(job, codes, cfg)
    checkpoint = ray.train.get_checkpoint()
    resume = _load_state(checkpoint, rank) if checkpoint is not None else None
    hooks = RayHooks(job, cfg, prep, splits, rank, world)
    hooks.log_event("resume" if resume else "start", resume, checkpoint)
    try:
        ref = train_members(prep, splits, cfg, quiet=True, plans=plans, hooks=hooks, resume=resume)
        hooks.finish(ref)
    finally:
        prep.source.close()
    _write_worker_file(job.run_dir, rank, **_memory())


def _device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()  # this worker's own GPU
    torch.cuda.set_device(device)
    return device


def _prepared(job: WorkerJob, codes: dict) -> PreparedReference:
    import pandas as pd

    from loaders.normalize import Normalization

    from loaders.sources import CensusSpec, SomaExperimentSpec

    m = job.meta
    # A SOMA/Census rank opens X and var only, on the driver's shared joinids: reading obs again would cost
    # every rank per-cell strings and copies (GBs at 10^8 cells). An h5ad is small enough to reopen.
    shared_rows = isinstance(job.spec, (SomaExperimentSpec, CensusSpec))
    source = job.spec.open(joinids=codes["joinids"]) if shared_rows else job.spec.open()
    return PreparedReference(job.spec, source, pd.DataFrame(m["genes"]), Normalization.from_dict(m["normalization"]),
                             m["classes"], m["batches"], codes["label_codes"], codes["batch_codes"], codes["cells"],
                             m["description"], totals=codes.get("totals"))


def _plan_lookup(job: WorkerJob, codes: dict, cfg: RunConfig):
    """plans(member, stage, index): the driver's plan over shared arrays, with this stage's seed."""
    import ray

    from loaders.sampling import SamplingPlan

    base = {"labels": codes["label_codes"], "batches": codes["batch_codes"], "chunks": codes["chunks"]}

    def plans(member: int, stage, index: int):
        ref = job.plan_refs.get((member, stage.cells, bool(stage.permutation)))
        if ref is None:
            return None
        return SamplingPlan.from_arrays({**base, **ray.get(ref)}, balance=cfg.data.sampling.balance,
                                        permute=stage.permutation, seed=_member_seed(job, member) * 1000 + index,
                                        cells_per_epoch=stage.cells_per_epoch)

    return plans


def _member_seed(job: WorkerJob, member: int) -> int:
    from scpermut_dist.train.reference import member_seed

    return member_seed(int(job.config["train"]["seed"]), member)


class RayHooks:
    """Checkpoints every `train.checkpoint_every_steps` steps (mid-epoch too) and at stage and member ends,
    each with its metrics through `ray.train.report` (every rank calls it at the same points); every epoch's
    metrics also go to RUN_DIR/metrics.jsonl."""

    def __init__(self, job: WorkerJob, cfg: RunConfig, prep: PreparedReference, splits: list[MemberSplit],
                 rank: int, world: int) -> None:
        self.job, self.cfg, self.prep, self.splits, self.rank, self.world = job, cfg, prep, splits, rank, world
        self.every_steps = cfg.train.checkpoint_every_steps
        self.metrics_path = Path(job.run_dir) / "metrics.jsonl"
        self._last_checkpoint_step: int | None = None
        self._t0 = time.perf_counter()

    # ---- the points training calls -------------------------------------------------------------------
    def on_step(self, trainer: Trainer, progress: RunProgress) -> None:
        self._report(trainer, progress, {"event": "step"}, checkpoint=True)

    def on_epoch_end(self, trainer: Trainer, progress: RunProgress) -> None:
        member_done = trainer.stage is None
        if member_done and progress.member >= len(self.splits):
            return  # the final report (`finish`) checkpoints the finished run
        due = self._last_checkpoint_step is None or trainer.step - self._last_checkpoint_step >= self.every_steps
        record = dict(trainer.history[-1]) if trainer.history and not member_done else {}
        event = {"event": "member_end" if member_done else "epoch_end", **record}
        if member_done or trainer.stage_done or due:
            self._report(trainer, progress, event, checkpoint=True)
        else:  # every epoch is logged; a Ray report (a ~1-2 s barrier) only comes with a checkpoint
            self._append(self._stamp(trainer, progress, event))

    def finish(self, ref) -> None:
        """The last report: its checkpoint holds the final model (the driver copies it to RUN_DIR/model)."""
        import ray.train

        metrics = {"event": "final", "step": self._steps_total(ref), "member": len(self.splits),
                   **{k: v for k, v in ref.metrics.items() if isinstance(v, (int, float))}, "world_size": self.world}
        tmp = self._write_checkpoint(ref, {"progress": self._final_progress(ref), "trainer": None, "rngs": None,
                                           "world_size": self.world, "step": metrics["step"]}) if self.rank == 0 else None
        self._append(metrics)
        try:
            ray.train.report(metrics, checkpoint=_as_checkpoint(tmp), checkpoint_dir_name=f"final_{metrics['step']:09d}")
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def log_event(self, event: str, resume: dict | None, checkpoint) -> None:
        step = int(resume["step"]) if resume else 0
        self._append({"event": event, "step": step, "world_size": self.world,
                      "checkpoint": Path(checkpoint.path).name if checkpoint is not None else None,
                      "member": (resume or {}).get("progress", {}).get("member", 0)})

    # ---- internals -----------------------------------------------------------------------------------
    def _report(self, trainer: Trainer, progress: RunProgress, metrics: dict, checkpoint: bool) -> None:
        import ray.train

        metrics = self._stamp(trainer, progress, metrics)
        state = None
        if checkpoint:
            self._last_checkpoint_step = trainer.step
            rngs = _gather(rng_state(), self.world)  # every rank's dropout stream
            if self.rank == 0:
                live = trainer.stage is not None
                state = {"progress": progress.state_dict(), "trainer": trainer.state_dict() if live else None,
                         "rngs": rngs if live else None, "world_size": self.world, "step": trainer.step}
        tmp = self._write_checkpoint(self._snapshot(trainer, progress), state) if state is not None else None
        self._append({**metrics, **({"rank0_" + k: round(v, 1) for k, v in _memory().items()} if checkpoint else {})})
        name = f"checkpoint_{trainer.step:09d}_m{progress.member}" if checkpoint else None
        try:
            ray.train.report(metrics, checkpoint=_as_checkpoint(tmp), checkpoint_dir_name=name)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def _stamp(self, trainer: Trainer, progress: RunProgress, metrics: dict) -> dict:
        return {**metrics, "step": trainer.step, "member": progress.member, "world_size": self.world,
                "stage": trainer.stage.name if trainer.stage else None, "epoch": metrics.get("epoch", trainer.epoch),
                "elapsed_s": round(time.perf_counter() - self._t0, 3)}

    def _snapshot(self, trainer: Trainer, progress: RunProgress):
        """The model as it stands (finished members, then the one in training): what `scpermut map` loads."""
        from scpermut_dist.train.reference import _module_from_state

        sds = list(progress.finished)
        if trainer.stage is not None:
            sds.append({k: v.detach().cpu() for k, v in trainer.module.state_dict().items()})
        members = [_module_from_state(self.cfg, self.prep, sd) for sd in sds]
        live = list(trainer.history) if trainer.stage is not None else []  # a finished member is in progress
        snap = RunProgress(progress.member, sds, list(progress.member_metrics) or [{"n_val_cells": 0}],
                           progress.history + live, progress.train_seconds)
        return _reference(self.prep, self.cfg, self.splits, members, snap, self._t0)

    def _write_checkpoint(self, ref, state: dict) -> str:
        tmp = tempfile.mkdtemp(prefix="scpermut-ckpt-")
        ref.save(Path(tmp) / MODEL_DIR)
        torch.save(state, Path(tmp) / STATE_FILE)
        (Path(tmp) / "position.json").write_text(json.dumps(
            {"step": state.get("step"), "member": state["progress"]["member"], "world_size": self.world}))
        return tmp

    def _final_progress(self, ref) -> dict:
        return {"member": len(self.splits), "finished": [m.state_dict() for m in ref.members],
                "member_metrics": ref.summary.get("members") or [{k: v for k, v in ref.metrics.items()}],
                "history": ref.history, "train_seconds": ref.summary.get("train_seconds", 0.0)}

    def _steps_total(self, ref) -> int:
        steps = [r.get("step", 0) for r in ref.history]
        return int(max(steps)) if steps else 0

    def _append(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _as_checkpoint(path: str | None):
    if path is None:
        return None
    import ray.train

    return ray.train.Checkpoint.from_directory(path)


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


class UnreadableTrainState(RuntimeError):
    """The latest checkpoint's state cannot be read: every restart would fail on it (the driver says what to delete,
    matching this class's name in the error Ray carries back)."""


def _load_state(checkpoint, rank: int) -> dict:
    """The run's state inside the checkpoint Ray handed back; this rank takes its own RNG stream."""
    with checkpoint.as_directory() as d:
        try:
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        except Exception as exc:  # truncated, missing or not a torch file: torch raises many types
            raise UnreadableTrainState(f"{getattr(checkpoint, 'path', d)}: {STATE_FILE} cannot be read "
                                       f"({type(exc).__name__}: {exc})") from exc
    if state.get("trainer") is not None and state.get("rngs"):
        state["trainer"]["rng"] = state["rngs"][rank]
    return state


def _write_worker_file(run_dir: str, rank: int, **extra) -> None:
    """Which process is which rank (operators kill or profile a worker by it; the tests do); at the end, its
    memory: peak RSS (shared pages it touched included) and USS (memory of its own)."""
    d = Path(run_dir) / "workers"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), **extra}))
    os.replace(tmp, d / f"rank{rank}.json")


def _memory() -> dict:
    import resource

    import psutil

    info = psutil.Process().memory_full_info()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "uss_mb": info.uss / 2**20,
            "pss_mb": info.pss / 2**20}


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    return str(o)

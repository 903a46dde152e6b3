"""Build a reference: prepare the source once, split, train each ensemble member with the one `Trainer`.

An AnnData is just another source: training reads it through AnnDataSource -> SamplingPlan ->
PairedCellDataset -> PairedBatch, the same path as an h5ad file or a SOMA atlas.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from loaders.sharding import dist_rank_world
from scpermut_dist.config import RunConfig, resolve_ensemble_size
from scpermut_dist.mapping.reference import Reference
from scpermut_dist.model.losses import LossWeights
from scpermut_dist.model.module import ScPermutModule
from scpermut_dist.train.finalize import finalize_reference
from scpermut_dist.train.preprocess import (
    PreparedReference,
    SourceFactory,
    prepare_reference,
)
from scpermut_dist.train.split import stratified_split
from scpermut_dist.train.trainer import Trainer, ValidationSet, note_precision, resolve_device, validation_metrics

log = logging.getLogger(__name__)


def config_with_data_keys(cfg: RunConfig, label_key, batch_key, unlabeled_value, layer) -> RunConfig:
    sets = [f"data.label_key={label_key}"] if label_key is not None else []
    data = cfg.model_dump()
    if batch_key is not None:
        data["data"]["batch_keys"] = batch_key.split("+") if isinstance(batch_key, str) else list(batch_key)
    if unlabeled_value is not None:
        data["data"]["unlabeled_value"] = unlabeled_value
    if layer is not None:
        data["data"]["layer"] = layer
    return RunConfig.validate_dict(data).apply_overrides(sets)


@dataclass
class MemberSplit:
    """One ensemble member's seed and cells: validation sample, training cells (all / labelled only)."""

    seed: int
    val: np.ndarray
    train_all: np.ndarray
    train_lab: np.ndarray

    def cells(self, kind: str) -> np.ndarray:
        return self.train_all if kind == "all" else self.train_lab


@dataclass
class TrainedMember:
    """One finished member: its index, weights, history, validation scores and training seconds."""

    index: int
    state_dict: dict
    history: list[dict]
    metrics: dict
    seconds: float


@dataclass
class RunProgress:
    """Where an ensemble run stands: finished members (weights, metrics) and time spent (resumable)."""

    member: int = 0
    finished: list[dict] = field(default_factory=list)  # state dicts of members 0..member-1
    member_metrics: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0

    def state_dict(self) -> dict:
        return {"member": self.member, "finished": self.finished, "member_metrics": self.member_metrics,
                "history": self.history, "train_seconds": self.train_seconds}

    @classmethod
    def from_state(cls, state: dict) -> "RunProgress":
        return cls(**state)

    def add(self, member: TrainedMember) -> None:
        """Record the next member as finished (members are recorded in order)."""
        if member.index != len(self.finished):
            raise ValueError(f"member {member.index} recorded after {len(self.finished)} finished members")
        self.finished.append(member.state_dict)
        self.member_metrics.append(member.metrics)
        self.history += member.history
        self.train_seconds += member.seconds
        self.member = member.index + 1


class RunHooks(Protocol):
    """What a launcher plugs into training: periodic checkpoints and metric reports (see train.ray_worker)."""

    every_steps: int | None

    def on_step(self, trainer: Trainer, progress: RunProgress) -> None: ...

    def on_epoch_end(self, trainer: Trainer, progress: RunProgress) -> None: ...


def train_reference(factory: SourceFactory, cfg: RunConfig, where: str, out_dir: str | Path | None = None,
                    quiet: bool = True, report: Callable[[dict], None] | None = None) -> Reference:
    """In-process training: prepare the reference, split, train every member's stages (members side by side
    in worker processes where the CPU has the cores: train.parallel), (optionally) save."""
    from scpermut_dist.cpu import set_torch_threads
    from scpermut_dist.train.parallel import member_processes, train_members_in_parallel

    t_start = time.perf_counter()
    set_torch_threads(cfg.train.num_threads)  # unset: torch's count capped at a container's CPU quota
    note_precision(cfg.train.precision, resolve_device(cfg.train.device).type)
    prep = prepare_reference(factory, cfg.data, where, progress=not quiet)
    try:
        splits = member_splits(prep, cfg)
        processes, threads = member_processes(cfg.train, len(splits))
        if processes > 1 and dist_rank_world()[1] == 1:
            ref = train_members_in_parallel(prep, splits, cfg, processes, threads, quiet, report, t_start)
        else:
            ref = train_members(prep, splits, cfg, quiet=quiet, report=report, t_start=t_start)
        finalize_reference(ref, prep, splits, cfg)  # calibration, reference neighbours, unknown rule
    finally:
        prep.source.close()
    if out_dir is not None and dist_rank_world()[0] == 0:
        ref.save(out_dir)
    return ref


def member_splits(prep: PreparedReference, cfg: RunConfig) -> list[MemberSplit]:
    """Each member its own validation split, init, sampling and partners: bagging-like diversity (with one
    shared split, three Kang members averaged no better than one)."""
    codes_qc = np.full(len(prep.label_codes), -1, dtype=np.int64)
    codes_qc[prep.cells] = prep.label_codes[prep.cells]
    groups = prep.batch_codes if cfg.data.val_split == "batch" else None
    splits = []
    for k in range(resolve_ensemble_size(cfg.model, int((codes_qc >= 0).sum()))):
        seed = member_seed(cfg.train.seed, k)
        train_lab, val = stratified_split(codes_qc, cfg.data.val_fraction, cfg.data.val_max_cells, seed,
                                          min_per_class=cfg.data.val_min_per_class, groups=groups)
        splits.append(MemberSplit(seed, val, np.setdiff1d(prep.cells, val, assume_unique=True), train_lab))
    return splits


def member_seed(seed: int, k: int) -> int:
    """Member 0 is the single model of `seed`; the others draw from seeds no other run's member 0 uses."""
    return seed if k == 0 else seed + 1_000_003 * k


def train_members(prep: PreparedReference, splits: list[MemberSplit], cfg: RunConfig, quiet: bool = True,
                  report: Callable[[dict], None] | None = None, plans: Callable | None = None,
                  hooks: RunHooks | None = None, resume: dict | None = None, t_start: float | None = None
                  ) -> Reference:
    """Train the members in turn with the one `Trainer` (any world size); `resume` continues a checkpoint."""
    t_start = time.perf_counter() if t_start is None else t_start
    progress = RunProgress.from_state(resume["progress"]) if resume else RunProgress()
    members = [_module_from_state(cfg, prep, sd) for sd in progress.finished]
    for k in range(progress.member, len(splits)):
        progress.member = k
        if len(splits) > 1 and not quiet:
            log.info("ensemble member %d of %d", k + 1, len(splits))
        trainer, validation = member_trainer(prep, splits, k, cfg, quiet=quiet, report=report, plans=plans)
        if resume is not None and resume.get("trainer") is not None:
            trainer.load_state_dict(resume["trainer"])
        resume = None
        t0 = time.perf_counter()
        fit_hooks = {} if hooks is None else {
            "on_step": lambda t: hooks.on_step(t, progress), "every_steps": hooks.every_steps,
            "on_epoch_end": lambda t: hooks.on_epoch_end(t, progress)}
        trainer.fit(**fit_hooks)
        progress.add(trained_member(trainer, validation, splits, k, time.perf_counter() - t0))
        members.append(trainer.module)
        if hooks is not None:
            hooks.on_epoch_end(trainer, progress)  # a member boundary: the next one starts from scratch
    return _reference(prep, cfg, splits, members, progress, t_start)


def member_trainer(prep: PreparedReference, splits: list[MemberSplit], k: int, cfg: RunConfig, quiet: bool = True,
                   report: Callable[[dict], None] | None = None, plans: Callable | None = None
                   ) -> tuple[Trainer, ValidationSet]:
    """Member k's freshly initialised module in its `Trainer`, with its validation cells (seeded by the member
    alone, so a member trains the same in turn or in its own process)."""
    split = splits[k]
    member_cfg = cfg.apply_overrides([f"train.seed={split.seed}"])
    validation = read_validation(prep, split.val)
    torch.manual_seed(member_cfg.train.seed)
    module = ScPermutModule.from_config(cfg.model, len(prep.genes), len(prep.classes), len(prep.batches))
    trainer = Trainer(module, cfg.resolved_stages(), _loader_factory(prep, member_cfg, split, k, plans),
                      LossWeights.from_config(cfg.loss), lr=cfg.train.lr, seed=member_cfg.train.seed,
                      validation=validation, focal_alpha=cfg.loss.focal_alpha, device=cfg.train.device,
                      quiet=quiet, report=report, dann_lr_mult=cfg.train.dann_lr_mult,
                      precision=cfg.train.precision, monitor=cfg.train.early_stopping_monitor,
                      focal_alpha_max=cfg.loss.focal_alpha_max, tolerance=cfg.train.early_stopping_tolerance)
    return trainer, validation


def trained_member(trainer: Trainer, validation: ValidationSet, splits: list[MemberSplit], k: int,
                   seconds: float) -> TrainedMember:
    """What a fitted member leaves: CPU weights, its history (tagged in an ensemble), its validation scores."""
    split, module = splits[k], trainer.module
    history = [{**r, "member": k} for r in trainer.history] if len(splits) > 1 else list(trainer.history)
    scores = validation_metrics(module, validation) if _any_validation(validation) else {}
    module.cpu().eval()
    return TrainedMember(k, {key: v.detach().cpu() for key, v in module.state_dict().items()}, history,
                         {**scores, "n_val_cells": int(len(split.val)), "seed": split.seed}, seconds)


def _reference(prep: PreparedReference, cfg: RunConfig, splits: list[MemberSplit], members: list[ScPermutModule],
               progress: RunProgress, t_start: float) -> Reference:
    # Each member is scored on its own held-out cells; the ensemble reports their mean.
    mm = progress.member_metrics
    metrics = {key: float(np.mean([m[key] for m in mm])) for key in mm[0] if key != "seed"}
    metrics["n_val_cells"] = mm[0]["n_val_cells"]
    cells, train_s = sum(r["cells"] for r in progress.history), progress.train_seconds
    summary = {"train_seconds": round(train_s, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
               "cells_seen": int(cells), "cells_per_s": cells / train_s if train_s > 0 else float("nan"),
               "n_train_cells": int(len(splits[0].train_all)), "n_train_labelled": int(len(splits[0].train_lab)),
               "stages": list(dict.fromkeys(r["stage"] for r in progress.history)),
               "ensemble_size": len(members), "world_size": dist_rank_world()[1], **metrics,
               **({"members": mm} if len(members) > 1 else {})}
    return Reference(members[0], cfg, prep.genes[["feature_id", "feature_name"]].reset_index(drop=True), prep.classes,
                     prep.batches, prep.normalization, prep.description, metrics, summary, progress.history,
                     extra_members=members[1:])


def _module_from_state(cfg: RunConfig, prep: PreparedReference, state_dict: dict) -> ScPermutModule:
    """A module holding `state_dict`, built without drawing from the global RNG: a checkpoint taken mid-run
    must not shift the dropout stream of the training it snapshots (resume would then differ)."""
    with torch.random.fork_rng(devices=[]):
        module = ScPermutModule.from_config(cfg.model, len(prep.genes), len(prep.classes), len(prep.batches))
    module.load_state_dict(state_dict)
    return module.eval()


def _any_validation(validation: ValidationSet) -> bool:
    """True on every rank when any rank holds validation cells (the metrics are a collective under DDP)."""
    from scpermut_dist.train.trainer import agree

    return agree(len(validation) > 0) if dist_rank_world()[1] > 1 else len(validation) > 0


def read_validation(prep: PreparedReference, val: np.ndarray) -> ValidationSet:
    """This rank's shard of the fixed validation sample, read and normalised once (metrics reduce over ranks)."""
    rank, world = dist_rank_world()
    mine = np.asarray(val)[rank::world]
    if len(mine) == 0:
        return ValidationSet(torch.zeros(0, len(prep.genes)), torch.zeros(0, dtype=torch.long))
    totals = None if prep.totals is None else np.asarray(prep.totals)[mine]  # library size over all genes
    x = prep.normalization.apply_dense(prep.source.read_counts(mine), totals)
    return ValidationSet(torch.from_numpy(x), torch.from_numpy(np.asarray(prep.label_codes)[mine].astype(np.int64)))


def per_rank_batch_size(global_batch: int, world: int) -> int:
    """Minibatch per rank for a global batch defined independently of the worker count (DDP averages the
    ranks' gradients, so the step equals one on the global batch at the same learning rate)."""
    per_rank = global_batch // world
    if per_rank < 2:
        from scpermut_dist.errors import UsageError

        raise UsageError(f"train.batch_size={global_batch} is the global batch: with {world} workers each gets "
                         f"{per_rank} cell(s); raise train.batch_size to at least {2 * world}")
    if per_rank * world != global_batch:
        log.warning("train.batch_size=%d is not a multiple of %d workers: the global batch is %d",
                    global_batch, world, per_rank * world)
    return per_rank


class _StageData:
    """A stage's PairedCellDataset plus the plan's sampled class frequencies (for the focal alpha)."""

    def __init__(self, dataset, plan) -> None:
        self.dataset, self.sampled_class_freq = dataset, plan.sampled_class_freq

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return iter(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def _loader_factory(prep: PreparedReference, cfg: RunConfig, split: MemberSplit, member: int,
                    plans: Callable | None = None):
    """Each stage's data. `plans(member, stage, stage_index)` may hand over a plan built elsewhere (the Ray
    driver builds plans once and shares their arrays); otherwise the plan is built here from the codes."""
    from loaders.dataset import PairedCellDataset

    batch_size = per_rank_batch_size(cfg.train.batch_size, dist_rank_world()[1])

    def make(stage, index: int) -> _StageData:
        plan = plans(member, stage, index) if plans is not None else None
        if plan is None:
            plan = build_plan(prep, cfg, split.cells(stage.cells), stage, index)
        # The opened source, not the spec: in-process it avoids re-opening the file per stage, and an h5ad
        # source pickles as its spec should DataLoader workers be used.
        ds = PairedCellDataset(prep.source, plan, normalization=prep.normalization, batch_size=batch_size,
                               io_batch_cells=cfg.data.sampling.io_batch_cells, prefetch=cfg.data.sampling.prefetch,
                               drop_last=False, totals=prep.totals)
        return _StageData(ds, plan)

    return make


def build_plan(prep: PreparedReference, cfg: RunConfig, cells: np.ndarray, stage, index: int, chunks=None):
    """The sampling plan of one stage of one member (its seed from the member's seed and the stage index)."""
    from loaders.errors import DataError
    from loaders.sampling import SamplingPlan

    if len(cells) == 0:
        raise DataError(f"stage {stage.name}: no {stage.cells} training cells")
    return SamplingPlan(labels=prep.label_codes, batches=prep.batch_codes,
                        chunks=prep.source.chunk_ids() if chunks is None else chunks, cells=cells,
                        balance=cfg.data.sampling.balance, permute=stage.permutation,
                        seed=cfg.train.seed * 1000 + index, cells_per_epoch=stage.cells_per_epoch,
                        n_classes=len(prep.classes))

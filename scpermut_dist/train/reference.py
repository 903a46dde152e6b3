"""Build a reference: prepare the source once, split, train each ensemble member with the one `Trainer`.

An AnnData is just another source: training reads it through AnnDataSource -> SamplingPlan ->
PairedCellDataset -> PairedBatch, the same path as an h5ad file or a SOMA atlas.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from loaders.sharding import dist_rank_world
from scpermut_dist.config import RunConfig
from scpermut_dist.mapping.reference import Reference
from scpermut_dist.model.losses import LossWeights
from scpermut_dist.model.module import ScPermutModule
from scpermut_dist.train.preprocess import (
    PreparedReference,
    SourceFactory,
    prepare_reference,
)
from scpermut_dist.train.split import stratified_split
from scpermut_dist.train.trainer import Trainer, ValidationSet, validation_metrics

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


def train_reference(factory: SourceFactory, cfg: RunConfig, where: str, out_dir: str | Path | None = None,
                    quiet: bool = True, report: Callable[[dict], None] | None = None) -> Reference:
    """The one training entry point: prepare the reference, split, train the stages, (optionally) save."""
    t_start = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    prep = prepare_reference(factory, cfg.data, where, progress=not quiet)
    codes_qc = np.full_like(prep.label_codes, -1)
    codes_qc[prep.cells] = prep.label_codes[prep.cells]
    members, history, member_metrics, train_s = [], [], [], 0.0
    for k in range(cfg.model.ensemble_size):
        # Each member its own validation split, init, sampling and partners: bagging-like diversity (with one
        # shared split, three Kang members averaged no better than one).
        member_cfg = cfg.apply_overrides([f"train.seed={member_seed(cfg.train.seed, k)}"])
        train_lab, val = stratified_split(codes_qc, cfg.data.val_fraction, cfg.data.val_max_cells,
                                          member_cfg.train.seed)
        train_all = np.setdiff1d(prep.cells, val, assume_unique=True)
        validation = _read_validation(prep, val)
        if cfg.model.ensemble_size > 1 and not quiet:
            log.info("ensemble member %d of %d", k + 1, cfg.model.ensemble_size)
        trainer, seconds = _train_member(prep, member_cfg, train_all, train_lab, validation, quiet, report)
        members.append(trainer.module)
        history += [{**r, "member": k} for r in trainer.history] if cfg.model.ensemble_size > 1 else trainer.history
        train_s += seconds
        member_metrics.append({**(validation_metrics(trainer.module, validation) if len(validation) else {}),
                               "n_val_cells": int(len(val)), "seed": member_cfg.train.seed})
        if k == 0:
            n_train_all, n_train_lab = len(train_all), len(train_lab)
    # Each member is scored on its own held-out cells; the ensemble reports their mean.
    metrics = {key: float(np.mean([m[key] for m in member_metrics])) for key in member_metrics[0] if key != "seed"}
    metrics["n_val_cells"] = member_metrics[0]["n_val_cells"]
    cells = sum(r["cells"] for r in history)
    summary = {"train_seconds": round(train_s, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
               "cells_seen": int(cells), "cells_per_s": cells / train_s if train_s > 0 else float("nan"),
               "n_train_cells": int(n_train_all), "n_train_labelled": int(n_train_lab),
               "stages": [s.name for s in trainer.stages], "ensemble_size": len(members), **metrics,
               **({"members": member_metrics} if len(members) > 1 else {})}
    ref = Reference(members[0], cfg, prep.genes[["feature_id", "feature_name"]].reset_index(drop=True), prep.classes,
                    prep.batches, prep.normalization, prep.description, metrics, summary, history,
                    extra_members=members[1:])
    prep.source.close()
    if out_dir is not None and dist_rank_world()[0] == 0:
        ref.save(out_dir)
    return ref


def member_seed(seed: int, k: int) -> int:
    """Member 0 is the single model of `seed`; the others draw from seeds no other run's member 0 uses."""
    return seed if k == 0 else seed + 1_000_003 * k


def _train_member(prep: PreparedReference, cfg: RunConfig, train_all: np.ndarray, train_lab: np.ndarray,
                  validation: ValidationSet, quiet: bool, report) -> tuple[Trainer, float]:
    torch.manual_seed(cfg.train.seed)
    module = ScPermutModule.from_config(cfg.model, len(prep.genes), len(prep.classes), len(prep.batches))
    trainer = Trainer(module, cfg.resolved_stages(), _loader_factory(prep, cfg, train_all, train_lab),
                      LossWeights.from_config(cfg.loss), lr=cfg.train.lr, seed=cfg.train.seed, validation=validation,
                      focal_alpha=cfg.loss.focal_alpha, device=cfg.train.device, quiet=quiet, report=report,
                      dann_lr_mult=cfg.train.dann_lr_mult)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    module.cpu().eval()
    return trainer, seconds


def _read_validation(prep: PreparedReference, val: np.ndarray) -> ValidationSet:
    """The fixed validation sample, read and normalised once (bounded by data.val_max_cells)."""
    if len(val) == 0:
        return ValidationSet(torch.zeros(0, len(prep.genes)), torch.zeros(0, dtype=torch.long))
    x = prep.normalization.apply_dense(prep.source.read_counts(val))
    return ValidationSet(torch.from_numpy(x), torch.from_numpy(prep.label_codes[val]).long())


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


def _loader_factory(prep: PreparedReference, cfg: RunConfig, train_all: np.ndarray, train_lab: np.ndarray):
    from loaders.dataset import PairedCellDataset
    from loaders.sampling import SamplingPlan

    chunks = prep.source.chunk_ids()

    def make(stage, index: int) -> _StageData:
        cells = train_all if stage.cells == "all" else train_lab
        if len(cells) == 0:
            from loaders.errors import DataError

            raise DataError(f"stage {stage.name}: no {stage.cells} training cells")
        plan = SamplingPlan(labels=prep.label_codes, batches=prep.batch_codes, chunks=chunks, cells=cells,
                            balance=cfg.data.sampling.balance, permute=stage.permutation,
                            seed=cfg.train.seed * 1000 + index, cells_per_epoch=stage.cells_per_epoch,
                            n_classes=len(prep.classes))
        # The opened source, not the spec: in-process it avoids re-opening the file per stage, and an h5ad
        # source pickles as its spec should DataLoader workers be used.
        ds = PairedCellDataset(prep.source, plan, normalization=prep.normalization, batch_size=cfg.train.batch_size,
                               io_batch_cells=cfg.data.sampling.io_batch_cells, prefetch=cfg.data.sampling.prefetch,
                               drop_last=False)
        return _StageData(ds, plan)

    return make

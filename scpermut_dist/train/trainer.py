"""One training loop for one process and for N DDP ranks: stages, fresh optimisers, early stopping.

The loop consumes, per stage, an iterable of `PairedBatch` (built by a `make_loader` callback from the
`loaders` data path) so it knows nothing about sources. Under DDP (torch.distributed initialised,
e.g. by Ray Train) the module is wrapped per stage, because each stage trains a different parameter set.
Its resumable state (stage, epoch, weights, optimiser, loader) is exposed by `state_dict()`.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from loaders.batch import PairedBatch
from loaders.sharding import dist_rank_world
from scpermut_dist.mapping.predict import predict_proba
from scpermut_dist.model.losses import LossWeights, balanced_alpha, total_loss
from scpermut_dist.model.module import ScPermutModule
from scpermut_dist.model.schedule import Stage

log = logging.getLogger(__name__)


class StageLoader(Protocol):
    """What a stage iterates: PairedBatches, re-drawn by `set_epoch`, with the class freqs as sampled."""

    sampled_class_freq: np.ndarray | None

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterable[PairedBatch]: ...


@dataclass
class ValidationSet:
    """A fixed held-out sample of labelled cells, normalised once and kept in memory."""

    x_ng: torch.Tensor
    label_n: torch.Tensor

    def __len__(self) -> int:
        return int(self.label_n.shape[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validation_metrics(module: ScPermutModule | Sequence[ScPermutModule], val: ValidationSet) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    _, proba = predict_proba(module, val.x_ng)
    y, pred = val.label_n.numpy(), proba.argmax(axis=1)
    nll = -np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))
    # Class-balanced NLL: the same weighting as balanced accuracy, and it keeps improving after accuracy saturates.
    balanced_nll = float(np.mean([nll[y == c].mean() for c in np.unique(y)]))
    return {"val_balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "val_accuracy": float(accuracy_score(y, pred)), "val_balanced_nll": balanced_nll}


class Trainer:
    """Runs `stages` in order on `module`; `make_loader(stage, stage_index)` gives each stage's batches."""

    def __init__(self, module: ScPermutModule, stages: list[Stage], make_loader: Callable[[Stage, int], Any],
                 weights: LossWeights, lr: float = 9.9e-4, seed: int = 0, validation: ValidationSet | None = None,
                 focal_alpha: str = "balanced", device: str | torch.device = "cpu", quiet: bool = True,
                 report: Callable[[dict], None] | None = None, dann_lr_mult: float = 1.0) -> None:
        self.module, self.make_loader, self.weights = module, make_loader, weights
        self.lr, self.seed, self.validation, self.focal_alpha = lr, seed, validation, focal_alpha
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.quiet, self.report, self.dann_lr_mult = quiet, report, float(dann_lr_mult)
        self.rank, self.world_size = dist_rank_world()
        single_batch = module.dims["n_batches"] < 2
        self.stages = [s for s in ((x.without_dann() if single_batch else x) for x in stages) if s is not None]
        self.history: list[dict] = []
        self._pos = {"stage_index": 0, "epoch": 0, "cells_seen": 0}
        self._stage_state: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._loader: Any = None
        self._best_state: dict | None = None
        self._resume: dict | None = None
        self.module.to(self.device)

    # ----- resumable state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume at the current epoch boundary (tensors are live references)."""
        return {"position": dict(self._pos), "model": self.module.state_dict(),
                "optimizer": self._optimizer.state_dict() if self._optimizer else None,
                "loader": self._loader.state_dict() if hasattr(self._loader, "state_dict") else None,
                "stage_state": dict(self._stage_state), "best_state": self._best_state, "history": list(self.history),
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self._pos = dict(state["position"])
        self.module.load_state_dict(state["model"])
        self._stage_state = dict(state.get("stage_state") or {})
        self.history = list(state.get("history") or [])
        self._resume = state
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])

    # ----- training --------------------------------------------------------------------------------------
    def fit(self, on_epoch_end: Callable[["Trainer"], None] | None = None) -> list[dict]:
        resume = self._resume
        for index in range(self._pos["stage_index"], len(self.stages)):
            stage = self.stages[index]
            resuming = resume is not None and index == self._pos["stage_index"] and self._pos["epoch"] > 0
            if not resuming:
                self._pos.update(stage_index=index, epoch=0, cells_seen=0)
                self._stage_state = {"best_metric": None, "best_epoch": None, "bad_epochs": 0, "done": False}
                self._best_state = None
                torch.manual_seed(self.seed * 1000 + index)
            self._run_stage(stage, resume if resuming else None, on_epoch_end)
            resume = self._resume = None
        self._pos.update(stage_index=len(self.stages), epoch=0)
        return self.history

    def _run_stage(self, stage: Stage, resume: dict | None, on_epoch_end) -> None:
        params = self.module.set_trainable(stage.trains)
        net: nn.Module = self.module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Two time scales: under Adam the adversary's step does not shrink with dann_w, and at the encoder's lr it
        # falls behind; the encoder then "fools" it by moving batches around instead of mixing them (measured:
        # higher dann_w gave *less* mixing). A faster discriminator restores the intended game.
        dann_ids = {id(p) for p in self.module.dann.parameters()}
        groups = [{"params": [p for p in params if id(p) not in dann_ids], "lr": self.lr},
                  {"params": [p for p in params if id(p) in dann_ids], "lr": self.lr * self.dann_lr_mult}]
        self._optimizer = torch.optim.Adam([g for g in groups if g["params"]])  # fresh per stage, trainable only
        self._loader = self.make_loader(stage, self._pos["stage_index"])
        if resume is not None:
            self._optimizer.load_state_dict(resume["optimizer"])
            if resume.get("loader") is not None and hasattr(self._loader, "load_state_dict"):
                self._loader.load_state_dict(resume["loader"])
            self._best_state = resume.get("best_state")
        alpha = None
        freq = getattr(self._loader, "sampled_class_freq", None)
        if "clas" in stage.losses and self.weights.classifier == "focal" and self.focal_alpha == "balanced" \
                and freq is not None:
            alpha = balanced_alpha(freq).to(self.device)
        validate = "clas" in stage.losses and self.validation is not None and len(self.validation) > 0
        if stage.early_stopping and not validate:
            log.warning("stage %s: no labelled validation cells, early stopping is off", stage.name)
        st = self._stage_state
        for epoch in range(self._pos["epoch"], stage.epochs):
            if st.get("done"):
                break
            record = self._run_epoch(net, stage, epoch, alpha)
            self._pos["cells_seen"] += record["cells"]
            if validate:
                record.update(validation_metrics(self.module, self.validation))
                self._early_stopping_update(stage, epoch, record["val_balanced_accuracy"], record["val_balanced_nll"])
            self._pos["epoch"] = epoch + 1
            self.history.append(record)
            self._emit(record)
            early = bool(stage.early_stopping and validate and st["bad_epochs"] >= stage.early_stopping)
            enough = stage.max_cells_seen is not None and self._pos["cells_seen"] >= stage.max_cells_seen
            st["done"] = early or enough or epoch + 1 == stage.epochs
            if early:
                log.info("stage %s: early stop after epoch %d (best %d)", stage.name, epoch + 1, st["best_epoch"] + 1)
            if on_epoch_end is not None:
                on_epoch_end(self)  # the state it sees resumes exactly after this epoch
        if self._best_state is not None:
            self.module.load_state_dict(self._best_state)  # restore best weights of this stage
            self._best_state = None
        self.module.set_trainable([])  # leave everything in eval mode between stages

    def _early_stopping_update(self, stage: Stage, epoch: int, metric: float, loss: float) -> None:
        """Best = highest validation balanced accuracy, ties broken by lower balanced NLL: on easy data accuracy
        saturates within a few epochs, and a strict `>` on it alone would restore a barely-trained model."""
        st = self._stage_state
        best, best_loss = st["best_metric"], st.get("best_loss", float("inf"))
        if best is None or metric > best + 1e-9 or (abs(metric - best) <= 1e-9 and loss < best_loss):
            st.update(best_metric=metric, best_loss=loss, best_epoch=epoch, bad_epochs=0)
            if stage.early_stopping:
                self._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.module.state_dict().items()})
        else:
            st["bad_epochs"] += 1

    def _run_epoch(self, net: nn.Module, stage: Stage, epoch: int, alpha: torch.Tensor | None) -> dict:
        self._loader.set_epoch(epoch)
        batches: Iterable[PairedBatch] = self._loader
        if not self.quiet and self.rank == 0:
            from tqdm.auto import tqdm

            total = len(self._loader) if hasattr(self._loader, "__len__") else None
            batches = tqdm(batches, total=total, leave=False, unit="batch",
                           desc=f"{stage.name} {epoch + 1}/{stage.epochs}")
        sums: dict[str, torch.Tensor] = {}
        n_cells, n_steps, t0 = 0, 0, time.perf_counter()
        for batch in batches:
            if len(batch) < 2:  # BatchNorm cannot train on one cell
                continue
            batch = batch.to(self.device, non_blocking=True)
            out = net(batch.x_ng, heads=stage.used_modules[1:])
            loss, parts = total_loss(out, batch.x_partner_ng, batch.label_n, batch.batch_n, stage.losses,
                                     self.weights, alpha)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n_cells += len(batch)
            n_steps += 1
        if self.world_size > 1:
            self._sync_buffers()
        elapsed = time.perf_counter() - t0
        cells = n_cells * self.world_size  # every rank runs the same number of steps
        record = {"stage": stage.name, "epoch": epoch + 1, "steps": n_steps, "cells": cells,
                  "seconds": round(elapsed, 4), "cells_per_s": cells / elapsed if elapsed > 0 else float("nan")}
        record.update({f"loss_{k}": float(v) / max(n_steps, 1) for k, v in sums.items()})
        return record

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Average BatchNorm running statistics over ranks: DDP only broadcasts them before each forward, so
        after an epoch every rank holds its own; validation and early stopping must see the same model."""
        for buf in self.module.buffers():
            if buf.is_floating_point():
                torch.distributed.all_reduce(buf)
                buf /= self.world_size
            else:
                torch.distributed.broadcast(buf, 0)

    def _emit(self, record: dict) -> None:
        if self.rank != 0:
            return
        if self.report is not None:
            self.report(record)
        else:
            log.info(format_record(record))


def format_record(r: dict) -> str:
    losses = " ".join(f"{k[5:]}={v:.4g}" for k, v in r.items() if k.startswith("loss_"))
    val = "".join(f" {k}={r[k]:.4f}" for k in ("val_balanced_accuracy", "val_accuracy") if k in r)
    return f"{r['stage']} epoch {r['epoch']}: {r['cells_per_s']:.0f} cells/s {losses}{val}"

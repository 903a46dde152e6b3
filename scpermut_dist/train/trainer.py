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
MONITORS = ("balanced_accuracy", "balanced_nll")  # what early stopping keeps the best of (see _early_stopping_update)


def uses_bf16(precision: str, device_type: str) -> bool:
    """bf16 autocast on GPU (no loss scaling needed, unlike fp16); CPU stays fp32 (bitwise reproducible)."""
    return device_type == "cuda" and precision in ("auto", "bf16")


def note_precision(precision: str, device_type: str) -> None:
    """Where a run starts (once, not per member or worker): say that a bf16 request will not be honoured."""
    if precision == "bf16" and not uses_bf16(precision, device_type):
        log.warning("train.precision=bf16 applies on a CUDA GPU; training on %s stays in fp32", device_type)


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
    """train.device as a torch device, checked where training runs (a Ray GPU worker resolves its own, so a
    driver without CUDA is fine): a CUDA device this machine lacks is a UsageError, not torch's AssertionError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        from scpermut_dist.errors import UsageError

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"train.device={name}: no CUDA device is available on this machine ({build}); "
                             "use --set train.device=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise UsageError(f"train.device={name}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}; pick one of them, or cuda")
    return device


def validation_metrics(module: ScPermutModule | Sequence[ScPermutModule], val: ValidationSet,
                       n_classes: int | None = None) -> dict[str, float]:
    """Balanced accuracy, accuracy, macro F1 and class-balanced NLL of the validation sample.

    Under DDP each rank holds a shard of the sample: the confusion matrix and per-class NLL sums are
    summed over ranks, so every rank gets the same numbers (and takes the same decisions on them).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    n_classes = n_classes or _n_classes(module)
    _, proba = predict_proba(module, val.x_ng)
    y, pred = val.label_n.numpy(), proba.argmax(axis=1)
    nll = -np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))
    counts = np.zeros((n_classes, n_classes + 1), dtype=np.float64)  # confusion matrix | per-class NLL sum
    np.add.at(counts, (y, pred), 1.0)
    np.add.at(counts[:, n_classes], y, nll)
    rank, world = dist_rank_world()
    if world > 1:
        t = torch.from_numpy(counts).to(collective_device())
        torch.distributed.all_reduce(t)
        counts = t.cpu().numpy()
    confusion, nll_sum = counts[:, :n_classes], counts[:, n_classes]
    truth, guess = np.nonzero(confusion)
    weight = confusion[truth, guess]  # sklearn on the (reduced) confusion matrix, one weighted pair per cell
    per_class = confusion.sum(axis=1)
    present = per_class > 0
    # Class-balanced NLL: the same weighting as balanced accuracy, and it keeps improving after accuracy saturates.
    return {"val_balanced_accuracy": float(balanced_accuracy_score(truth, guess, sample_weight=weight)),
            "val_accuracy": float(accuracy_score(truth, guess, sample_weight=weight)),
            "val_macro_f1": float(f1_score(truth, guess, sample_weight=weight, average="macro",
                                           labels=np.flatnonzero(present))),
            "val_balanced_nll": float(np.mean(nll_sum[present] / per_class[present])),
            "val_cells": int(per_class.sum())}


def _n_classes(module: ScPermutModule | Sequence[ScPermutModule]) -> int:
    first = module if isinstance(module, ScPermutModule) else module[0]
    return int(first.dims["n_classes"])


def collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flag: bool) -> bool:
    """Rank 0's decision on every rank: a branch taken on one rank only would hang the others' collectives."""
    if dist_rank_world()[1] == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


class Trainer:
    """Runs `stages` in order on `module`; `make_loader(stage, stage_index)` gives each stage's batches.

    `on_step(trainer)` is called every `every_steps` optimiser steps and `on_epoch_end(trainer)` after each
    epoch; the state either sees (`state_dict()`) resumes exactly there, mid-epoch included.
    """

    def __init__(self, module: ScPermutModule, stages: list[Stage], make_loader: Callable[[Stage, int], Any],
                 weights: LossWeights, lr: float = 9.9e-4, seed: int = 0, validation: ValidationSet | None = None,
                 focal_alpha: str = "balanced", device: str | torch.device = "cpu", quiet: bool = True,
                 report: Callable[[dict], None] | None = None, dann_lr_mult: float = 1.0,
                 precision: str = "auto", monitor: str = "balanced_accuracy",
                 focal_alpha_max: float | None = None, tolerance: float = 0.0) -> None:
        self.module, self.make_loader, self.weights = module, make_loader, weights
        self.lr, self.seed, self.validation, self.focal_alpha = lr, seed, validation, focal_alpha
        self.focal_alpha_max = focal_alpha_max
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.quiet, self.report, self.dann_lr_mult = quiet, report, float(dann_lr_mult)
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
        self.monitor = monitor
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self.autocast = uses_bf16(precision, self.device.type)
        self.rank, self.world_size = dist_rank_world()
        single_batch = module.dims["n_batches"] < 2
        self.stages = [s for s in ((x.without_dann() if single_batch else x) for x in stages) if s is not None]
        self.history: list[dict] = []
        self._pos = {"stage_index": 0, "epoch": 0, "cells_seen": 0, "step": 0}
        self._epoch_acc: dict = _empty_acc()
        self._stage_state: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._loader: Any = None
        self._best_state: dict | None = None
        self._resume: dict | None = None
        self.module.to(self.device)

    @property
    def step(self) -> int:
        """Optimiser steps taken in this run, over all stages (the same on every rank)."""
        return int(self._pos["step"])

    @property
    def stage(self) -> Stage | None:
        i = self._pos["stage_index"]
        return self.stages[i] if i < len(self.stages) else None

    @property
    def epoch(self) -> int:
        return int(self._pos["epoch"])

    @property
    def stage_done(self) -> bool:
        """The current stage has run its last epoch (or stopped early)."""
        return bool(self._stage_state.get("done"))

    # ----- resumable state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume at this point, mid-epoch included (tensors are live references)."""
        return {"position": dict(self._pos), "epoch_acc": _acc_to_floats(self._epoch_acc),
                "model": self.module.state_dict(),
                "optimizer": self._optimizer.state_dict() if self._optimizer else None,
                "loader": self._loader.state_dict() if hasattr(self._loader, "state_dict") else None,
                "stage_state": dict(self._stage_state), "best_state": self._best_state, "history": list(self.history),
                "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self._pos = {"step": 0, **state["position"]}
        self.module.load_state_dict(state["model"])
        self._stage_state = dict(state.get("stage_state") or {})
        self.history = list(state.get("history") or [])
        self._epoch_acc = {**_empty_acc(), **(state.get("epoch_acc") or {})}
        self._resume = state
        set_rng_state(state.get("rng") or {"torch": state.get("torch_rng")})

    # ----- training --------------------------------------------------------------------------------------
    def fit(self, on_epoch_end: Callable[["Trainer"], None] | None = None,
            on_step: Callable[["Trainer"], None] | None = None, every_steps: int | None = None) -> list[dict]:
        resume = self._resume
        hooks = (on_epoch_end, on_step, every_steps)
        for index in range(self._pos["stage_index"], len(self.stages)):
            stage = self.stages[index]
            resuming = resume is not None and index == self._pos["stage_index"] and \
                (self._pos["epoch"] > 0 or self._epoch_acc["consumed"] > 0)
            if not resuming:
                self._pos.update(stage_index=index, epoch=0, cells_seen=0)
                self._epoch_acc = _empty_acc()
                self._stage_state = {"best_metric": None, "best_epoch": None, "bad_epochs": 0, "done": False}
                self._best_state = None
                torch.manual_seed(self.seed * 1000 + index)
            self._run_stage(stage, resume if resuming else None, hooks)
            resume = self._resume = None
        self._pos.update(stage_index=len(self.stages), epoch=0)
        return self.history

    def _run_stage(self, stage: Stage, resume: dict | None, hooks) -> None:
        on_epoch_end = hooks[0]
        params = self.module.set_trainable(stage.trains)
        net: nn.Module = self.module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Wrapped per stage, after freezing: DDP then reduces exactly this stage's trainable parameters,
            # and the heads a stage does not run are not in its graph, so no rank waits for their gradients.
            net = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Two time scales: under Adam the adversary's step does not shrink with dann_w, and at the encoder's lr it
        # falls behind; the encoder then "fools" it by moving batches around instead of mixing them (measured:
        # higher dann_w gave *less* mixing). A faster discriminator restores the intended game.
        dann_ids = {id(p) for p in self.module.dann.parameters()}
        groups = [{"params": [p for p in params if id(p) not in dann_ids], "lr": self.lr},
                  {"params": [p for p in params if id(p) in dann_ids], "lr": self.lr * self.dann_lr_mult}]
        # foreach: the multi-tensor update, bit for bit the per-tensor loop torch picks on a CPU and half its time
        # there (the default on CUDA already).
        self._optimizer = torch.optim.Adam([g for g in groups if g["params"]], foreach=True)  # fresh per stage
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
            alpha = balanced_alpha(freq, self.focal_alpha_max).to(self.device)
        validate = "clas" in stage.losses and self.validation is not None and len(self.validation) > 0
        validate = agree(validate)  # a rank with an empty validation shard still joins the reduction
        if stage.early_stopping and not validate:
            log.warning("stage %s: no labelled validation cells, early stopping is off", stage.name)
        st = self._stage_state
        for epoch in range(self._pos["epoch"], stage.epochs):
            if st.get("done"):
                break
            record = self._run_epoch(net, stage, epoch, alpha, hooks)
            self._pos["cells_seen"] += record["cells"]
            if validate:
                record.update(validation_metrics(self.module, self.validation))
                acc, nll = record["val_balanced_accuracy"], record["val_balanced_nll"]
                metric, tie_loss = (-nll, -acc) if self.monitor == "balanced_nll" else (acc, nll)
                self._early_stopping_update(stage, epoch, metric, tie_loss)
            self._pos["epoch"] = epoch + 1
            self._epoch_acc = _empty_acc()
            self.history.append(record)
            self._emit(record)
            early = bool(stage.early_stopping and validate and st["bad_epochs"] >= stage.early_stopping)
            enough = stage.max_cells_seen is not None and self._pos["cells_seen"] >= stage.max_cells_seen
            st["done"] = agree(early or enough or epoch + 1 == stage.epochs)
            if early:
                log.info("stage %s: early stop after epoch %d (best %d)", stage.name, epoch + 1, st["best_epoch"] + 1)
            if on_epoch_end is not None:
                on_epoch_end(self)  # the state it sees resumes exactly after this epoch
        if self._best_state is not None:
            self.module.load_state_dict(self._best_state)  # restore best weights of this stage
            self._best_state = None
        self.module.set_trainable([])  # leave everything in eval mode between stages

    def _early_stopping_update(self, stage: Stage, epoch: int, metric: float, loss: float) -> None:
        """Best = the lowest balanced NLL among epochs whose monitored metric is within `tolerance` of the stage's
        peak (tolerance 0: the highest balanced accuracy, ties broken by lower NLL). On easy data accuracy
        saturates within a few epochs, and a strict `>` on it alone would restore a barely-trained model; on a
        few hundred validation cells one cell moves balanced accuracy by ~0.005, so a tolerance lets a later,
        better-fitting epoch win over an early peak that is only noise."""
        st = self._stage_state
        best, best_loss = st["best_metric"], st.get("best_loss", float("inf"))
        peak = st.get("peak", best)
        new_peak = peak is None or metric > peak + 1e-9
        floor = (metric if new_peak else peak) - self.tolerance - 1e-9
        # Within the band below the peak the lower loss wins; a new peak also wins once the kept best falls out of it.
        better = best is None or (metric >= floor and loss < best_loss) or (new_peak and best < floor)
        if agree(new_peak):
            st["peak"] = metric
        if agree(better):
            st.update(best_metric=metric, best_loss=loss, best_epoch=epoch, bad_epochs=0)
            if stage.early_stopping:
                self._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.module.state_dict().items()})
        elif agree(new_peak):
            st["bad_epochs"] = 0  # still improving: patience counts from the peak too
        else:
            st["bad_epochs"] += 1

    def _run_epoch(self, net: nn.Module, stage: Stage, epoch: int, alpha: torch.Tensor | None, hooks) -> dict:
        _, on_step, every_steps = hooks
        self._loader.set_epoch(epoch)  # keeps a resumed mid-epoch position
        batches: Iterable[PairedBatch] = self._loader
        acc = self._epoch_acc
        total = len(self._loader) if hasattr(self._loader, "__len__") else None
        if not self.quiet and self.rank == 0:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=total, initial=acc["n_steps"], leave=False, unit="batch",
                           desc=f"{stage.name} {epoch + 1}/{stage.epochs}")
        sums: dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float64, device=self.device)
                                         for k, v in acc["sums"].items()}
        acc["sums"] = sums
        t0 = time.perf_counter() - acc["seconds"]
        for batch in batches:
            acc["consumed"] += 1
            if len(batch) >= 2:  # BatchNorm cannot train on one cell (a short last batch is the same on every rank)
                self._train_step(net, stage, batch.to(self.device, non_blocking=True), alpha, sums)
                acc["n_cells"] += len(batch)
                acc["n_steps"] += 1
                self._pos["step"] += 1
            acc["seconds"] = time.perf_counter() - t0
            # Not on the epoch's last batch: its state would read "next epoch" before the epoch is closed, and
            # the epoch-end hook follows at once anyway.
            if on_step is not None and every_steps and self._pos["step"] % every_steps == 0 and len(batch) >= 2 \
                    and (total is None or acc["consumed"] < total):
                on_step(self)
        if self.world_size > 1:
            self._sync_buffers()
        elapsed = time.perf_counter() - t0
        cells = acc["n_cells"] * self.world_size  # every rank runs the same number of steps
        n_steps = acc["n_steps"]
        record = {"stage": stage.name, "epoch": epoch + 1, "step": self.step, "steps": n_steps, "cells": cells,
                  "seconds": round(elapsed, 4), "cells_per_s": cells / elapsed if elapsed > 0 else float("nan"),
                  "world_size": self.world_size}
        record.update({f"loss_{k}": float(v) / max(n_steps, 1) for k, v in sums.items()})
        return record

    def _train_step(self, net: nn.Module, stage: Stage, batch: PairedBatch, alpha, sums: dict) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = net(batch.x_ng, heads=stage.used_modules[1:])
            loss, parts = total_loss(out, batch.x_partner_ng, batch.label_n, batch.batch_n, stage.losses,
                                     self.weights, alpha)
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()
        for k, v in parts.items():
            v = v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)
            sums[k] = sums[k] + v.to(self.device) if k in sums else v.to(self.device)

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
    member = f"member {r['member']} " if "member" in r else ""
    return f"{member}{r['stage']} epoch {r['epoch']}: {r['cells_per_s']:.0f} cells/s {losses}{val}"


def _empty_acc() -> dict:
    """A running epoch: loss sums, cells, steps and seconds so far (checkpointed, so a resume continues it)."""
    return {"sums": {}, "n_cells": 0, "n_steps": 0, "consumed": 0, "seconds": 0.0}


def _acc_to_floats(acc: dict) -> dict:
    return {**acc, "sums": {k: float(v) for k, v in acc["sums"].items()}}


def rng_state() -> dict:
    """This process's torch RNG streams (dropout masks): CPU, and every CUDA device when there is one."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

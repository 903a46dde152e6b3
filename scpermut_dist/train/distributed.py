"""The driver of a Ray Train run: prepare once, share the per-cell arrays, run `TorchTrainer`, collect the model.

Assumes Ray is initialised (see `launch.ray_session`). Bad input fails here, before any worker starts:
preparation opens the source, checks the label column and the filter, QCs and picks genes on the driver.
The run folder holds `prepared/` (reused by restarts and re-runs), `settings.json` (a re-run must ask for the same
training), `metrics.jsonl`, `workers/`, the Ray storage (`ray/<name>/checkpoint_*`, unless `storage_path` points
elsewhere) and, at the end, `model/`.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from scpermut_dist.config import RunConfig
from scpermut_dist.errors import UsageError
from scpermut_dist.json_report import write_json
from scpermut_dist.train.prepared import (
    PreparedArrays,
    fingerprint,
    load_prepared,
    save_prepared,
)
from scpermut_dist.train.preprocess import prepare_reference, selection_from_config
from scpermut_dist.train.ray_worker import MODEL_DIR, WorkerJob, train_loop_per_worker
from scpermut_dist.train.reference import build_plan, member_splits
from scpermut_dist.train.trainer import note_precision

log = logging.getLogger(__name__)
RUN_NAME = "scpermut"
SETTINGS = "settings.json"
# How a run executes, not what it trains: a re-run may change these (resume on GPUs, other thread counts).
RUN_ONLY_KEYS = {"data": {"source"}, "train": {"num_threads", "parallel_members", "checkpoint_every_steps", "device",
                                               "precision"}}


@dataclass
class Scaling:
    workers: int = 2
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_failures: int = 2

    def check(self) -> None:
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: need at least 1 worker")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0 or self.max_failures < 0:
            raise UsageError("--gpus-per-worker must be >= 0, --cpus-per-worker > 0 and --max-failures >= 0")


def prepare_run(uri: str, factory: Callable, cfg: RunConfig, run_dir: Path, quiet: bool = True) -> PreparedArrays:
    """The run's preparation: loaded from RUN_DIR/prepared when this run made it already, else computed once."""
    fp = fingerprint(uri, cfg.data)
    stored = load_prepared(run_dir / "prepared", fp)
    if stored is not None:
        log.info("reusing the preparation in %s", run_dir / "prepared")
        return stored
    prep = prepare_reference(factory, cfg.data, where=uri, progress=not quiet)
    try:
        arrays = PreparedArrays.from_prepared(prep, fp)
    finally:
        prep.source.close()
    save_prepared(arrays, run_dir / "prepared")
    return arrays


def _settings(cfg: RunConfig) -> dict:
    dump = cfg.model_dump(mode="json")
    for section, keys in RUN_ONLY_KEYS.items():
        for key in keys:
            dump[section].pop(key, None)
    return dump


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_same_settings(run_dir: Path, cfg: RunConfig) -> None:
    """A re-run resumes (or returns) what the folder's checkpoints trained: refuse other training settings, rather
    than hand back the old model under a config.yaml that says otherwise."""
    path = run_dir / SETTINGS
    if not path.is_file():
        return
    changed = _differences(json.loads(path.read_text()), _settings(cfg))
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise UsageError(f"{run_dir} holds a run with other training settings ({shown}); re-run with its settings "
                         "to resume it, or use a new --out folder for these")


def record_settings(run_dir: Path, cfg: RunConfig) -> None:
    if not (run_dir / SETTINGS).is_file():
        write_json(run_dir / SETTINGS, _settings(cfg))


def run_on_ray(uri: str, factory: Callable, cfg: RunConfig, run_dir: str | Path, scaling: Scaling,
               storage_path: str | None = None, quiet: bool = True, arrays: PreparedArrays | None = None) -> dict:
    """Train on `scaling.workers` Ray Train workers; returns the final metrics and the model path.
    `arrays`: the run's preparation when the caller already has it (else `prepare_run`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling.check()
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    check_same_settings(run_dir, cfg)
    arrays = arrays if arrays is not None else prepare_run(uri, factory, cfg, run_dir, quiet)
    record_settings(run_dir, cfg)  # after preparation: a run that failed on its input may be re-run corrected
    spec = factory(replace(selection_from_config(cfg.data), genes=tuple(arrays.genes["feature_id"].astype(str))))
    splits = member_splits(arrays, cfg)
    codes = {"label_codes": arrays.label_codes, "batch_codes": arrays.batch_codes, "cells": arrays.cells,
             "chunks": arrays.chunks, "joinids": arrays.joinids, "totals": arrays.totals}
    job = WorkerJob(config=cfg.model_dump(mode="json"), spec=spec, meta=arrays.meta(), codes_ref=ray.put(codes),
                    splits_ref=ray.put(splits), plan_refs=_shared_plans(arrays, cfg, splits), run_dir=str(run_dir),
                    use_gpu=scaling.gpus_per_worker > 0)
    note_precision(cfg.train.precision, "cuda" if job.use_gpu else "cpu")
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if job.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.workers, use_gpu=job.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path or str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3)))
    try:
        result = trainer.fit()
    except Exception as exc:
        if _is_corrupt_run_state(exc):
            ray_dir = Path(storage_path or run_dir / "ray") / RUN_NAME
            raise UsageError(f"{run_dir}: its saved Ray run cannot be resumed (a checkpoint it refers to is missing or "
                             f"unreadable); delete {ray_dir} to train again from the start (prepared/ is kept), or use "
                             f"a new --out folder") from exc
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"the run ended without a checkpoint: {result.error}")
    model = _collect_model(result.checkpoint, run_dir / MODEL_DIR)
    _finalize_on_driver(model, job, codes, cfg, splits)
    return {**(result.metrics or {}), "model": str(model), "wall_seconds": round(time.perf_counter() - t0, 3),
            "n_cells": int(len(arrays.cells)), "n_train_cells": int(len(splits[0].train_all)),
            "n_val_cells": int(len(splits[0].val)), "n_genes": int(len(arrays.genes)),
            "n_classes": len(arrays.classes), "n_batches": len(arrays.batches)}


def _is_corrupt_run_state(exc: BaseException | None) -> bool:
    """Ray Train's snapshot of this run names checkpoints that are gone (or is unreadable), or the latest
    checkpoint's own state is (ray_worker.UnreadableTrainState): resuming cannot work. Matched by class name
    along the cause chains of the error, of each worker's failure and of the controller's, or in their text
    (the classes sit in a private module of Ray Train V2, or come back wrapped)."""
    names = ("CheckpointManagerInitializationError", "UnreadableTrainState")
    todo, seen = [exc], 0
    while todo and seen < 50:
        e = todo.pop()
        if e is None:
            continue
        seen += 1
        if any(name in type(e).__name__ or name in str(e) for name in names):
            return True
        todo += [e.__cause__ or e.__context__, getattr(e, "controller_failure", None),
                 *getattr(e, "worker_failures", {}).values()]
    return False


def _shared_plans(arrays: PreparedArrays, cfg: RunConfig, splits) -> dict:
    """Each member's sampling plans, built once here, their arrays put in the object store (one per distinct
    cell set and pairing; the stage seed is applied in the worker). Codes travel separately, once."""
    import ray

    refs: dict = {}
    for k, split in enumerate(splits):
        member_cfg = cfg.apply_overrides([f"train.seed={split.seed}"])
        for index, stage in enumerate(cfg.resolved_stages()):
            key = (k, stage.cells, bool(stage.permutation))
            if key in refs:
                continue
            plan = build_plan(arrays, member_cfg, split.cells(stage.cells), stage, index, chunks=arrays.chunks)
            own = {n: a for n, a in plan.to_arrays(cfg.data.sampling.io_batch_cells).items()
                   if n not in ("labels", "batches", "chunks")}
            refs[key] = ray.put(own)
    return refs


def _finalize_on_driver(model: Path, job: WorkerJob, codes: dict, cfg: RunConfig, splits) -> None:
    """Calibration, reference neighbours and the unknown rule (train.finalize), fitted here with a source
    opened as the workers open theirs; the model folder is then re-saved atomically."""
    from scpermut_dist.mapping.reference import load_reference
    from scpermut_dist.train.finalize import finalize_reference
    from scpermut_dist.train.ray_worker import _prepared

    ref = load_reference(model)
    prep = _prepared(job, codes)
    try:
        finalize_reference(ref, prep, splits, cfg)
    finally:
        prep.source.close()
    ref.save(model)


def _collect_model(checkpoint, dst: Path) -> Path:
    """Copy the final checkpoint's model folder to RUN_DIR/model, swapped in as a checkpoint save is."""
    from scpermut_dist.mapping.checkpoint import swap_in

    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=dst.parent))
    try:
        checkpoint.to_directory(str(tmp / "ckpt"))
        src = tmp / "ckpt" / MODEL_DIR
        if not (src / "manifest.json").is_file():
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no {MODEL_DIR}/ folder")
        swap_in(src, dst)  # afterwards `src` holds the previous model, if any, removed with `tmp`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst

"""`scpermut train`: build a reference from an h5ad or a SOMA store of raw counts.

In-process by default; with `--workers N` (or `--address` / RAY_ADDRESS) on Ray Train DDP workers: a local
Ray started here (the embedded default) or an existing cluster. Both read the same `loaders` source; a SOMA
Experiment or Census-shaped collection (census_data/<organism>) is streamed, never loaded whole.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a reference model on an h5ad file or SOMA store of raw counts",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--h5ad", help="reference AnnData file with raw counts (or data.source in --config)")
    src.add_argument("--store", help="SOMA Experiment or Census-shaped collection (URI or directory)")
    p.add_argument("--organism", default=None, help="with a Census-shaped --store: e.g. 'Homo sapiens' (default)")
    p.add_argument("--obs-filter", default=None,
                   help="cells to train on, e.g. \"is_primary_data == True and tissue_general == 'lung'\"")
    p.add_argument("--label-key", default=None, help="obs column with cell types (or data.label_key in --config)")
    p.add_argument("--batch-key", default=None,
                   help="obs column(s) with the batch (e.g. donor, or 'donor+assay'); omit for a single batch")
    p.add_argument("--out", required=True,
                   help="in-process: the checkpoint folder; on Ray: the run folder (model at RUN_DIR/model)")
    p.add_argument("--config", default=None, help="YAML run configuration (sections data, model, loss, train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.clas_w=0.5 (repeatable)")
    p.add_argument("--unlabeled-value", default=None, help="label value meaning 'no label' (e.g. Unknown)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X for h5ad, 'raw' for SOMA; raw reads an h5ad's .raw)")
    ray = p.add_argument_group("Ray Train (distributed)")
    ray.add_argument("--workers", type=int, default=None, help="number of DDP workers (Ray Train)")
    ray.add_argument("--address", default=None, help="existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    ray.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (NCCL, bf16 autocast)")
    ray.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker")
    ray.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before the run fails")
    ray.add_argument("--storage-path", default=None,
                     help="Ray checkpoint storage (local path, s3://..., shared volume); default RUN_DIR/ray")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from scpermut_dist.config import RunConfig
    from scpermut_dist.errors import UsageError
    from scpermut_dist.train.reference import config_with_data_keys

    cfg = RunConfig.from_yaml(args.config, args.overrides)
    cfg = config_with_data_keys(cfg, args.label_key, args.batch_key, args.unlabeled_value, args.layer)
    if args.obs_filter is not None:
        cfg = cfg.apply_overrides([f"data.obs_value_filter={args.obs_filter}"])
    uri = args.h5ad or args.store or cfg.data.source
    if not uri:
        raise UsageError("no training data: pass --h5ad FILE or --store URI, or set data.source in --config")
    if not cfg.data.label_key:
        raise UsageError("no label column: pass --label-key (the obs column holding cell types) or set "
                         "data.label_key in --config")
    organism = args.organism or cfg.data.organism
    if organism is not None and (args.h5ad or str(uri).endswith(".h5ad")):
        raise UsageError("--organism applies to a Census-shaped --store only")
    distributed = args.workers is not None or args.address or os.environ.get("RAY_ADDRESS")
    if distributed:
        from launch.train import train_on_ray

        return train_on_ray(uri, cfg, args, organism)
    return _train_in_process(uri, cfg, args, organism)


def _train_in_process(uri: str, cfg, args: argparse.Namespace, organism: str | None) -> int:
    from pathlib import Path

    from loaders.sources import spec_from_uri
    from scpermut_dist.errors import UsageError
    from scpermut_dist.mapping.checkpoint import MANIFEST
    from scpermut_dist.train.reference import train_reference
    from scpermut_dist.train.trainer import format_record, resolve_device

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise UsageError(f"--out {out} exists and is not a scpermut checkpoint folder; choose another path")
    if (out / MANIFEST).exists() and not args.quiet:  # said before the minutes of training, not after
        print(f"note: {out} holds a checkpoint; this training replaces it when it ends (until then it stays as it is)",
              flush=True)
    resolve_device(cfg.train.device)  # training runs here: a CUDA device this machine lacks fails now, before loading
    options = {"layer": cfg.data.layer, "organism": organism}

    def report(r: dict) -> None:
        if not args.quiet:
            print(format_record(r), flush=True)

    ref = train_reference(lambda sel: spec_from_uri(uri, sel, **options), cfg, where=uri, out_dir=out,
                          quiet=args.quiet, report=report)
    s = ref.summary
    members = f", {s['ensemble_size']} ensemble members" if s.get("ensemble_size", 1) > 1 else ""
    print(f"trained on {s['n_train_cells']} cells ({len(ref.classes)} types, {len(ref.batches)} batches, "
          f"{len(ref.genes)} genes{members}) in {s['train_seconds']:.1f} s: {s['cells_per_s']:.0f} cells/s")
    if "val_balanced_accuracy" in s:
        print(f"validation ({s['n_val_cells']} cells): balanced accuracy {s['val_balanced_accuracy']:.4f}, "
              f"accuracy {s['val_accuracy']:.4f}")
    print(f"checkpoint: {out}")
    return 0

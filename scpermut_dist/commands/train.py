"""`scpermut train`: train a reference on an h5ad of raw counts and write a checkpoint folder."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a reference model on an h5ad file of raw counts",
                              description=__doc__.splitlines()[0])
    p.add_argument("--h5ad", required=True, help="reference AnnData file with raw counts")
    p.add_argument("--label-key", required=True, help="obs column with cell types")
    p.add_argument("--batch-key", default=None,
                   help="obs column(s) with the batch (e.g. donor, or 'donor+assay'); omit for a single batch")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically if it exists)")
    p.add_argument("--config", default=None, help="YAML run configuration (sections data, model, loss, train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.clas_w=0.5 (repeatable)")
    p.add_argument("--unlabeled-value", default=None, help="label value meaning 'no label' (e.g. Unknown)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loaders.sources.h5ad import H5adSpec
    from scpermut_dist.api import config_with_data_keys, train_reference
    from scpermut_dist.checkpoint import MANIFEST
    from scpermut_dist.cli import UsageError
    from scpermut_dist.config import RunConfig
    from scpermut_dist.trainer import format_record

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise UsageError(f"--out {out} exists and is not a scpermut checkpoint folder; choose another path")
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    cfg = config_with_data_keys(cfg, args.label_key, args.batch_key, args.unlabeled_value, args.layer)

    def report(r: dict) -> None:
        if not args.quiet:
            print(format_record(r), flush=True)

    ref = train_reference(lambda sel: H5adSpec(args.h5ad, sel, cfg.data.layer), cfg, where=f"h5ad {args.h5ad}",
                          out_dir=out, quiet=args.quiet, report=report)
    s = ref.summary
    print(f"trained on {s['n_train_cells']} cells ({len(ref.classes)} types, {len(ref.batches)} batches, "
          f"{len(ref.genes)} genes) in {s['train_seconds']:.1f} s: {s['cells_per_s']:.0f} cells/s")
    if "val_balanced_accuracy" in s:
        print(f"validation ({s['n_val_cells']} cells): balanced accuracy {s['val_balanced_accuracy']:.4f}, "
              f"accuracy {s['val_accuracy']:.4f}")
    print(f"checkpoint: {out}")
    return 0

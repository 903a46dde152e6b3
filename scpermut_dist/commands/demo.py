"""`scpermut demo`: the main job on the embedded default: a reference built on local Ray, a held-out donor mapped.

Generates a Census-shaped store (launch/configs/small.yaml, `scpermut synth`) if missing, trains on 2 Ray
Train workers with one donor left out, maps that donor's cells with the checkpoint and prints the metrics.
`--pbmc68k` instead trains in-process on scanpy's bundled pbmc68k_reduced (offline) and maps a held-out 20 %.

pbmc68k: counts are recovered from the log-CP10k `.raw` as round(expm1(raw.X) * n_counts / 1e4);
labels are `bulk_labels` (10 FACS-sorted types); there is a single batch, so the adversary is off.
"""
from __future__ import annotations

import argparse

from pathlib import Path

QUERY_FRACTION = 0.2
SMALL_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "small.yaml"
HOLDOUT = "donor_id == 'donor_10'"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train on pbmc68k_reduced, map a held-out part, print metrics",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the checkpoint (model/) and mapped query (query_mapped.h5ad)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (e.g. train.max_epochs=5 for a quick run)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--config", default=str(SMALL_CONFIG), help="run config naming the store (default: small.yaml)")
    p.add_argument("--holdout", default=HOLDOUT, help="obs filter of the query cells, left out of training")
    p.add_argument("--pbmc68k", action="store_true", help="the in-process demo on pbmc68k_reduced instead")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_pbmc68k(args) if args.pbmc68k else run_atlas(args)


def run_atlas(args: argparse.Namespace) -> int:
    """Train on Ray with `--holdout` left out, then map the held-out cells as a new user's query would be."""
    from pathlib import Path

    import anndata as ad
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from loaders.selection import CellSelection
    from loaders.sources import spec_from_uri
    from scpermut_dist.commands.main import main
    from scpermut_dist.config import RunConfig
    from scpermut_dist.json_report import write_json
    from scpermut_dist.mapping.output import write_h5ad_atomic
    from scpermut_dist.mapping.reference import load_reference

    out = Path(args.out)
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    base = cfg.data.obs_value_filter
    train_filter = f"({base}) and not ({args.holdout})" if base else f"not ({args.holdout})"
    quiet = ["--quiet"] if args.quiet else []
    sets = [a for o in args.overrides for a in ("--set", o)]
    rc = main(["train", "--config", args.config, "--workers", str(args.workers), "--out", str(out / "run"),
               "--obs-filter", train_filter, *sets, *quiet])
    if rc:
        return rc
    query_filter = f"({base}) and ({args.holdout})" if base else args.holdout
    src = spec_from_uri(cfg.data.source, CellSelection(obs_value_filter=query_filter, label_key=cfg.data.label_key),
                        organism=cfg.data.organism).open()
    import numpy as np

    query = ad.AnnData(src.read_counts(np.arange(src.n_cells)), var=src.var.set_index("feature_id", drop=False))
    truth = src.obs["label"].astype(str).to_numpy()
    src.close()
    ref = load_reference(out / "run" / "model")
    result = ref.map(query)
    metrics = {"query_cells": int(query.n_obs), "balanced_accuracy": balanced_accuracy_score(truth, result.labels),
               "accuracy": accuracy_score(truth, result.labels),
               "macro_f1": f1_score(truth, result.labels, average="macro"),
               "val_balanced_accuracy": ref.metrics.get("val_balanced_accuracy")}
    query.obs["truth"] = truth
    write_h5ad_atomic(ref.annotate(query, result), out / "query_mapped.h5ad")
    write_json(out / "metrics.json", metrics)
    print(f"query ({args.holdout}: {query.n_obs} cells never seen in training): balanced accuracy "
          f"{metrics['balanced_accuracy']:.4f}, accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")
    print(f"wrote {out / 'run' / 'model'}, {out / 'query_mapped.h5ad'}, {out / 'metrics.json'}")
    return 0


def load_pbmc68k_counts():
    """pbmc68k_reduced with integer counts in X (from `.raw`) and the original obs."""
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.X.toarray() if sp.issparse(src.raw.X) else np.asarray(src.raw.X)
    counts = np.round(np.expm1(raw) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=src.obs[["bulk_labels", "n_counts"]].copy(),
                      var=src.raw.var[[]].copy())


def run_pbmc68k(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import numpy as np
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from scpermut_dist.api import fit
    from scpermut_dist.config import RunConfig
    from scpermut_dist.errors import UsageError
    from scpermut_dist.json_report import write_json
    from scpermut_dist.mapping.output import write_h5ad_atomic
    from scpermut_dist.train.preprocess import encode
    from scpermut_dist.train.split import stratified_split
    from scpermut_dist.train.trainer import format_record

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    cfg = RunConfig().apply_overrides(args.overrides)
    adata = load_pbmc68k_counts()
    _, codes = encode(adata.obs["bulk_labels"])
    ref_idx, query_idx = stratified_split(codes, QUERY_FRACTION, seed=cfg.train.seed)
    reference, query = adata[ref_idx].copy(), adata[query_idx].copy()
    truth = query.obs["bulk_labels"].astype(str).to_numpy()
    del query.obs["bulk_labels"]  # the query carries no label
    print(f"pbmc68k_reduced: {reference.n_obs} reference cells, {query.n_obs} query cells, "
          f"{adata.n_vars} genes, {len(np.unique(codes))} types (bulk_labels)")

    t0 = time.perf_counter()
    ref = fit(reference, label_key="bulk_labels", config=cfg, quiet=args.quiet,
              report=None if args.quiet else lambda r: print(format_record(r), flush=True))
    train_s = time.perf_counter() - t0
    result = ref.map(query)
    metrics = {"balanced_accuracy": balanced_accuracy_score(truth, result.labels),
               "accuracy": accuracy_score(truth, result.labels),
               "macro_f1": f1_score(truth, result.labels, average="macro"),
               "train_seconds": train_s, "cells_per_s": ref.summary["cells_per_s"],
               "val_balanced_accuracy": ref.summary.get("val_balanced_accuracy")}
    out.mkdir(parents=True, exist_ok=True)
    ref.save(out / "model")
    query.obs["bulk_labels_truth"] = truth
    write_h5ad_atomic(ref.annotate(query, result), out / "query_mapped.h5ad")
    write_json(out / "metrics.json", metrics)
    print(f"trained in {train_s:.1f} s ({metrics['cells_per_s']:.0f} cells/s); validation balanced accuracy "
          f"{metrics['val_balanced_accuracy']:.4f}")
    print(f"query ({query.n_obs} held-out cells): balanced accuracy {metrics['balanced_accuracy']:.4f}, "
          f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")
    print(f"wrote {out / 'model'} and {out / 'query_mapped.h5ad'}")
    return 0

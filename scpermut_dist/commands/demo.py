"""`scpermut demo`: train on scanpy's bundled pbmc68k_reduced, map a held-out 20 %, print the metrics.

Runs offline. Counts are recovered from the log-CP10k `.raw` as round(expm1(raw.X) * n_counts / 1e4);
labels are `bulk_labels` (10 FACS-sorted types); there is a single batch, so the adversary is off.
"""
from __future__ import annotations

import argparse

QUERY_FRACTION = 0.2


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train on pbmc68k_reduced, map a held-out part, print metrics",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the checkpoint (model/) and mapped query (query_mapped.h5ad)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (e.g. train.max_epochs=5 for a quick run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import numpy as np
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from scpermut_dist.api import fit
    from scpermut_dist.config import RunConfig
    from scpermut_dist.errors import UsageError
    from scpermut_dist.mapping.align import write_h5ad_atomic
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
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"trained in {train_s:.1f} s ({metrics['cells_per_s']:.0f} cells/s); validation balanced accuracy "
          f"{metrics['val_balanced_accuracy']:.4f}")
    print(f"query ({query.n_obs} held-out cells): balanced accuracy {metrics['balanced_accuracy']:.4f}, "
          f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")
    print(f"wrote {out / 'model'} and {out / 'query_mapped.h5ad'}")
    return 0

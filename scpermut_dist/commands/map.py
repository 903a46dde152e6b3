"""`scpermut map`: annotate a query h5ad with a trained reference (labels, confidence, latent, probabilities)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("map", help="map a query h5ad onto a trained reference",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder written by `scpermut train`")
    p.add_argument("--query", required=True, help="query AnnData file with raw counts (no label or batch needed)")
    p.add_argument("--out", required=True, help="output h5ad (written atomically)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from scpermut_dist.api import load_reference
    from scpermut_dist.errors import UsageError
    from scpermut_dist.mapping.output import read_h5ad, write_h5ad_atomic

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give an .h5ad file path")
    ref = load_reference(args.model)
    query = read_h5ad(args.query, where=f"query {args.query}")
    t0 = time.perf_counter()
    result = ref.map(query, layer=args.layer, where=f"query {args.query}")
    seconds = time.perf_counter() - t0
    ref.annotate(query, result)
    write_h5ad_atomic(query, out)
    if not args.quiet:
        counts = query.obs["scpermut_label"].value_counts()
        print(f"mapped {query.n_obs} cells in {seconds:.2f} s ({query.n_obs / max(seconds, 1e-9):.0f} cells/s); "
              f"{result.n_genes_found}/{result.n_genes_model} model genes found by {result.matched_by}")
        print("predicted types: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        print(f"wrote {out}")
    return 0

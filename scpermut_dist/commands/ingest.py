"""`scpermut ingest`: convert an h5ad file of raw counts into a SOMA Experiment, streaming row chunks."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="h5ad -> SOMA Experiment (streaming)",
                              description="Write X.h5ad as a SOMA Experiment at STORE_URI: obs, ms['RNA'].var "
                                          "(feature_id, feature_name) and X['raw']. Counts are validated.")
    p.add_argument("h5ad", metavar="X.h5ad")
    p.add_argument("store", metavar="STORE_URI", help="new local directory (must not exist or be empty)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X; raw: the h5ad's .raw)")
    p.add_argument("--chunk-cells", type=int, default=None, help="rows per chunk (default: ~64 MB of counts)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from scpermut_dist.errors import UsageError

    if args.chunk_cells is not None and args.chunk_cells < 1:
        raise UsageError("--chunk-cells must be >= 1")
    from loaders.ingest import ingest_h5ad

    summary = ingest_h5ad(args.h5ad, args.store, layer=args.layer, chunk_cells=args.chunk_cells,
                          progress=not args.quiet)
    print(json.dumps(summary))
    return 0

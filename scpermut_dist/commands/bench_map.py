"""`scpermut bench map`: `map` wall time and peak RSS for queries of growing size streamed from a SOMA store."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "map", help="map wall time and peak memory, e.g. 10,000 vs 1,000,000 cells",
        description="Maps the store's first N cells (soma_joinid < N) to parquet in a fresh process per size and "
                    "prints wall time and peak RSS; without --model a tiny reference is trained on the store first.")
    p.add_argument("--store", required=True, help="SOMA Experiment or Census-shaped collection (e.g. `scpermut synth`)")
    p.add_argument("--sizes", default="10000,1000000", help="query sizes in cells, comma-separated")
    p.add_argument("--out", required=True, help="folder for the reference, the outputs and bench_map.json")
    p.add_argument("--model", default=None, help="checkpoint to map with (default: train a tiny one on the store)")
    p.add_argument("--obs-filter", default=None, help="extra SOMA value_filter on the query cells")
    p.add_argument("--organism", default=None)
    p.add_argument("--chunk-cells", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the mapping process")
    p.add_argument("--keep-outputs", action="store_true", help="keep the parquet files")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scpermut_dist.errors import UsageError
    from scpermut_dist.evaluation.bench_map import run_benchmark

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sizes {args.sizes!r}: give cell counts, e.g. 10000,1000000") from None
    if not sizes or min(sizes) < 1:
        raise UsageError("--sizes: give at least one positive cell count")
    run_benchmark(args.store, sizes, Path(args.out), Path(args.model) if args.model else None, args.obs_filter,
                  args.chunk_cells, args.organism, args.threads, args.keep_outputs, args.quiet)
    return 0

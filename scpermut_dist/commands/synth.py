"""`scpermut synth`: write a synthetic, Census-shaped SOMA store (for tests, benchmarks and demos)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic Census-shaped SOMA store",
                              description="Write a synthetic atlas shaped like CELLxGENE Census (census_info + "
                                          "census_data/homo_sapiens, mus_musculus) at STORE_URI.")
    p.add_argument("--cells", type=int, required=True, help="human cells")
    p.add_argument("--genes", type=int, required=True)
    p.add_argument("--out", required=True, metavar="STORE_URI", help="new local directory (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", type=int, default=None, help="number of datasets (default grows with --cells)")
    p.add_argument("--cell-types", type=int, default=None, help="max common cell types (rare types are added)")
    p.add_argument("--mouse-cells", type=int, default=None, help="cells of the small mouse experiment (0 = none)")
    p.add_argument("--chunk-cells", type=int, default=65536, help="rows generated and written per chunk")
    p.add_argument("--normalized", action="store_true", help="also write X['normalized'] (X / row sum)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from scpermut_dist.errors import UsageError

    if args.cells < 1 or args.genes < 10 or args.chunk_cells < 1:
        raise UsageError("--cells must be >= 1, --genes >= 10 and --chunk-cells >= 1")
    from loaders.synth import synthesize_census

    summary = synthesize_census(args.out, args.cells, args.genes, seed=args.seed, n_datasets=args.datasets,
                                n_cell_types=args.cell_types, mouse_cells=args.mouse_cells,
                                chunk_cells=args.chunk_cells, normalized=args.normalized, progress=not args.quiet)
    print(json.dumps(summary))
    return 0

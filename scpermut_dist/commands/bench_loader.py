"""`scpermut bench loader`: our paired streaming loader vs. tiledbsoma-ml on the same SOMA store."""
from __future__ import annotations

import argparse

from loaders.bench import LOADERS, BenchConfig

TARGETS = {"ratio_cells_per_s": 3.0, "batch_entropy_ratio": 0.95, "cells_per_s": 20_000, "partner_same_type_frac": 1.0,
           "rss_peak_ratio_max": 1.2}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loader", help="throughput, memory and shuffle quality of the paired loader vs tiledbsoma-ml",
        description="Streams one epoch (or --cells cells) of a SOMA store (a Census-shaped collection, read at "
                    "census_data/homo_sapiens, or a bare Experiment) with our loader and with "
                    "tiledbsoma_ml.ExperimentDataset at its defaults (minibatch of 1 cell) and at our minibatch size, "
                    "each in a fresh subprocess, and writes the numbers as JSON.")
    p.add_argument("--store", required=True, help="SOMA store URI")
    p.add_argument("--json", required=True, dest="json_out", help="output JSON path")
    p.add_argument("--cells", type=int, help="cells to stream per loader (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=430)
    p.add_argument("--genes-first", type=int, help="read only the first G genes (both loaders)")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--batch-keys", default="dataset_id", help="comma-separated obs columns defining the batch")
    p.add_argument("--obs-filter", help="obs value filter, e.g. \"is_primary_data == True\"")
    p.add_argument("--tsml-batch-size", type=int,
                   help="minibatch size of the 'tiledbsoma-ml' run (default: its own, 1; the "
                        "'tiledbsoma-ml-matched' run always uses --batch-size)")
    p.add_argument("--io-batch-cells", type=int, default=BenchConfig.io_batch_cells, help="our IO pool size")
    p.add_argument("--block-cells", type=int, default=BenchConfig.block_cells, help="our shuffle block size")
    p.add_argument("--prefetch", type=int, default=1, help="IO pools read ahead")
    p.add_argument("--io-threads", type=int, default=1, help="pools read concurrently (each still one read)")
    p.add_argument("--tiledb-mem-budget-mb", type=int, default=256,
                   help="our TileDB reader memory budget (sm.mem.total_budget); 0 = TileDB's default (10 GiB)")
    p.add_argument("--balance", type=float, default=0.0)
    p.add_argument("--sweep", default="", help="extra (block x pool) settings for ours, e.g. 64x65536,2048x65536")
    p.add_argument("--compare-rss", metavar="STORE2", help="also stream --cells from STORE2 and compare peak RSS")
    p.add_argument("--only", choices=list(LOADERS), help="run a single loader")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from loaders.bench import BenchConfig, compare
    from scpermut_dist.errors import UsageError
    from scpermut_dist.json_report import write_json

    if args.cells is not None and args.cells < args.batch_size:
        raise UsageError(f"--cells ({args.cells}) must be at least --batch-size ({args.batch_size}).")
    try:
        sweep = [tuple(int(v) for v in s.lower().split("x")) for s in args.sweep.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sweep {args.sweep!r}: give BLOCKxPOOL pairs, e.g. 64x65536,2048x65536") from None
    if any(len(s) != 2 for s in sweep):
        raise UsageError(f"--sweep {args.sweep!r}: give BLOCKxPOOL pairs, e.g. 64x65536,2048x65536")
    if not os.path.exists(args.store) and "://" not in args.store:
        raise UsageError(f"--store {args.store}: no such store.")
    cfg = BenchConfig(store=args.store, cells=args.cells, batch_size=args.batch_size, genes_first=args.genes_first,
                      label_key=args.label_key, batch_keys=tuple(k.strip() for k in args.batch_keys.split(",") if k.strip()),
                      obs_filter=args.obs_filter, io_batch_cells=args.io_batch_cells, block_cells=args.block_cells,
                      prefetch=args.prefetch, io_threads=args.io_threads, balance=args.balance,
                      tiledb_mem_budget_mb=args.tiledb_mem_budget_mb or None, tsml_batch_size=args.tsml_batch_size)
    loaders = (args.only,) if args.only else LOADERS
    report = compare(cfg, sweep=sweep, rss_store=args.compare_rss, loaders=loaders)
    report["targets"] = TARGETS
    _print(report)
    write_json(args.json_out, report, indent=2)
    print(f"wrote {args.json_out}")
    return 0


def _print(report: dict) -> None:
    res = report["results"]
    cols = ("cells", "cells_per_s", "cells_per_cpu_s", "peak_rss_mb", "batch_entropy_ratio", "partner_same_type_frac",
            "partner_other_batch_frac", "partner_in_pool_frac", "class_balance_tv")
    for name, r in res.items():
        print(f"{name}: " + ", ".join(f"{c}={_fmt(r.get(c))}" for c in cols if r.get(c) is not None))
    for suffix, what in (("", "tiledbsoma-ml at its defaults"), ("_matched_batch", "tiledbsoma-ml at our batch size")):
        if "ratio_cells_per_s" + suffix in report:
            print(f"ours / {what}: {report['ratio_cells_per_s' + suffix]:.2f}x cells/s wall, "
                  f"{report['ratio_cells_per_cpu_s' + suffix]:.2f}x per CPU-second"
                  + (f" (target >= {TARGETS['ratio_cells_per_s']}x)" if not suffix else ""))
    for s in report.get("sweep", []):
        print(f"sweep block={s['block_cells']:5d} pool={s['io_batch_cells']:7d}: {s['cells_per_s']:8.0f} cells/s "
              f"({s['cells_per_cpu_s']:.0f}/CPU-s), "
              f"entropy ratio {s['batch_entropy_ratio']:.3f}, peak RSS {s['peak_rss_mb']:.0f} MB, "
              f"partners in pool {s['partner_in_pool_frac']:.3f}")
    if "rss_compare" in report:
        rc = report["rss_compare"]
        print(f"peak RSS {rc['stores']}: {rc['peak_rss_mb'][0]:.0f} vs {rc['peak_rss_mb'][1]:.0f} MB "
              f"(ratio {rc['peak_ratio']:.2f}, target <= {TARGETS['rss_peak_ratio_max']})")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and v < 10 else (f"{v:.0f}" if isinstance(v, float) else str(v))

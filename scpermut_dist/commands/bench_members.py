"""`scpermut bench members`: the default ensemble's time to result, members in turn vs side by side."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "members", help="ensemble members in turn vs in parallel processes (time to result)",
        description="Trains the same reference twice per repeat, ensemble members in turn (train.parallel_members=1, "
                    "torch's default threads) and side by side (auto), maps the held-out batch with each, and prints "
                    "the times, their ratio and both accuracies.")
    p.add_argument("--h5ad", required=True, help="AnnData with raw counts")
    p.add_argument("--label-key", required=True)
    p.add_argument("--batch-key", required=True)
    p.add_argument("--query-batch", default=None, help="hold this batch out and map it (default: train on all cells)")
    p.add_argument("--obs-filter", default=None, help="pandas query over obs, e.g. \"demuxlet_cls == 'SNG'\"")
    p.add_argument("--repeats", type=int, default=1, help="repeats; arms alternate their order (default 1)")
    p.add_argument("--config", default=None, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="folder for bench_members.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scpermut_dist.commands.evaluate import load_filtered
    from scpermut_dist.config import RunConfig
    from scpermut_dist.errors import UsageError
    from scpermut_dist.evaluation.bench_members import format_summary, run_benchmark

    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if any(o.split("=", 1)[0].strip() == "train.parallel_members" for o in args.overrides):
        raise UsageError("--set train.parallel_members: the benchmark sets it per arm (1 and auto); leave it out")
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    adata = load_filtered(args.h5ad, args.obs_filter)
    report = run_benchmark(adata, args.label_key, args.batch_key, args.query_batch, cfg, Path(args.out),
                           args.repeats, args.quiet)
    print(format_summary(report))
    return 0

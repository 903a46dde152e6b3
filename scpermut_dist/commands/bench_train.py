"""`scpermut bench train`: training cells/s on 1..N Ray Train workers beside the loader's rate and the roofline."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="training throughput and per-worker memory on Ray Train workers",
        description="Builds a reference on a SOMA store with each worker count (a local Ray, one epoch per stage "
                    "unless --set says otherwise), then streams the same store with the loader alone and times the "
                    "model's dense compute alone (a matmul loop with its layer shapes): which side limits.")
    p.add_argument("--store", required=True, help="SOMA store (e.g. from `scpermut synth`)")
    p.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2")
    p.add_argument("--out", required=True, help="folder for the runs (w1/, w2/, ...) and bench.json")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--batch-key", default="dataset_id+donor_id")
    p.add_argument("--obs-filter", default=None)
    p.add_argument("--cells-per-epoch", type=int, default=None, help="cells per epoch (default: all cells)")
    p.add_argument("--compare-store", default=None,
                   help="a second store (e.g. 20x the cells): per-worker memory of the largest worker count on both")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from launch.ray_session import ray_session
    from loaders.sources import spec_from_uri
    from scpermut_dist.commands.main import parse_seeds
    from scpermut_dist.config import RunConfig
    from scpermut_dist.evaluation import bench_train as bt
    from scpermut_dist.json_report import write_json
    from scpermut_dist.train.distributed import Scaling, prepare_run, run_on_ray
    from scpermut_dist.train.reference import config_with_data_keys

    counts = parse_seeds(args.workers) or [1]
    out = Path(args.out).absolute()
    sets = ["train.max_epochs=1", "model.ensemble_size=1", *([f"train.cells_per_epoch={args.cells_per_epoch}"] if args.cells_per_epoch else []),
            *([f"data.obs_value_filter={args.obs_filter}"] if args.obs_filter else []), *args.overrides]
    cfg = config_with_data_keys(RunConfig().apply_overrides(sets), args.label_key, args.batch_key, None, None)

    def build(store: str, workers: int, name: str) -> dict:
        store = str(Path(store).absolute())

        def factory(sel):
            return spec_from_uri(store, sel)

        run_dir = out / name
        arrays = prepare_run(store, factory, cfg, run_dir, quiet=args.quiet)
        result = run_on_ray(store, factory, cfg, run_dir, Scaling(workers=workers, max_failures=0), quiet=args.quiet,
                            arrays=arrays)
        return {**bt.run_summary(run_dir), "workers": workers, "wall_seconds": result["wall_seconds"],
                "n_cells": int(len(arrays.cells)), "n_genes": int(len(arrays.genes)),
                "classes": len(arrays.classes), "batches": len(arrays.batches)}

    report: dict = {"store": args.store, "runs": {}}
    with ray_session(out, num_cpus=max(counts) + 1, quiet=args.quiet):
        for w in counts:
            report["runs"][str(w)] = build(args.store, w, f"w{w}")
        if args.compare_store:
            report["compare"] = build(args.compare_store, max(counts), f"w{max(counts)}_compare")
    first = report["runs"][str(counts[0])]
    shapes = bt.layer_shapes(cfg, first["n_genes"], first["classes"], first["batches"])
    batch = cfg.train.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker: one CPU each (Ray's OMP_NUM_THREADS)
    report["roofline_cells_per_s_per_process"] = bt.roofline_cells_per_s(shapes, batch)
    torch.set_num_threads(threads)
    report["loader"] = bt.loader_cells_per_s(args.store, min(first["n_cells"], 200_000), batch, None)
    for w, r in report["runs"].items():
        r["speedup_vs_1"] = bt.ratio(r["cells_per_s"], report["runs"][str(counts[0])]["cells_per_s"]) * counts[0]
        r["vs_loader"] = bt.ratio(r["cells_per_s"], int(w) * report["loader"]["cells_per_s"])
        r["vs_roofline"] = bt.ratio(r["cells_per_s"], int(w) * report["roofline_cells_per_s_per_process"])
    if "compare" in report:
        a, b = report["runs"][str(max(counts))], report["compare"]
        per_rank = [(ub - ua) * 2**20 / (b["n_cells"] - a["n_cells"]) for ua, ub in zip(a["uss_mb"], b["uss_mb"])]
        report["memory"] = {"cells": [a["n_cells"], b["n_cells"]], "peak_rss_ratio": bt.ratio(max(b["peak_rss_mb"]),
                                                                                            max(a["peak_rss_mb"])),
                            "uss_bytes_per_cell_per_rank": per_rank,
                            "uss_bytes_per_cell_per_worker": max(per_rank)}
    report["projection"] = bt.projection(None, report["loader"]["cells_per_s"])
    _print(report)
    write_json(out / "bench.json", report)
    print(f"wrote {out / 'bench.json'}")
    return 0


def _print(report: dict) -> None:
    for w, r in report["runs"].items():
        print(f"{w} worker(s): {r['cells_per_s']:.0f} training cells/s ({r['speedup_vs_1']:.2f}x of 1 worker's rate x "
              f"workers: {r['speedup_vs_1'] / int(w):.2f} efficiency), {r['vs_loader']:.2f} of the loaders' rate, "
              f"{r['vs_roofline']:.2f} of the roofline; peak RSS per worker {r['peak_rss_mb']} MB, USS {r['uss_mb']} MB; "
              f"validation balanced accuracy {r['val_balanced_accuracy']}; wall {r['wall_seconds']:.0f} s")
    print(f"loader alone: {report['loader']['cells_per_s']:.0f} cells/s per process; roofline "
          f"{report['roofline_cells_per_s_per_process']:.0f} cells/s per process (dense fwd+bwd matmuls, fp32 CPU)")
    if "memory" in report:
        m = report["memory"]
        print(f"per-worker memory, {m['cells'][0]} vs {m['cells'][1]} cells: peak RSS ratio {m['peak_rss_ratio']:.2f} "
              f"(target <= 1.20), own memory (USS) growth per cell by rank "
              f"{[round(v, 1) for v in m['uss_bytes_per_cell_per_rank']]} bytes (target <= 16)")
    p = report["projection"]
    print(f"projection, 10^8 cells on {p['gpus']} workers fed at {p['per_process_cells_per_s']:.0f} cells/s each: "
          f"{p['epoch_hours']:.2f} h per epoch ({p['limit']}-bound)")

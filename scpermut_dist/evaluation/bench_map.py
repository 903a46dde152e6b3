"""`map` wall time and peak memory for queries of growing size streamed from one SOMA store.

Each query is the store's first N cells (`soma_joinid < N`, plus an optional filter), mapped by
`scpermut map` to parquet in a fresh process, so its peak RSS (getrusage, which covers numpy, TileDB
and Arrow allocations alike; tracemalloc would miss the native ones) is that query's alone. Streaming
means the largest query's peak RSS stays close to the smallest's: the ratio is the figure to read.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from scpermut_dist.json_report import write_json

CHILD_FLAG = "--bench-map-child"


def train_tiny_reference(store: str, out: Path, cells: int = 20_000, label_key: str = "cell_type",
                         batch_key: str = "dataset_id", quiet: bool = True) -> Path:
    """A small, fast reference on the store's first cells (the benchmark times mapping, not the model)."""
    from scpermut_dist.commands.main import main

    sets = ["data.n_hvg=2000", "model.hidden_sizes=[128, 64]", "model.latent_dim=16", "model.classifier_hidden=32",
            "model.dann_hidden=32", "train.max_epochs=1", "train.num_threads=1"]
    args = ["train", "--store", store, "--obs-filter", f"soma_joinid < {cells}", "--label-key", label_key,
            "--batch-key", batch_key, "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    if main([*args, *(["--quiet"] if quiet else [])]) != 0:
        raise RuntimeError(f"training the benchmark reference on {store} failed")
    return out


def query_filter(n_cells: int, obs_filter: str | None) -> str:
    first = f"soma_joinid < {int(n_cells)}"
    return f"({obs_filter}) and {first}" if obs_filter else first


def measure(model: Path, store: str, n_cells: int, out: Path, obs_filter: str | None = None,
            chunk_cells: int | None = None, organism: str | None = None, threads: int = 1) -> dict:
    """One `map` of the first `n_cells` cells in a fresh process: wall time, peak RSS, cells written."""
    cmd = [sys.executable, "-m", "scpermut_dist.evaluation.bench_map", CHILD_FLAG, json.dumps({
        "model": str(model), "store": store, "out": str(out), "obs_filter": query_filter(n_cells, obs_filter),
        "chunk_cells": chunk_cells, "organism": organism, "threads": threads})]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"map of {n_cells} cells failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child(spec: dict) -> dict:
    """Runs in the measured process: load, map to parquet, report its own peak RSS."""
    import resource

    import psutil
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(spec["threads"])
    from scpermut_dist.api import load_reference
    from scpermut_dist.mapping.stream import DEFAULT_CHUNK_CELLS, map_store

    ref = load_reference(spec["model"])
    rss_loaded = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    s = map_store(ref, spec["store"], spec["out"], obs_filter=spec["obs_filter"], organism=spec["organism"],
                  chunk_cells=spec["chunk_cells"] or DEFAULT_CHUNK_CELLS, progress=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    meta = pq.ParquetFile(spec["out"]).metadata
    return {"n_cells": s.n_cells, "rows_written": meta.num_rows, "row_groups": meta.num_row_groups,
            "map_seconds": wall, "cells_per_s": s.n_cells / wall, "peak_rss_mb": peak / 2**20,
            "rss_after_load_mb": rss_loaded / 2**20, "parquet_mb": Path(spec["out"]).stat().st_size / 2**20,
            "chunk_cells": spec["chunk_cells"] or DEFAULT_CHUNK_CELLS}


def run_benchmark(store: str, sizes: list[int], out_dir: Path, model: Path | None = None,
                  obs_filter: str | None = None, chunk_cells: int | None = None, organism: str | None = None,
                  threads: int = 1, keep_outputs: bool = False, quiet: bool = False) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = out_dir / "model"
        if not (model / "manifest.json").exists():
            t0 = time.perf_counter()
            train_tiny_reference(store, model, quiet=quiet)
            if not quiet:
                print(f"trained the benchmark reference in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    rows = []
    for n in sizes:
        out = out_dir / f"map_{n}.parquet"
        r = {"requested_cells": n, **measure(model, store, n, out, obs_filter, chunk_cells, organism, threads)}
        if not keep_outputs:
            out.unlink()
        rows.append(r)
        if not quiet:
            print(f"map {r['n_cells']:>9,} cells: {r['map_seconds']:7.1f} s ({r['cells_per_s']:,.0f} cells/s), "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MiB (after loading the model {r['rss_after_load_mb']:,.0f} MiB), "
                  f"{r['row_groups']} row groups, parquet {r['parquet_mb']:.1f} MiB", flush=True)
    result = {"store": store, "model": str(model), "threads": threads, "runs": rows}
    if len(rows) > 1:
        result["peak_rss_ratio_largest_smallest"] = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        if not quiet:
            print(f"peak RSS ratio {rows[-1]['n_cells']:,} / {rows[0]['n_cells']:,} cells: "
                  f"{result['peak_rss_ratio_largest_smallest']:.2f}")
    write_json(out_dir / "bench_map.json", result, indent=2)
    return result


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
    print(json.dumps(_child(json.loads(sys.argv[2]))))

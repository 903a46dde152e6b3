"""Training throughput on Ray Train workers, beside the two ceilings that bound it on the same machine:
the loader's own rate (one process streaming the same store) and the dense-compute roofline of the same
model (a plain matmul loop with the model's layer shapes, forward and backward, no data).

Numbers are ratios measured in one run: training cells/s per worker count against 1 worker, against the
loader, against the roofline; peak RSS and unique memory (USS) per worker from each rank's own report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from scpermut_dist.config import RunConfig


def layer_shapes(cfg: RunConfig, n_genes: int, n_classes: int, n_batches: int) -> list[tuple[int, int]]:
    """(in, out) of every Linear the full model runs: encoder, decoder, classifier and DANN heads."""
    from scpermut_dist.model.module import ScPermutModule

    with torch.random.fork_rng(devices=[]):
        module = ScPermutModule.from_config(cfg.model, n_genes, n_classes, n_batches)
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def roofline_cells_per_s(shapes: list[tuple[int, int]], batch: int, steps: int = 20, device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> float:
    """Cells/s of x @ W forward plus the backward products for every layer (the first layer's input needs no
    gradient): what the model's dense compute alone allows on this device (no data, no elementwise work,
    no optimiser). `shapes[0]` must be the layer that reads the data."""
    dev = torch.device(device)
    xs = [torch.randn(batch, i, device=dev, dtype=dtype) for i, _ in shapes]
    ws = [torch.randn(i, o, device=dev, dtype=dtype) for i, o in shapes]
    gs = [torch.randn(batch, o, device=dev, dtype=dtype) for _, o in shapes]

    def step() -> None:
        for k, (x, w, g) in enumerate(zip(xs, ws, gs)):
            x @ w, x.T @ g  # forward, grad wrt weight
            if k:  # grad wrt input, except for the first layer, whose input is the data
                g @ w.T

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def run_summary(run_dir: Path) -> dict:
    """Training rate (epochs after the first of each stage, or all) and per-worker memory of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "cells_per_s" in r and r.get("seconds")]
    train = [r for r in epochs if r["stage"] != "classifier_branch"] or epochs  # the branch trains one head
    cells, seconds = sum(r["cells"] for r in train), sum(r["seconds"] for r in train)
    workers = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank*.json"))]
    final = records[-1]
    return {"cells_per_s": cells / seconds if seconds else float("nan"), "epochs": len(epochs),
            "per_stage_cells_per_s": {r["stage"]: r["cells_per_s"] for r in epochs},
            "peak_rss_mb": [w.get("peak_rss_mb") for w in workers], "uss_mb": [w.get("uss_mb") for w in workers],
            "val_balanced_accuracy": final.get("val_balanced_accuracy"), "val_macro_f1": final.get("val_macro_f1"),
            "steps": final.get("step")}


def loader_cells_per_s(store: str, cells: int, batch_size: int, genes: int | None) -> dict:
    """Our loader alone, one process, same store and minibatch (`loaders.bench`, in a fresh subprocess)."""
    from loaders.bench import BenchConfig, run_in_subprocess

    cfg = BenchConfig(store=store, cells=cells, batch_size=batch_size, genes_first=genes, batch_keys=("dataset_id",))
    out = run_in_subprocess(cfg)
    return {"cells_per_s": out["cells_per_s"], "peak_rss_mb": out["peak_rss_mb"]}


def projection(gpu_cells_per_s: float | None, loader_cells_per_s: float, cells: float = 1e8, gpus: int = 8) -> dict:
    """A 10^8-cell epoch on one 8-GPU node from per-process rates: each GPU worker is fed by its own loader,
    so the node runs at gpus x min(GPU compute rate, loader rate per process)."""
    per_process = min(loader_cells_per_s, gpu_cells_per_s) if gpu_cells_per_s else loader_cells_per_s
    rate = gpus * per_process
    return {"cells": cells, "gpus": gpus, "per_process_cells_per_s": per_process, "node_cells_per_s": rate,
            "epoch_hours": cells / rate / 3600, "limit": "loader" if per_process == loader_cells_per_s else "GPU"}


def ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")



"""GPU training rate of the real model and `Trainer` (bf16 autocast vs fp32), its busy fraction, and the
bf16 roofline of the same layer shapes: what limits a GPU worker once its data are on the device.

Batches are generated on the GPU (no loader): the rate measured is the model's side only; the loader's
per-process rate is measured on CPU by `scpermut bench loader` / `bench train`. Run:
`python -m scpermut_dist.evaluation.bench_gpu --json out.json` on a machine with a GPU.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from loaders.batch import PairedBatch
from scpermut_dist.config import RunConfig
from scpermut_dist.evaluation.bench_train import layer_shapes, roofline_cells_per_s
from scpermut_dist.json_report import write_json
from scpermut_dist.model.losses import LossWeights
from scpermut_dist.model.module import ScPermutModule
from scpermut_dist.train.trainer import Trainer


class DeviceBatches:
    """A StageLoader of `steps` random normalised minibatches already on the GPU (same tensors each epoch)."""

    def __init__(self, n_genes: int, n_classes: int, n_batches: int, batch: int, steps: int, device) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        counts = torch.poisson(torch.rand(batch, n_genes, device=device, generator=g) * 2, generator=g)
        x = torch.log1p(counts / counts.sum(1, keepdim=True).clamp_min(1) * 1e3)
        self.items = [PairedBatch(x, x.roll(1, 0), torch.randint(0, n_classes, (batch,), device=device, generator=g),
                                  torch.randint(0, n_batches, (batch,), device=device, generator=g),
                                  torch.arange(batch, device=device)) for _ in range(steps)]
        self.sampled_class_freq = torch.full((n_classes,), 1.0 / n_classes).numpy()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def train_rate(cfg: RunConfig, n_genes: int, n_classes: int, n_batches: int, batch: int, precision: str,
               steps: int = 200, device: str = "cuda") -> dict:
    """Cells/s of the full_model stage (encoder, decoder, classifier, DANN) and the GPU's busy fraction."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stage = [s for s in cfg.resolved_stages() if s.name == "full_model"][0].model_copy(
        update={"epochs": 2, "early_stopping": None})
    torch.manual_seed(0)
    module = ScPermutModule.from_config(cfg.model, n_genes, n_classes, n_batches)
    data = DeviceBatches(n_genes, n_classes, n_batches, batch, steps, device)
    trainer = Trainer(module, [stage], lambda s, i: data, LossWeights.from_config(cfg.loss), device=device,
                      precision=precision, dann_lr_mult=cfg.train.dann_lr_mult)
    trainer.fit()  # epoch 1 warms up (kernels, allocator); epoch 2 is timed below from its record
    record = trainer.history[-1]
    from torch.profiler import ProfilerActivity, profile

    data.items = data.items[:50]
    stage1 = stage.model_copy(update={"epochs": 1})
    t2 = Trainer(module, [stage1], lambda s, i: data, LossWeights.from_config(cfg.loss), device=device,
                 precision=precision, dann_lr_mult=cfg.train.dann_lr_mult)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        t2.fit()
        sync()
        wall = time.perf_counter() - t0
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return {"precision": precision, "batch": batch, "cells_per_s": record["cells_per_s"],
            "busy_fraction": kernel_us / 1e6 / wall, "profiled_wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--classes", type=int, default=500)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-sizes", default="430,4096")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cfg = RunConfig()
    shapes = layer_shapes(cfg, a.genes, a.classes, a.batches)
    out = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else a.device, "torch": torch.__version__, "genes": a.genes,
           "classes": a.classes, "batches": a.batches, "runs": [], "roofline": {}}
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            out["roofline"][f"{name}_{batch}"] = roofline_cells_per_s(shapes, batch, steps=a.steps, device=a.device,
                                                                     dtype=dtype)
        for precision in ("bf16", "fp32"):
            r = train_rate(cfg, a.genes, a.classes, a.batches, batch, precision, a.steps, a.device)
            r["vs_roofline"] = r["cells_per_s"] / out["roofline"][f"{precision}_{batch}"]
            out["runs"].append(r)
            print(json.dumps(r), flush=True)
    print(json.dumps(out["roofline"]))
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Small real data and a tiny model configuration for the model/trainer/CLI tests."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from scpermut_dist.config import RunConfig

CELLBENCH = "cellbench_5cl_3plates.h5ad"
# A small network and short stages: real training, seconds per run on one core.
TINY = ["data.n_hvg=200", "model.hidden_sizes=[64, 32]", "model.latent_dim=16", "model.classifier_hidden=16",
        "model.dann_hidden=16", "train.batch_size=64", "train.max_epochs=2", "data.sampling.io_batch_cells=4096", "model.ensemble_size=1"]


def tiny_config(*extra: str) -> RunConfig:
    return RunConfig().apply_overrides([*TINY, *extra])


def cellbench_sng(datasets_dir: Path, unlabelled_fraction: float = 0.0, seed: int = 0) -> ad.AnnData:
    """CellBench 5 cell lines, singlets only; optionally some labels replaced by 'unknown'."""
    a = ad.read_h5ad(datasets_dir / CELLBENCH)
    a = a[a.obs["demuxlet_cls"] == "SNG"].copy()
    if unlabelled_fraction:
        labels = a.obs["cell_line"].astype(str).to_numpy().copy()
        rng = np.random.default_rng(seed)
        labels[rng.random(len(labels)) < unlabelled_fraction] = "unknown"
        a.obs["cell_line"] = labels
    return a

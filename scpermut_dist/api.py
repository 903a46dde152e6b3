"""Python API: `fit` a reference on an AnnData, `load_reference` a checkpoint, map queries with it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import anndata as ad

from scpermut_dist.config import RunConfig
from scpermut_dist.mapping.output import MappingResult
from scpermut_dist.mapping.reference import Reference, load_reference
from scpermut_dist.train.reference import config_with_data_keys, train_reference


def fit(adata: ad.AnnData, label_key: str, batch_key: str | list[str] | None = None, config: RunConfig | None = None,
        unlabeled_value: str | list[str] | None = None, out_dir: str | Path | None = None, quiet: bool = True,
        layer: str | None = None, report: Callable[[dict], None] | None = None) -> Reference:
    """Train a reference on an in-memory AnnData holding raw counts (X or `layer`).

    `batch_key` may be None (one batch: the adversary has nothing to remove), a column, "a+b" or a list
    of columns combined into one batch id.
    """
    from loaders.sources import AnnDataSource

    cfg = config_with_data_keys(config or RunConfig(), label_key, batch_key, unlabeled_value, layer)
    return train_reference(lambda sel: AnnDataSource(adata, sel, cfg.data.layer, where="AnnData"), cfg,
                           where="AnnData", out_dir=out_dir, quiet=quiet, report=report)


__all__ = ["MappingResult", "Reference", "config_with_data_keys", "fit", "load_reference", "train_reference"]

"""What part of an atlas to use: a cell filter, a gene list, a label column and a batch definition.

Every source resolves a `CellSelection` against its own obs/var with the helpers below, so an h5ad,
a SOMA Experiment and Census all produce the same standardised obs (`label`, `batch`) and gene order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loaders.errors import DataError

LABEL_COL = "label"  # standardised obs column: cell type (categorical of str), <NA> when unlabelled
BATCH_COL = "batch"  # standardised obs column: combined batch id (categorical of str)
# Categorical, not object strings: obs of 10^8 cells must stay small in every worker.
UNLABELED_DEFAULTS = ("unlabeled", "Unlabeled", "unknown", "Unknown", "nan", "NaN", "")


@dataclass(frozen=True)
class CellSelection:
    """A picklable description of the cells, genes and annotations to read."""

    obs_value_filter: str | None = None
    label_key: str | None = None
    batch_keys: tuple[str, ...] = ()
    unlabeled_values: tuple[str, ...] = ()
    genes: tuple[str, ...] | None = None  # feature_id or feature_name; None = all genes
    obs_columns: tuple[str, ...] = field(default_factory=tuple)  # extra obs columns to carry

    @property
    def obs_columns_needed(self) -> list[str]:
        cols = [c for c in (self.label_key, *self.batch_keys, *self.obs_columns) if c]
        return list(dict.fromkeys(cols))


def standardize_obs(obs: pd.DataFrame, selection: CellSelection, where: str) -> pd.DataFrame:
    """Add `label` and `batch` columns from the selection's keys, with clear errors for missing ones."""
    missing = [c for c in selection.obs_columns_needed if c not in obs.columns]
    if missing:
        raise DataError(
            f"{where}: obs has no column(s) {missing}. Available columns: {sorted(map(str, obs.columns))[:40]}. "
            "Pass an existing column as the label/batch key."
        )
    out = obs.copy()
    if selection.label_key:
        raw = out[selection.label_key]
        labels = raw.astype("string")
        unlabeled = set(selection.unlabeled_values)
        is_unlabeled = raw.isna() | labels.isin(list(unlabeled))
        out[LABEL_COL] = labels.mask(is_unlabeled, pd.NA).astype("category")
    else:
        out[LABEL_COL] = pd.Series(pd.NA, index=out.index, dtype="string").astype("category")
    if selection.batch_keys:
        parts = [out[k].astype("string").fillna("NA") for k in selection.batch_keys]
        batch = parts[0]
        for p in parts[1:]:
            batch = batch + "+" + p
        out[BATCH_COL] = batch.astype("category")
    else:
        out[BATCH_COL] = pd.Series("all", index=out.index, dtype="string").astype("category")
    return out


def resolve_genes(var: pd.DataFrame, genes: tuple[str, ...] | None, where: str) -> np.ndarray:
    """Positions (into `var`) of the requested genes, matched by feature_id or else feature_name.

    `var` must have `feature_id` and `feature_name` columns. Genes absent from the atlas are an error
    (the model's input layout would silently change otherwise).
    """
    if genes is None:
        return np.arange(len(var))
    by_id = pd.Index(var["feature_id"].astype(str))
    by_name = pd.Index(var["feature_name"].astype(str))
    wanted = pd.Index([str(g) for g in genes])
    if wanted.has_duplicates:
        raise DataError(f"{where}: the gene list has duplicates: {list(wanted[wanted.duplicated()][:10])}")
    n_id, n_name = wanted.isin(by_id).sum(), wanted.isin(by_name).sum()
    index = by_id if n_id >= n_name else by_name
    if not index.is_unique:
        index = index.where(~index.duplicated(), None)
    pos = index.get_indexer(wanted)
    absent = wanted[pos < 0]
    if len(absent):
        raise DataError(
            f"{where}: {len(absent)} of {len(wanted)} requested genes are not in the atlas "
            f"(e.g. {list(absent[:10])}). Genes are matched by feature_id (Ensembl) or feature_name (symbol)."
        )
    return pos.astype(np.int64)

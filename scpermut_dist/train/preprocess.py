"""Turn a reference source into what training needs: checked counts, QC'd cells, genes, codes, normalisation.

Works on any `loaders` source (AnnData in memory, h5ad file, SOMA store) through a factory that
opens the source for a `CellSelection`, so the reference and an atlas take the same data path.
HVGs are chosen batch-aware on the reference only. Each cell's library size is its total counts over
ALL of its genes (taken in the QC pass, which reads every gene anyway: no extra IO on any source), kept
per cell (`totals`, float32) for training; the normalisation target is their median over QC'd cells, and
is stored in the checkpoint for mapping (a query is divided by its own totals over all of its genes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import pandas as pd

from loaders.errors import DataError
from loaders.normalize import ALL_GENES, Normalization
from loaders.selection import UNLABELED_DEFAULTS, CellSelection
from loaders.validate import check_raw_counts
from scpermut_dist.config import DataConfig

log = logging.getLogger(__name__)
SourceFactory = Callable[[CellSelection], Any]  # selection -> CellSource or SourceSpec (with .open())
LIBSIZE_SAMPLE = 50_000  # cells read to estimate the median library size


def open_source(spec_or_source: Any):
    """A `CellSource` from either a source or a picklable spec."""
    return spec_or_source.open() if hasattr(spec_or_source, "open") and not hasattr(spec_or_source, "obs") \
        else spec_or_source


@dataclass
class PreparedReference:
    """The reference restricted to the model genes, with per-cell codes over the source's obs positions."""

    spec: Any  # source or spec restricted to `genes` (handed to PairedCellDataset)
    source: Any  # the opened source (obs, var, read_counts)
    genes: pd.DataFrame  # feature_id, feature_name in model order
    normalization: Normalization
    classes: list[str]
    batches: list[str]
    label_codes: np.ndarray  # int64 per source cell, -1 = unlabelled
    batch_codes: np.ndarray  # int64 per source cell
    cells: np.ndarray  # positions of cells that pass QC (sorted)
    description: dict
    totals: np.ndarray | None = None  # float32 per source cell: total counts over all its genes (library size)


def selection_from_config(data: DataConfig) -> CellSelection:
    """The config's cells and keys; `data.unlabeled_value` adds to the default "no label" values."""
    unl = data.unlabeled_value
    given = () if unl is None else ((unl,) if isinstance(unl, str) else tuple(unl))
    unlabeled = tuple(dict.fromkeys((*UNLABELED_DEFAULTS, *map(str, given))))
    return CellSelection(obs_value_filter=data.obs_value_filter, label_key=data.label_key,
                         batch_keys=tuple(data.batch_keys), unlabeled_values=unlabeled)


def prepare_reference(factory: SourceFactory, data: DataConfig, where: str = "reference",
                      progress: bool = False) -> PreparedReference:
    """Validate, QC, select genes and fit the normalisation on the reference."""
    if not data.label_key:
        raise DataError(f"{where}: no label key given; pass --label-key (the obs column holding cell types)")
    selection = selection_from_config(data)
    full = open_source(factory(selection))
    classes, label_codes = encode(full.obs["label"])
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "no labelled cell"
        raise DataError(f"{where}: label key {data.label_key!r} has {found}; the classifier needs at least 2 "
                        "cell types among labelled cells. Choose another --label-key or check --unlabeled-value.")
    keep_cell, n_cells_per_gene, totals = _qc_pass(full, data, where)
    genes = _choose_genes(full, data, keep_cell, n_cells_per_gene, where, progress)
    genes_sel = replace(selection, genes=tuple(genes["feature_id"].astype(str)))
    spec = factory(genes_sel)
    source = open_source(spec)
    cells = np.flatnonzero(keep_cell)
    if source.n_cells != full.n_cells:
        raise DataError(f"{where}: the source gave {full.n_cells} cells for all genes but {source.n_cells} for the "
                        "model's genes; the cell selection must not depend on the genes")
    normalization = Normalization(target_sum=_median_library_size(totals, cells, where), log1p=True,
                                  library_size=ALL_GENES)
    # Classes/batches are encoded on the QC'd cells only: a class lost to QC must not be predicted.
    obs = source.obs
    kept_labels = obs["label"].iloc[cells]
    classes = sorted(kept_labels.dropna().unique().tolist())
    if len(classes) < 2:
        raise DataError(f"{where}: after cell filtering only {len(classes)} cell type(s) remain; relax "
                        "data.min_counts_per_cell / data.min_genes_per_cell")
    label_codes = _codes(obs["label"], classes)
    label_codes[~keep_cell] = -1
    batches = encode(obs["batch"].iloc[cells])[0]
    batch_codes = _codes(obs["batch"], batches)
    batch_codes[batch_codes < 0] = 0  # cells outside QC: never sampled
    counts_c = np.bincount(label_codes[cells][label_codes[cells] >= 0], minlength=len(classes))
    counts_b = np.bincount(batch_codes[cells], minlength=len(batches))
    description = {
        "source": where, "label_key": data.label_key, "batch_keys": list(data.batch_keys),
        "obs_value_filter": data.obs_value_filter, "layer": data.layer,
        "n_cells_total": int(full.n_cells), "n_cells": int(len(cells)),
        "n_labelled": int((label_codes >= 0).sum()), "n_genes_total": int(full.n_genes), "n_genes": len(genes),
        "class_counts": dict(zip(classes, counts_c.tolist())), "batch_counts": dict(zip(batches, counts_b.tolist())),
    }
    full.close()
    return PreparedReference(spec, source, genes, normalization, classes, batches, label_codes, batch_codes, cells,
                             description, totals=totals)


def encode(values: pd.Series) -> tuple[list[str], np.ndarray]:
    """Sorted distinct non-missing values (as str) and the int64 code of each entry (-1 for missing).

    Works on the column's categories: one Python string per cell would cost gigabytes at 10^8 cells.
    """
    from loaders.selection import string_codes

    classes, codes = string_codes(values)
    return classes, codes.astype(np.int64)


def _codes(values: pd.Series, classes: list[str]) -> np.ndarray:
    """Each entry's int64 position in `classes` (-1 when missing or not a class), mapped per category."""
    from loaders.selection import recode, string_codes

    names, codes = string_codes(values)
    table = np.append(pd.Index(classes, dtype=object).get_indexer(names), -1).astype(np.int64)
    return recode(table, codes)


def _row_blocks(n: int, step: int):
    for start in range(0, n, step):
        yield np.arange(start, min(start + step, n))


def _qc_pass(source, data: DataConfig, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One streaming pass over all genes: validate every count, per-cell QC and total counts (float32), and
    the per-gene number of expressing QC'd cells."""
    keep = np.zeros(source.n_cells, dtype=bool)
    totals = np.zeros(source.n_cells, dtype=np.float32)
    n_cells_per_gene = np.zeros(source.n_genes, dtype=np.int64)
    for rows in _row_blocks(source.n_cells, data.sampling.io_batch_cells):
        x = source.read_counts(rows)
        check_raw_counts(x, where, max_values=max(x.nnz, 1))  # every stored value, not a prefix
        x.eliminate_zeros()
        lib = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        totals[rows] = lib
        ok = (lib >= data.min_counts_per_cell) & (np.diff(x.indptr) >= data.min_genes_per_cell)
        keep[rows] = ok
        kept = x[np.flatnonzero(ok)]
        n_cells_per_gene += np.bincount(kept.indices, minlength=source.n_genes)
    if not keep.any():
        raise DataError(f"{where}: no cell passes QC (min_counts_per_cell={data.min_counts_per_cell}, "
                        f"min_genes_per_cell={data.min_genes_per_cell}); are the counts empty?")
    if (~keep).any():
        log.info("%s: %d of %d cells fail QC and are left out", where, int((~keep).sum()), source.n_cells)
    return keep, n_cells_per_gene, totals


def _choose_genes(source, data: DataConfig, keep_cell: np.ndarray, n_cells_per_gene: np.ndarray, where: str,
                  progress: bool) -> pd.DataFrame:
    var = source.var.reset_index(drop=True)
    if data.genes:
        from loaders.selection import resolve_genes

        return var.iloc[resolve_genes(var, tuple(data.genes), where)].reset_index(drop=True)
    passing = np.flatnonzero(n_cells_per_gene >= max(data.min_cells_per_gene, 1))
    if len(passing) == 0:
        raise DataError(f"{where}: no gene is expressed in >= {data.min_cells_per_gene} cells")
    if len(passing) <= data.n_hvg:
        log.info("%s: %d genes pass QC (<= n_hvg=%d): using all of them", where, len(passing), data.n_hvg)
        return var.iloc[passing].reset_index(drop=True)
    from loaders.stats import compute_gene_stats, select_hvg

    stats = compute_gene_stats(source, io_batch_cells=data.sampling.io_batch_cells, progress=progress)
    hvg = np.asarray(select_hvg(stats, n_top=data.n_hvg), dtype=np.int64)
    hvg = hvg[np.isin(hvg, passing)]
    return var.iloc[np.sort(hvg)].reset_index(drop=True)


def _median_library_size(totals: np.ndarray, cells: np.ndarray, where: str) -> float:
    """Median total counts (over all genes) on a seeded sample of at most LIBSIZE_SAMPLE QC'd cells."""
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(cells, size=min(len(cells), LIBSIZE_SAMPLE), replace=False))
    median = float(np.median(totals[sample]))
    if median <= 0:
        raise DataError(f"{where}: the median library size is 0; most cells have no counts. "
                        "Check the counts layer.")
    return median

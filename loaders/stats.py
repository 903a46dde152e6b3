"""Per-gene, per-batch statistics in one streaming pass, and batch-aware HVG selection from them.

Atlas references cannot be loaded into memory to run scanpy, so the quantities scanpy's
`highly_variable_genes(flavor="seurat", batch_key=...)` needs (per-batch mean and variance of the
CP10k-normalised counts) are accumulated IO batch by IO batch. Memory is O(n_batches x n_genes),
independent of the number of cells (48 bytes per gene per batch: 2,000 batches x 60k genes
would need ~5.8 GB, so keep Census batch keys coarse enough or restrict genes first).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from loaders.selection import BATCH_COL, string_codes
from loaders.validate import check_raw_counts

TARGET_SUM = 1e4  # CP10k, as scanpy's normalize_total default used before HVG selection
RESERVOIR = 100_000  # library sizes kept for quantiles: exact below this many cells
MAX_NNZ_BLOCK = 4_000_000  # stored values per accumulation step: bounds float64 temporaries (~200 MB)


@dataclass
class GeneStats:
    """Sums over cells, by batch (rows) and gene (columns), of raw counts and their log1p(CP10k)."""

    var: pd.DataFrame  # feature_id, feature_name of the source's genes
    batches: list[str]  # batch names, row order of the (n_batches, n_genes) arrays
    n_cells_b: np.ndarray  # (B,) cells per batch
    log_sum_bg: np.ndarray  # (B, G) sum of log1p(CP10k)
    log_sumsq_bg: np.ndarray  # (B, G) sum of squares of log1p(CP10k)
    cp10k_sum_bg: np.ndarray  # (B, G) sum of CP10k (scanpy's seurat flavour works on expm1 of the log data)
    cp10k_sumsq_bg: np.ndarray  # (B, G)
    n_expressed_bg: np.ndarray  # (B, G) cells with a non-zero count
    counts_bg: np.ndarray  # (B, G) total raw counts
    library_sizes: np.ndarray  # bounded uniform sample of per-cell totals over the source's genes
    library_min: float = 0.0
    library_max: float = 0.0
    library_mean: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.n_cells_b.sum())

    @property
    def n_genes(self) -> int:
        return len(self.var)

    @property
    def n_expressed(self) -> np.ndarray:
        """(G,) cells expressing each gene over all batches (for min_cells_per_gene filters)."""
        return self.n_expressed_bg.sum(axis=0)

    @property
    def total_counts(self) -> np.ndarray:
        return self.counts_bg.sum(axis=0)

    @property
    def log_mean(self) -> np.ndarray:
        """(G,) mean of log1p(CP10k) over all cells."""
        return self.log_sum_bg.sum(axis=0) / max(self.n_cells, 1)

    @property
    def log_std(self) -> np.ndarray:
        """(G,) population standard deviation of log1p(CP10k) over all cells."""
        n = max(self.n_cells, 1)
        var = self.log_sumsq_bg.sum(axis=0) / n - self.log_mean**2
        return np.sqrt(np.clip(var, 0, None))

    def library_quantile(self, q: float | list[float]) -> np.ndarray | float:
        """Quantiles of per-cell library size (exact up to `RESERVOIR` cells, a uniform-sample estimate above)."""
        if self.library_sizes.size == 0:
            return np.full(np.shape(q), np.nan) if np.ndim(q) else float("nan")
        return np.quantile(self.library_sizes, q)

    @property
    def library_median(self) -> float:
        """Default `Normalization.target_sum` candidate."""
        return float(self.library_quantile(0.5))


class _Reservoir:
    """Bottom-k sampling on random keys: a uniform sample of bounded size from a stream, deterministic by seed."""

    def __init__(self, k: int, seed: int = 0) -> None:
        self.k, self.rng = k, np.random.default_rng(seed)
        self.values, self.keys = np.empty(0), np.empty(0)

    def add(self, values: np.ndarray) -> None:
        values = np.concatenate([self.values, values])
        keys = np.concatenate([self.keys, self.rng.random(len(values) - len(self.values))])
        if len(values) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            values, keys = values[keep], keys[keep]
        self.values, self.keys = values, keys


def compute_gene_stats(source, io_batch_cells: int = 65536, progress: bool = False,
                       reservoir: int = RESERVOIR) -> GeneStats:
    """One pass over every selected cell of `source` in sorted IO batches; raises DataError on non-count data."""
    n_genes = source.n_genes
    batches, codes = string_codes(source.obs[BATCH_COL])  # per category, not per cell; codes >= 0
    n_b = len(batches)
    acc = {k: np.zeros((n_b, n_genes)) for k in ("log_sum", "log_sumsq", "cp_sum", "cp_sumsq", "counts")}
    n_expr = np.zeros((n_b, n_genes), dtype=np.int64)
    n_cells_b = np.bincount(codes, minlength=n_b).astype(np.int64)
    res = _Reservoir(reservoir)
    lib_min, lib_max, lib_total = np.inf, -np.inf, 0.0
    starts = range(0, source.n_cells, io_batch_cells)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="gene stats", unit="io batch")
    for start in starts:
        rows = np.arange(start, min(start + io_batch_cells, source.n_cells))
        x = sp.csr_matrix(source.read_counts(rows))
        check_raw_counts(x, f"cells {start}..{rows[-1]} of the source")
        lib = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        res.add(lib)
        lib_min, lib_max, lib_total = min(lib_min, lib.min()), max(lib_max, lib.max()), lib_total + lib.sum()
        for lo, hi in _row_blocks(x.indptr, MAX_NNZ_BLOCK):
            _accumulate(x[lo:hi], lib[lo:hi], codes[rows[lo:hi]], acc, n_expr)
    return GeneStats(
        var=source.var[["feature_id", "feature_name"]].reset_index(drop=True).copy(),
        batches=[str(b) for b in batches], n_cells_b=n_cells_b,
        log_sum_bg=acc["log_sum"], log_sumsq_bg=acc["log_sumsq"],
        cp10k_sum_bg=acc["cp_sum"], cp10k_sumsq_bg=acc["cp_sumsq"],
        n_expressed_bg=n_expr, counts_bg=acc["counts"], library_sizes=res.values,
        library_min=float(lib_min) if source.n_cells else 0.0,
        library_max=float(lib_max) if source.n_cells else 0.0,
        library_mean=lib_total / max(source.n_cells, 1),
    )


def _row_blocks(indptr: np.ndarray, max_nnz: int) -> list[tuple[int, int]]:
    """Split rows into consecutive blocks holding at most ~max_nnz stored values (at least one row each)."""
    n_rows, blocks, lo = len(indptr) - 1, [], 0
    while lo < n_rows:
        hi = int(np.searchsorted(indptr, indptr[lo] + max_nnz, side="right")) - 1
        hi = min(max(hi, lo + 1), n_rows)
        blocks.append((lo, hi))
        lo = hi
    return blocks


def _accumulate(x: sp.csr_matrix, lib: np.ndarray, codes: np.ndarray, acc: dict, n_expr: np.ndarray) -> None:
    """Add one IO batch: bincount over (local batch, gene) pairs of the stored values (zeros add nothing)."""
    n_genes = x.shape[1]
    local, inverse = np.unique(codes, return_inverse=True)
    nnz_per_row = np.diff(x.indptr)
    flat = np.repeat(inverse, nnz_per_row) * n_genes + x.indices
    size = len(local) * n_genes
    scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    counts = x.data.astype(np.float64)
    cp = counts * np.repeat(scale, nnz_per_row)
    logv = np.log1p(cp)
    for key, w in (("counts", counts), ("cp_sum", cp), ("cp_sumsq", cp * cp), ("log_sum", logv),
                   ("log_sumsq", logv * logv)):
        acc[key][local] += np.bincount(flat, weights=w, minlength=size).reshape(len(local), n_genes)
    n_expr[local] += np.bincount(flat[counts > 0], minlength=size).reshape(len(local), n_genes)


def hvg_table(stats: GeneStats, n_top: int = 3000, n_bins: int = 20) -> pd.DataFrame:
    """scanpy's batched seurat-flavour table: means, dispersions(_norm) averaged over batches, and
    `highly_variable_nbatches`, computed from the accumulated sums instead of the matrix."""
    n_genes = stats.n_genes
    per_batch = [
        _single_batch(stats, b, min(n_top, n_genes), n_bins) for b in range(len(stats.batches)) if stats.n_cells_b[b] > 0
    ]
    cols = {k: np.stack([d[k] for d in per_batch]) for k in ("means", "dispersions", "dispersions_norm", "hv")}
    with np.errstate(all="ignore"), _quiet_nanmean():
        table = pd.DataFrame({
            "means": cols["means"].mean(axis=0),
            "dispersions": np.nanmean(cols["dispersions"], axis=0),
            "dispersions_norm": np.nanmean(cols["dispersions_norm"], axis=0),
            "highly_variable_nbatches": cols["hv"].sum(axis=0).astype(int),
        })
    table.index = stats.var["feature_name"].astype(str).to_numpy()
    order = np.lexsort((np.arange(n_genes), -np.nan_to_num(table["dispersions_norm"].to_numpy(), nan=-np.inf),
                        -table["highly_variable_nbatches"].to_numpy()))
    hv = np.zeros(n_genes, dtype=bool)
    hv[order[:n_top]] = True
    table["highly_variable"] = hv
    return table


def select_hvg(stats: GeneStats, n_top: int = 3000, n_bins: int = 20) -> np.ndarray:
    """Positions (ascending, into `stats.var`) of the `n_top` batch-aware highly variable genes.

    Genes are ranked by the number of batches in which they are among the top `n_top` by normalised
    dispersion, ties broken by the mean normalised dispersion, as scanpy does with `batch_key`.
    """
    if n_top >= stats.n_genes:
        return np.arange(stats.n_genes)
    return np.flatnonzero(hvg_table(stats, n_top, n_bins)["highly_variable"].to_numpy())


def _single_batch(stats: GeneStats, b: int, n_top: int, n_bins: int) -> dict:
    """One batch as scanpy's `_highly_variable_genes_single_batch` with unexpressed genes filtered out
    (they get 0 for every column, which enters the across-batch mean as in scanpy)."""
    n = stats.n_cells_b[b]
    expressed = stats.n_expressed_bg[b] > 0
    mean = stats.cp10k_sum_bg[b][expressed] / n
    var = stats.cp10k_sumsq_bg[b][expressed] / n - mean**2
    if n > 1:
        var *= n / (n - 1)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp <= 0] = np.nan  # scanpy: exact zeros -> NaN; tiny negatives are float round-off of zero
        disp = np.log(disp)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": disp})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = grouped["dev"].isnull()
    grouped.loc[single, "dev"] = grouped.loc[single, "avg"]
    grouped.loc[single, "avg"] = 0
    per_gene = grouped.loc[df["mean_bin"]].set_index(df.index)
    norm = ((df["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy()
    finite = norm[~np.isnan(norm)]
    if finite.size:
        cut = np.sort(finite)[::-1][min(n_top, finite.size) - 1]
        hv = np.nan_to_num(norm, nan=-np.inf) >= cut
    else:
        hv = np.zeros(len(norm), dtype=bool)
    out = {k: np.zeros(stats.n_genes) for k in ("means", "dispersions", "dispersions_norm", "hv")}
    out["means"][expressed], out["dispersions"][expressed] = mean, disp
    out["dispersions_norm"][expressed], out["hv"][expressed] = norm, hv
    return out


class _quiet_nanmean:
    """Silence 'Mean of empty slice' for genes whose dispersion is NaN in every batch (kept NaN, sorted last)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

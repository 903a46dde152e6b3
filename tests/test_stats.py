"""Streaming gene statistics and batch-aware HVG selection, checked against scanpy on real counts."""
from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from loaders.errors import DataError
from loaders.selection import CellSelection
from loaders.sources import AnnDataSource, SomaExperimentSpec
from loaders.stats import compute_gene_stats, hvg_table, select_hvg

SEL = CellSelection(label_key="cell_type", batch_keys=("batch",))


@pytest.fixture(scope="module")
def kang(datasets_dir) -> ad.AnnData:
    a = ad.read_h5ad(datasets_dir / "kang2018_pbmc_ifnb_4samples.h5ad")
    a.var["feature_id"] = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    a.var["feature_name"] = a.var_names.astype(str)
    return a


@pytest.fixture(scope="module")
def kang_stats(kang):
    return compute_gene_stats(AnnDataSource(kang, SEL), io_batch_cells=300)


def _scanpy_hvg(adata: ad.AnnData, n_top: int):
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(b, flavor="seurat", n_top_genes=n_top, batch_key="batch")
    return b.var


@pytest.mark.parametrize("n_top", [200, 600])
def test_hvg_matches_scanpy_seurat_batched(kang, kang_stats, n_top):
    ref = _scanpy_hvg(kang, n_top)
    mine = select_hvg(kang_stats, n_top)
    assert len(mine) == n_top and np.all(np.diff(mine) > 0)
    overlap = len(set(mine) & set(np.flatnonzero(ref["highly_variable"].to_numpy()))) / n_top
    assert overlap >= 0.95, overlap
    table = hvg_table(kang_stats, n_top)
    np.testing.assert_array_equal(table["highly_variable_nbatches"].to_numpy(),
                                  ref["highly_variable_nbatches"].to_numpy())
    np.testing.assert_allclose(table["dispersions_norm"].to_numpy(), ref["dispersions_norm"].to_numpy(),
                               rtol=1e-4, atol=1e-4, equal_nan=True)


def test_stats_are_the_sums_they_claim(kang, kang_stats):
    x = sp.csr_matrix(kang.X, dtype=np.float64)
    lib = np.asarray(x.sum(axis=1)).ravel()
    logx = sp.diags(1e4 / lib) @ x
    logx.data = np.log1p(logx.data)
    for b, name in enumerate(kang_stats.batches):
        m = (kang.obs["batch"].astype(str) == name).to_numpy()
        assert kang_stats.n_cells_b[b] == m.sum()
        np.testing.assert_allclose(kang_stats.counts_bg[b], np.asarray(x[m].sum(axis=0)).ravel())
        np.testing.assert_array_equal(kang_stats.n_expressed_bg[b], np.asarray((x[m] > 0).sum(axis=0)).ravel())
        np.testing.assert_allclose(kang_stats.log_sum_bg[b], np.asarray(logx[m].sum(axis=0)).ravel(), rtol=1e-6)
        np.testing.assert_allclose(kang_stats.log_sumsq_bg[b], np.asarray(logx[m].power(2).sum(axis=0)).ravel(),
                                   rtol=1e-6)
    assert kang_stats.n_cells == kang.n_obs
    assert kang_stats.library_median == pytest.approx(np.median(lib))  # exact below the reservoir size
    assert kang_stats.library_min == lib.min() and kang_stats.library_max == lib.max()


def test_io_batch_size_does_not_change_results(kang, kang_stats):
    other = compute_gene_stats(AnnDataSource(kang, SEL), io_batch_cells=1000)
    np.testing.assert_allclose(other.cp10k_sumsq_bg, kang_stats.cp10k_sumsq_bg, rtol=1e-9)
    np.testing.assert_array_equal(select_hvg(other, 300), select_hvg(kang_stats, 300))


def test_stats_from_soma_equal_stats_in_memory(kang, kang_stats, tmp_path):
    import tiledbsoma.io

    uri = str(tmp_path / "kang_soma")
    tiledbsoma.io.from_anndata(uri, kang, measurement_name="RNA", X_layer_name="raw")
    src = SomaExperimentSpec(uri, SEL).open()
    try:
        soma_stats = compute_gene_stats(src, io_batch_cells=256)
    finally:
        src.close()
    assert soma_stats.batches == kang_stats.batches
    for name in ("n_cells_b", "n_expressed_bg", "counts_bg", "log_sum_bg", "log_sumsq_bg", "cp10k_sum_bg"):
        np.testing.assert_allclose(getattr(soma_stats, name), getattr(kang_stats, name), rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(select_hvg(soma_stats, 500), select_hvg(kang_stats, 500))


def test_library_quantiles_from_bounded_reservoir(kang):
    est = compute_gene_stats(AnnDataSource(kang, SEL), io_batch_cells=200, reservoir=400)
    lib = np.asarray(kang.X.sum(axis=1)).ravel()
    assert est.library_sizes.size == 400
    assert set(est.library_sizes) <= set(lib)
    assert abs(est.library_median - np.median(lib)) / np.median(lib) < 0.15


def test_all_genes_when_n_top_exceeds_gene_count(kang_stats):
    np.testing.assert_array_equal(select_hvg(kang_stats, 10_000), np.arange(kang_stats.n_genes))


def test_non_count_data_rejected(kang):
    b = kang.copy()
    b.X = sp.csr_matrix(b.X, dtype=np.float32)
    b.X.data = np.log1p(b.X.data)
    with pytest.raises(DataError, match="non-integer"):
        compute_gene_stats(AnnDataSource(b, SEL), io_batch_cells=500)

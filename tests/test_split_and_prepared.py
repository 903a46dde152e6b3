"""The validation split at atlas scale (rare types keep cells, whole donors held out), the global batch, and
the run's stored preparation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loaders.normalize import Normalization
from scpermut_dist.config import DataConfig
from scpermut_dist.errors import UsageError
from scpermut_dist.train.prepared import PreparedArrays, fingerprint, load_prepared, save_prepared
from scpermut_dist.train.reference import per_rank_batch_size
from scpermut_dist.train.split import group_split, stratified_split


def test_rare_types_keep_validation_cells_when_the_cap_scales_the_fraction_down():
    labels = np.concatenate([np.zeros(200_000, np.int64), np.ones(60, np.int64), np.full(3, 2)])
    _, plain = stratified_split(labels, 0.2, max_val=2_000, seed=0)
    assert (labels[plain] == 1).sum() == 1  # 2000/200063 of 60 cells rounds to ~0-1: the rare type vanishes
    _, kept = stratified_split(labels, 0.2, max_val=2_000, seed=0, min_per_class=10)
    assert (labels[kept] == 1).sum() == 10 and (labels[kept] == 2).sum() == 1  # 20 % of 3 cells, never all
    assert (labels[kept] == 0).sum() == pytest.approx(2_000, abs=5)


def test_a_split_by_group_holds_out_whole_donors():
    rng = np.random.default_rng(0)
    donors = np.repeat(np.arange(10), 100)
    labels = rng.integers(0, 4, size=1000)
    labels[::17] = -1
    train, val = group_split(labels, donors, fraction=0.2, seed=1)
    assert not set(donors[train]) & set(donors[val])
    labelled = labels >= 0
    target = 0.2 * labelled.sum()
    held = np.unique(donors[val])
    per_donor = np.array([(labelled & (donors == d)).sum() for d in held])
    assert len(val) == per_donor.sum()  # whole donors: every labelled cell of a held-out donor (no max_val)
    assert len(val) >= target  # at least the requested fraction of labelled cells
    # groups are taken one by one until the fraction is reached: without the last one taken it falls short
    # (whichever held-out donor came last, removing the largest one falls short too)
    assert len(held) >= 2 and len(val) - per_donor.max() < target
    assert (labels[np.concatenate([train, val])] >= 0).all()
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_split(labels, np.zeros(1000, np.int64))


def test_the_batch_size_is_global_whatever_the_worker_count():
    assert [per_rank_batch_size(430, w) for w in (1, 2, 5)] == [430, 215, 86]
    with pytest.raises(UsageError, match="at least 16"):
        per_rank_batch_size(10, 8)


def _arrays(fp: str) -> PreparedArrays:
    n = 50
    return PreparedArrays(pd.DataFrame({"feature_id": ["G1", "G2"], "feature_name": ["a", "b"]}),
                          Normalization(1234.0), ["t0", "t1"], ["b0"], {"n_cells": n},
                          np.arange(n, dtype=np.int32) % 2, np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                          np.arange(n, dtype=np.int32) // 8, np.arange(n, dtype=np.int64) * 3, fp)


def test_the_preparation_is_stored_once_and_refused_for_other_data(tmp_path):
    data = DataConfig(label_key="cell_type", batch_keys=["donor"])
    fp = fingerprint("store_a", data)
    assert fp == fingerprint("store_a", data.model_copy(update={"val_fraction": 0.1}))  # the split is not preparation
    assert fp != fingerprint("store_b", data) != fingerprint("store_a", data.model_copy(update={"n_hvg": 10}))
    assert load_prepared(tmp_path / "prepared", fp) is None
    save_prepared(_arrays(fp), tmp_path / "prepared")
    back = load_prepared(tmp_path / "prepared", fp)
    assert back.classes == ["t0", "t1"] and back.normalization.target_sum == 1234.0
    assert np.array_equal(back.joinids, np.arange(50) * 3) and back.label_codes.dtype == np.int32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(UsageError, match="prepared for other data"):
        load_prepared(tmp_path / "prepared", fingerprint("store_b", data))


def test_a_rank_reads_counts_on_shared_joinids_without_reading_obs(census_store_3k):
    from loaders.selection import CellSelection
    from loaders.sources import spec_from_uri

    spec = spec_from_uri(str(census_store_3k), CellSelection(obs_value_filter="tissue_general == 'lung'",
                                                             label_key="cell_type"))
    full = spec.open()
    joinids = full.obs["soma_joinid"].to_numpy()
    joinids.flags.writeable = False  # shared memory is read-only
    rank = spec.open(joinids=joinids)
    assert list(rank.obs.columns) == ["soma_joinid"] and rank.n_cells == full.n_cells
    assert np.shares_memory(rank.obs["soma_joinid"].to_numpy(), joinids)
    rows = np.arange(0, full.n_cells, 3)
    assert (rank.read_counts(rows) != full.read_counts(rows)).nnz == 0
    assert np.array_equal(rank.chunk_ids(), full.chunk_ids())
    full.close(), rank.close()


def test_validation_by_batch_scores_the_model_on_a_plate_it_never_trained_on(datasets_dir):
    from model_data import cellbench_sng, tiny_config

    from scpermut_dist.api import fit

    adata = cellbench_sng(datasets_dir)
    ref = fit(adata, "cell_line", "batch", tiny_config("train.max_epochs=2", "data.val_split=batch"))
    n_val = ref.metrics["n_val_cells"]
    plates = adata.obs["batch"].value_counts()
    assert n_val in set(plates.tolist())  # exactly one whole plate held out
    assert ref.summary["n_train_cells"] == adata.n_obs - n_val


def test_qc_keys_leave_out_the_cells_and_genes_they_name(datasets_dir):
    """data.min_counts_per_cell / min_genes_per_cell / min_cells_per_gene on real counts, against numpy: failing
    cells are never trained on (code -1, not in `cells`), a type that QC removes entirely is not a class, every
    kept gene is expressed in enough kept cells, and a threshold nothing passes is a clear error."""
    import scipy.sparse as sp
    from model_data import cellbench_sng

    from loaders.errors import DataError
    from loaders.sources import AnnDataSource
    from scpermut_dist.config import RunConfig
    from scpermut_dist.train.preprocess import prepare_reference

    a = cellbench_sng(datasets_dir)
    x = sp.csr_matrix(a.X)
    lib, n_genes = np.asarray(x.sum(axis=1)).ravel(), np.diff(x.indptr)
    min_counts, min_genes = int(np.percentile(lib, 20)), int(np.percentile(n_genes, 30))
    lost_type = a.obs["cell_line"].astype(str).value_counts().index[-1]
    x = x.tolil()
    for i in np.flatnonzero(a.obs["cell_line"].astype(str).to_numpy() == lost_type):
        x[i, :] = 0
        x[i, 0] = 1  # one count in one gene: below both thresholds
    a.X = x.tocsr()
    lib, n_genes = np.asarray(a.X.sum(axis=1)).ravel(), np.diff(a.X.indptr)
    data = RunConfig().apply_overrides([
        "data.label_key=cell_line", "data.batch_keys=batch", "data.n_hvg=100000",
        f"data.min_counts_per_cell={min_counts}", f"data.min_genes_per_cell={min_genes}",
        "data.min_cells_per_gene=25"]).data
    prep = prepare_reference(lambda sel: AnnDataSource(a, sel), data)
    keep = (lib >= min_counts) & (n_genes >= min_genes)
    np.testing.assert_array_equal(prep.cells, np.flatnonzero(keep))
    assert (prep.label_codes[~keep] == -1).all() and (prep.label_codes[keep] >= 0).all()
    assert lost_type not in prep.classes and len(prep.classes) == a.obs["cell_line"].nunique() - 1
    expressing = np.asarray((a.X[keep] > 0).sum(axis=0)).ravel()
    gene_pos = pd.Index(a.var_names).get_indexer(prep.genes["feature_name"])
    np.testing.assert_array_equal(np.sort(gene_pos), np.flatnonzero(expressing >= 25))
    with pytest.raises(DataError, match="no cell passes QC"):
        prepare_reference(lambda sel: AnnDataSource(a, sel),
                          data.model_copy(update={"min_counts_per_cell": int(lib.max()) + 1}))

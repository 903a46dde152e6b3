"""The synthetic atlases: Census schema, dataset grouping, rare types, sparsity, duplicates, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from loaders.errors import DataError
from loaders.synth import synthesize_anndata, synthesize_census
from loaders.synth_model import Design

CENSUS_OBS = ("soma_joinid, dataset_id, assay, assay_ontology_term_id, cell_type, cell_type_ontology_term_id, "
              "development_stage, development_stage_ontology_term_id, disease, disease_ontology_term_id, donor_id, "
              "is_primary_data, observation_joinid, self_reported_ethnicity, self_reported_ethnicity_ontology_term_id, "
              "sex, sex_ontology_term_id, suspension_type, tissue, tissue_ontology_term_id, tissue_type, "
              "tissue_general, tissue_general_ontology_term_id, raw_sum, nnz, raw_mean_nnz, raw_variance_nnz, "
              "n_measured_vars").split(", ")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("synth") / "census")
    summary = synthesize_census(uri, 8000, 2100, seed=5, n_datasets=8, chunk_cells=3000, normalized=True,
                                mouse_cells=120)
    return uri, summary


@pytest.fixture(scope="module")
def human(store):
    uri, _ = store
    with soma.open(f"{uri}/census_data/homo_sapiens") as exp:
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
        x = sp.csr_matrix((t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())),
                          shape=(len(obs), len(var)))
        tn = exp.ms["RNA"].X["normalized"].read().tables().concat()
        presence = exp.ms["RNA"]["feature_dataset_presence_matrix"].read().tables().concat()
    return obs.sort_values("soma_joinid").reset_index(drop=True), var, x, tn, presence


def test_census_schema(store, human):
    uri, summary = store
    obs, var, x, tn, presence = human
    assert list(obs.columns) == CENSUS_OBS
    assert {"feature_id", "feature_name", "feature_length", "nnz", "n_measured_obs"} <= set(var.columns)
    assert var["feature_id"].str.match(r"ENSG\d{11}$").all() and var["feature_name"].is_unique
    assert x.dtype == np.float32 and np.all(x.data == np.round(x.data)) and x.data.min() > 0
    with soma.open(uri) as root:
        assert set(root.keys()) == {"census_info", "census_data"}
        assert set(root["census_info"].keys()) == {"summary", "datasets", "summary_cell_counts", "organisms"}
        assert set(root["census_data"].keys()) == {"homo_sapiens", "mus_musculus"}
        datasets = root["census_info"]["datasets"].read().concat().to_pandas()
    assert set(obs["dataset_id"].astype(str)) <= set(datasets["dataset_id"])
    assert summary["nnz"] == x.nnz
    # per-cell and per-gene summaries agree with X
    np.testing.assert_allclose(obs["raw_sum"], np.asarray(x.sum(axis=1)).ravel())
    np.testing.assert_array_equal(obs["nnz"], np.diff(x.indptr))
    np.testing.assert_array_equal(var["nnz"], np.bincount(x.indices, minlength=x.shape[1]))
    # normalized = raw / row sum, on the same coordinates
    assert tn.num_rows == x.nnz
    np.testing.assert_allclose(np.bincount(tn["soma_dim_0"].to_numpy(), weights=tn["soma_data"].to_numpy()), 1.0,
                               rtol=1e-4)
    # a gene a dataset did not measure has no counts there
    measured = sp.csr_matrix((np.ones(presence.num_rows), (presence["soma_dim_0"].to_numpy(),
                                                           presence["soma_dim_1"].to_numpy())))
    ds_codes = obs["dataset_id"].astype(str).map({d: i for i, d in enumerate(datasets["dataset_id"])}).to_numpy()
    for k in np.unique(ds_codes):
        absent = np.flatnonzero(measured[k].toarray().ravel()[: x.shape[1]] == 0)
        assert x[ds_codes == k][:, absent].nnz == 0
        assert (obs["n_measured_vars"][ds_codes == k] == x.shape[1] - len(absent)).all()


def test_rows_grouped_by_dataset_and_donor(human):
    obs = human[0]
    def contiguous(codes: np.ndarray) -> bool:
        return 1 + np.count_nonzero(codes[1:] != codes[:-1]) == len(set(codes))

    assert contiguous(obs["dataset_id"].astype(str).to_numpy())
    for _, cells in obs.groupby("dataset_id", observed=True):  # donors are blocks within a dataset
        assert contiguous(cells["donor_id"].astype(str).to_numpy())
    donors_per_ds = obs.groupby("dataset_id", observed=True)["donor_id"].nunique()
    assert donors_per_ds.max() > 1 and obs["assay"].nunique() > 1 and obs["tissue_general"].nunique() > 2


def test_duplicates_are_secondary_copies(human):
    obs, _, x, _, _ = human
    dup = ~obs["is_primary_data"].to_numpy()
    assert 0 < dup.mean() < 0.25
    first = {j: i for i, j in reversed(list(enumerate(obs["observation_joinid"][~dup])))}
    primary_rows = np.flatnonzero(~dup)
    for i in np.flatnonzero(dup)[:50]:
        src = primary_rows[first[obs["observation_joinid"][i]]]
        assert obs["dataset_id"][i] != obs["dataset_id"][src]
        assert obs["cell_type"][i] == obs["cell_type"][src]
        np.testing.assert_array_equal(x[i].toarray(), x[src].toarray())


def test_cell_type_frequencies_and_sparsity():
    a = synthesize_anndata(20000, 2000, seed=0)
    frac = a.obs["cell_type"].value_counts(normalize=True)
    frac = frac[frac > 0]
    assert frac.max() > 0.1 and (frac < 0.001).sum() >= 2 and ((frac >= 0.001) & (frac < 0.01)).sum() >= 2
    zeros = 1 - a.X.nnz / np.prod(a.shape)
    assert 0.85 <= zeros <= 0.95, zeros
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert np.quantile(lib, 0.95) / np.quantile(lib, 0.05) > 4  # log-normal spread of library sizes
    assert list(a.obs.columns[:5]) == ["cell_type", "dataset_id", "donor_id", "assay", "tissue_general"]
    assert "batch" in a.obs and a.var["feature_id"].str.startswith("ENSG").all()
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32


def test_types_are_learnable_and_batches_shift_expression():
    a = synthesize_anndata(4000, 400, seed=2, n_batches=3)
    x = a.X.toarray()
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    y = a.obs["cell_type"].astype(str).to_numpy()
    common = a.obs["cell_type"].value_counts()
    classes = np.array(common[common >= 30].index, dtype=str)
    train = np.arange(len(y)) % 2 == 0
    test = ~train & np.isin(y, classes)
    centroids = np.stack([x[train & (y == c)].mean(axis=0) for c in classes])
    dist = ((x[test][:, None, :] - centroids[None]) ** 2).sum(axis=2)
    assert (classes[dist.argmin(axis=1)] == y[test]).mean() > 0.8  # a nearest-centroid rule already works
    # the same cell type differs between batches (multiplicative gene-wise shifts)
    t = common.index[0]
    means = [x[(y == t) & (a.obs["batch"] == b).to_numpy()].mean(axis=0) for b in a.obs["batch"].cat.categories]
    assert np.abs(means[0] - means[1]).mean() > 0.05


def test_deterministic_and_independent_of_chunking(tmp_path):
    a, b = synthesize_anndata(1500, 100, seed=4), synthesize_anndata(1500, 100, seed=4)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert (a.X != synthesize_anndata(1500, 100, seed=5).X).nnz > 0
    reads = []
    for chunk in (500, 1500):
        uri = tmp_path / f"c{chunk}"
        synthesize_census(uri, 1500, 2300, seed=4, n_datasets=3, chunk_cells=chunk, mouse_cells=0)
        with soma.open(f"{uri}/census_data/homo_sapiens") as exp:
            t = exp.ms["RNA"].X["raw"].read().tables().concat()
        reads.append(sp.csr_matrix((t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(),
                                                               t["soma_dim_1"].to_numpy())), shape=(1500, 2300)))
    assert (reads[0] != reads[1]).nnz == 0
    design = Design(1500, 2300, seed=4, n_datasets=3)
    direct = design.counts_csr(design.cells(0, 1500))
    assert (reads[0] != direct).nnz == 0


def test_refuses_existing_destination_and_leaves_nothing(tmp_path):
    dest = tmp_path / "store"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="already exists"):
        synthesize_census(dest, 100, 50)
    with pytest.raises(DataError, match="n_genes"):
        synthesize_census(tmp_path / "other", 100, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_cli_synth(tmp_path, capsys):
    from scpermut_dist.commands.main import main

    out = tmp_path / "cli_store"
    assert main(["synth", "--cells", "600", "--genes", "80", "--out", str(out), "--seed", "1", "--datasets", "3",
                 "--quiet"]) == 0
    assert '"n_cells": 600' in capsys.readouterr().out
    with soma.open(str(out / "census_data" / "homo_sapiens")) as exp:
        assert exp.obs.count == 600
    assert main(["synth", "--cells", "600", "--genes", "80", "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_one_tissue_design_shares_types_across_batches():
    """n_tissues=1 models a multi-donor study: batches differ by technical effects, not by which types they hold."""
    import pandas as pd

    from loaders.synth import synthesize_anndata

    atlas = synthesize_anndata(4000, 200, seed=2, n_batches=4)
    study = synthesize_anndata(4000, 200, seed=2, n_batches=4, n_tissues=1, rare_fracs=(0.004, 0.008))
    assert study.obs["tissue_general"].nunique() == 1 and atlas.obs["tissue_general"].nunique() > 1
    shared = pd.crosstab(study.obs["cell_type"], study.obs["batch"]).gt(0).all(axis=1).mean()
    shared_atlas = pd.crosstab(atlas.obs["cell_type"], atlas.obs["batch"]).gt(0).all(axis=1).mean()
    assert shared > 0.8 and shared > shared_atlas
    freq = study.obs["cell_type"].value_counts(normalize=True)
    assert ((freq > 0.001) & (freq < 0.01)).sum() >= 2  # the planted rare types


def test_rare_subtypes_share_their_parents_program():
    """rare_subtype_markers makes each planted rare type its parent's program plus a few markers (confusable),
    without changing anything else in the design."""
    from loaders.synth_model import Design

    plain = Design(4000, 500, seed=3, n_tissues=1, rare_fracs=(0.004, 0.008))
    sub = Design(4000, 500, seed=3, n_tissues=1, rare_fracs=(0.004, 0.008), rare_subtype_markers=0.01)
    assert plain.rare_parent == {} and len(sub.rare_parent) == 2
    idx = {t: i for i, t in enumerate(sub.cell_types)}
    for rare, parent in sub.rare_parent.items():
        diff = sub.type_eff[idx[rare]] - sub.type_eff[idx[parent]]
        assert 0 < (diff != 0).sum() < 0.05 * 500 and diff.min() >= 0  # a few up-markers, nothing else
        d_plain = plain.type_eff[idx[rare]] - plain.type_eff[idx[parent]]
        assert (d_plain != 0).all()  # the default draws an independent program
    common = slice(0, len(sub.cell_types) - 2)
    np.testing.assert_array_equal(sub.type_eff[common], plain.type_eff[common])
    np.testing.assert_array_equal(sub.ds_eff, plain.ds_eff)

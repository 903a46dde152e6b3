"""Sources on real stores: a synthesized Census-shaped collection opened through the real
`cellxgene_census.open_soma`, the bare SOMA Experiment inside it, and h5ad files (in memory and backed)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from loaders.errors import DataError
from loaders.selection import CellSelection
from loaders.sources import (
    AnnDataSource,
    CensusSpec,
    H5adSpec,
    SomaExperimentSpec,
    spec_from_uri,
)
from loaders.synth import synthesize_anndata, synthesize_census

LUNG = "is_primary_data == True and tissue_general == 'lung'"
BATCH = ("dataset_id", "assay", "donor_id")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("census") / "census")
    synthesize_census(uri, 6000, 300, seed=3, n_datasets=5, mouse_cells=150, chunk_cells=2500)
    return uri


@pytest.fixture(scope="module")
def exp_uri(store) -> str:
    return f"{store}/census_data/homo_sapiens"


@pytest.fixture(scope="module")
def var(exp_uri):
    with soma.open(exp_uri) as exp:
        return exp.ms["RNA"].var.read().concat().to_pandas()


def _reference(exp_uri: str, value_filter: str, var_ids: np.ndarray):
    """The same selection through tiledbsoma's own axis query, as an AnnData."""
    with soma.open(exp_uri) as exp:
        q = exp.axis_query("RNA", obs_query=soma.AxisQuery(value_filter=value_filter),
                           var_query=soma.AxisQuery(coords=(var_ids,)))
        a = q.to_anndata("raw")
    order = np.argsort(a.obs["soma_joinid"].to_numpy(), kind="stable")
    a = a[order]
    pos = {j: i for i, j in enumerate(a.var["soma_joinid"].to_numpy())}
    return a[:, [pos[j] for j in var_ids]].copy()


def test_census_lung_query_by_feature_id(store, exp_uri, var):
    genes = var["feature_id"].to_numpy()[[250, 3, 77, 120, 9]]
    sel = CellSelection(obs_value_filter=LUNG, label_key="cell_type", batch_keys=BATCH, genes=tuple(genes))
    src = CensusSpec(uri=store, selection=sel).open()
    try:
        ref = _reference(exp_uri, LUNG, var["soma_joinid"].to_numpy()[[250, 3, 77, 120, 9]])
        assert src.n_cells == ref.n_obs > 100 and src.n_genes == 5
        assert list(src.var["feature_id"]) == list(genes)
        np.testing.assert_array_equal(src.obs["soma_joinid"], ref.obs["soma_joinid"])
        expected_batch = (ref.obs["dataset_id"].astype(str) + "+" + ref.obs["assay"].astype(str) + "+"
                          + ref.obs["donor_id"].astype(str))
        assert list(src.obs["batch"]) == list(expected_batch)
        assert list(src.obs["label"]) == list(ref.obs["cell_type"].astype(str))
        rows = np.sort(np.random.default_rng(0).choice(src.n_cells, 60, replace=False))
        got = src.read_counts(rows)
        assert isinstance(got, sp.csr_matrix) and got.dtype == np.float32 and got.shape == (60, 5)
        np.testing.assert_array_equal(got.toarray(), sp.csr_matrix(ref.X)[rows].toarray())
        np.testing.assert_array_equal(src.chunk_ids(), ref.obs["soma_joinid"].to_numpy() // 2048)
    finally:
        src.close()


def test_gene_selection_by_symbol_equals_by_id(store, var):
    pick = [10, 200, 5]
    by_id = CensusSpec(uri=store, selection=CellSelection(genes=tuple(var["feature_id"].to_numpy()[pick]))).open()
    by_name = CensusSpec(uri=store, selection=CellSelection(genes=tuple(var["feature_name"].to_numpy()[pick]))).open()
    rows = np.arange(0, by_id.n_cells, 97)
    np.testing.assert_array_equal(by_id.read_counts(rows).toarray(), by_name.read_counts(rows).toarray())
    assert list(by_name.var["feature_name"]) == list(var["feature_name"].to_numpy()[pick])
    by_id.close()
    by_name.close()


def test_experiment_source_matches_census_and_pickles(store, exp_uri):
    sel = CellSelection(obs_value_filter="is_primary_data == True", label_key="cell_type", batch_keys=("donor_id",))
    census = CensusSpec(uri=store, selection=sel).open()
    spec = SomaExperimentSpec(exp_uri, sel, init_buffer_bytes=16 * 1024**2)
    exp = spec.open()
    assert exp.n_cells == census.n_cells and exp.n_genes == census.n_genes == 300
    rows = np.arange(10, exp.n_cells, 211)
    np.testing.assert_array_equal(exp.read_counts(rows).toarray(), census.read_counts(rows).toarray())
    clone = pickle.loads(pickle.dumps(exp))  # reopens from its spec, as a DataLoader worker would
    np.testing.assert_array_equal(clone.read_counts(rows).toarray(), exp.read_counts(rows).toarray())
    assert pickle.loads(pickle.dumps(spec)) == spec
    for s in (census, exp, clone):
        s.close()


def test_mouse_organism(store):
    src = CensusSpec(uri=store, organism="Mus musculus").open()
    assert src.n_cells == 150 and src.var["feature_id"].str.startswith("ENSMUSG").all()
    src.close()


def test_h5ad_backed_and_in_memory_match_anndata(tmp_path):
    a = synthesize_anndata(3000, 200, seed=1, n_batches=3)
    path = tmp_path / "ref.h5ad"
    a.write_h5ad(path)
    sel = CellSelection(obs_value_filter="batch != 'batch_1'", label_key="cell_type", batch_keys=("batch", "donor_id"),
                        genes=tuple(a.var_names[[7, 150, 2]]))
    mem, backed = AnnDataSource(a, sel), H5adSpec(str(path), sel, backed=True).open()
    rows = np.sort(np.random.default_rng(0).choice(mem.n_cells, 500, replace=False))
    for src in (H5adSpec(str(path), sel, backed=False).open(), backed, pickle.loads(pickle.dumps(backed))):
        assert src.n_cells == mem.n_cells
        assert list(src.obs["batch"]) == list(mem.obs["batch"])
        np.testing.assert_array_equal(src.read_counts(rows).toarray(), mem.read_counts(rows).toarray())
        src.close()


def test_spec_from_uri_detects_each_kind(store, exp_uri, tmp_path):
    path = tmp_path / "a.h5ad"
    synthesize_anndata(200, 50, seed=0).write_h5ad(path)
    assert isinstance(spec_from_uri(str(path)), H5adSpec)
    assert isinstance(spec_from_uri(store), CensusSpec)
    assert isinstance(spec_from_uri(exp_uri, layer="raw"), SomaExperimentSpec)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for bad in (tmp_path / "empty_dir", tmp_path / "notes.txt", tmp_path / "missing"):
        with pytest.raises(DataError, match="not an h5ad file nor a SOMA Experiment/Census"):
            spec_from_uri(str(bad))
    with pytest.raises(DataError, match="not an h5ad file nor a SOMA"):
        spec_from_uri(f"{store}/census_info")  # a SOMA Collection, but neither kind


@pytest.mark.parametrize("selection, match", [
    (CellSelection(label_key="cell_type_label"), "no column"),
    (CellSelection(batch_keys=("dataset_id", "batchy")), "no column"),
    (CellSelection(obs_value_filter="tissue_general == 'pancreas'"), "matches no cell"),
    (CellSelection(genes=("ENSG99999999999", "NOT_A_GENE")), "not in the atlas"),
    (CellSelection(obs_value_filter="no_such_column == 3"), "obs_value_filter"),
])
def test_bad_selections_give_clear_errors(store, selection, match):
    with pytest.raises(DataError, match=match):
        CensusSpec(uri=store, selection=selection).open()


def test_wrong_kinds_of_store_give_clear_errors(store, exp_uri, tmp_path):
    with pytest.raises(DataError, match="SomaExperimentSpec"):
        CensusSpec(uri=exp_uri).open()  # a bare Experiment given to the Census path
    with pytest.raises(DataError, match="Census collection"):
        SomaExperimentSpec(store).open()  # the Census root given to the Experiment path
    with pytest.raises(DataError, match="does not exist or is not a SOMA object"):
        SomaExperimentSpec(str(tmp_path / "nothing")).open()
    with pytest.raises(DataError, match="no X layer 'counts'"):
        SomaExperimentSpec(exp_uri, layer="counts").open()
    with pytest.raises(DataError, match="no measurement 'ATAC'"):
        CensusSpec(uri=store, measurement="ATAC").open()
    with pytest.raises(DataError, match="no organism 'danio_rerio'"):
        CensusSpec(uri=store, organism="Danio rerio").open()


def test_bad_h5ad_inputs(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        H5adSpec(str(tmp_path / "missing.h5ad")).open()
    (tmp_path / "fake.h5ad").write_text("not hdf5")
    with pytest.raises(DataError, match="not an h5ad file"):
        H5adSpec(str(tmp_path / "fake.h5ad")).open()
    a = synthesize_anndata(300, 40, seed=0)
    a[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    a[:, :0].copy().write_h5ad(tmp_path / "nogenes.h5ad")
    a.write_h5ad(tmp_path / "ok.h5ad")
    for backed in (False, True):
        with pytest.raises(DataError, match="no cells"):
            H5adSpec(str(tmp_path / "empty.h5ad"), backed=backed).open()
        with pytest.raises(DataError, match="no genes"):
            H5adSpec(str(tmp_path / "nogenes.h5ad"), backed=backed).open()
        with pytest.raises(DataError, match="no column"):
            H5adSpec(str(tmp_path / "ok.h5ad"), CellSelection(label_key="celltype"), backed=backed).open()
        with pytest.raises(DataError, match="matches no cell"):
            H5adSpec(str(tmp_path / "ok.h5ad"), CellSelection(obs_value_filter="batch == 'nope'"),
                     backed=backed).open()
        with pytest.raises(DataError, match="not in the atlas"):
            H5adSpec(str(tmp_path / "ok.h5ad"), CellSelection(genes=("XIST",)), backed=backed).open()
        with pytest.raises(DataError, match="layer"):
            H5adSpec(str(tmp_path / "ok.h5ad"), layer="counts", backed=backed).open()
    logged = a.copy()
    logged.X.data = np.log1p(logged.X.data)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    with pytest.raises(DataError, match="non-integer"):
        H5adSpec(str(tmp_path / "logged.h5ad")).open()

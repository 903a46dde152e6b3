"""h5ad -> SOMA ingest: round trip of counts/obs/var, validation, atomicity and the CLI."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from loaders.errors import DataError
from loaders.ingest import ingest_h5ad
from loaders.selection import CellSelection
from loaders.sources import SomaExperimentSpec, spec_from_uri


@pytest.fixture(scope="module")
def kang(datasets_dir) -> ad.AnnData:
    a = ad.read_h5ad(datasets_dir / "kang2018_pbmc_ifnb_4samples.h5ad")
    a.obs.loc[a.obs.index[:7], "cell_type"] = np.nan  # unlabelled cells must stay unlabelled
    a.obs["score"] = np.linspace(0, 1, a.n_obs)
    a.layers["counts"] = a.X.copy()
    a.X = a.X.copy()
    a.X.data = np.log1p(a.X.data)  # X normalised, counts in a layer: a common layout
    return a


def _read_x(uri: str, shape) -> sp.csr_matrix:
    with soma.open(uri) as exp:
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
    return sp.csr_matrix((t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())),
                         shape=shape)


@pytest.mark.parametrize("chunk", [300, None])
def test_round_trip(kang, tmp_path, chunk):
    path, store = tmp_path / "kang.h5ad", tmp_path / "store"
    kang.write_h5ad(path)
    summary = ingest_h5ad(path, store, layer="counts", chunk_cells=chunk, progress=False)
    assert summary["n_cells"] == kang.n_obs and summary["nnz"] == kang.layers["counts"].nnz
    x = _read_x(str(store), kang.shape)
    assert (x != kang.layers["counts"]).nnz == 0
    with soma.open(str(store)) as exp:
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
    assert list(obs["obs_name"]) == list(kang.obs_names)
    assert list(obs["cell_type"].astype(object).where(obs["cell_type"].notna(), None)) == \
        list(kang.obs["cell_type"].astype(object).where(kang.obs["cell_type"].notna(), None))
    np.testing.assert_allclose(obs["score"], kang.obs["score"])
    np.testing.assert_allclose(obs["raw_sum"], np.asarray(kang.layers["counts"].sum(axis=1)).ravel())
    np.testing.assert_array_equal(obs["nnz"], np.diff(sp.csr_matrix(kang.layers["counts"]).indptr))
    assert list(var["feature_name"]) == list(kang.var_names) and var["feature_id"].notna().all()
    # the store is a source like any other, and spec_from_uri recognises it
    spec = spec_from_uri(str(store), CellSelection(label_key="cell_type", batch_keys=("batch",)))
    assert isinstance(spec, SomaExperimentSpec)
    src = spec.open()
    assert src.obs["label"].isna().sum() == 7
    rows = np.arange(0, kang.n_obs, 13)
    np.testing.assert_array_equal(src.read_counts(rows).toarray(), kang.layers["counts"][rows].toarray())
    src.close()


def test_dense_and_csc_inputs(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.5, size=(700, 30)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b"], 700)}, index=[f"c{i}" for i in range(700)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(30)])
    for name, x in (("dense", counts), ("csc", sp.csc_matrix(counts))):
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(tmp_path / f"{name}.h5ad")
        ingest_h5ad(tmp_path / f"{name}.h5ad", tmp_path / f"{name}_store", chunk_cells=256, progress=False)
        np.testing.assert_array_equal(_read_x(str(tmp_path / f"{name}_store"), counts.shape).toarray(), counts)


def test_bad_counts_rejected_without_partial_store(kang, tmp_path):
    path = tmp_path / "kang.h5ad"
    kang.write_h5ad(path)
    with pytest.raises(DataError, match="non-integer"):
        ingest_h5ad(path, tmp_path / "store", chunk_cells=500, progress=False)  # X is log-normalised
    bad = kang.copy()
    bad.layers["counts"] = bad.layers["counts"].copy()
    bad.layers["counts"].data[-5] = -3  # in the last chunk: earlier chunks were already written
    bad.write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(DataError, match="negative"):
        ingest_h5ad(tmp_path / "neg.h5ad", tmp_path / "store", layer="counts", chunk_cells=500, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kang.h5ad", "neg.h5ad"]


def test_bad_paths(kang, tmp_path):
    path = tmp_path / "kang.h5ad"
    kang.write_h5ad(path)
    with pytest.raises(DataError, match="file not found"):
        ingest_h5ad(tmp_path / "nope.h5ad", tmp_path / "s1", progress=False)
    (tmp_path / "text.h5ad").write_text("hello")
    with pytest.raises(DataError, match="not an h5ad"):
        ingest_h5ad(tmp_path / "text.h5ad", tmp_path / "s1", progress=False)
    with pytest.raises(DataError, match="layers"):
        ingest_h5ad(path, tmp_path / "s1", layer="raw_counts", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DataError, match="already exists"):
        ingest_h5ad(path, tmp_path / "full", layer="counts", progress=False)


def test_cli_ingest(kang, tmp_path, capsys):
    from scpermut_dist.commands.main import main

    path = tmp_path / "kang.h5ad"
    kang.write_h5ad(path)
    assert main(["ingest", str(path), str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "non-integer" in err and "--layer" in err
    assert not (tmp_path / "bad").exists()
    assert main(["ingest", str(path), str(tmp_path / "ok"), "--layer", "counts", "--quiet"]) == 0
    assert (_read_x(str(tmp_path / "ok"), kang.shape) != kang.layers["counts"]).nnz == 0

"""`scpermut map` on a SOMA Experiment (ingested Kang data) and a Census-shaped collection, streamed in chunks.

The streamed result must equal mapping the same cells from an h5ad; only the filtered cells appear, keyed
by soma_joinid; a bad filter is a clear error that writes nothing.
"""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from model_data import tiny_config

from loaders.errors import DataError
from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.stream import map_store

KANG = "kang2018_pbmc_ifnb_4samples.h5ad"
STIM = "condition == 'stim'"


@pytest.fixture(scope="module")
def kang(datasets_dir, tmp_path_factory):
    """(reference folder, SOMA Experiment ingested from the Kang file, the Kang AnnData)."""
    from loaders.ingest import ingest_h5ad

    d = tmp_path_factory.mktemp("kang")
    adata = ad.read_h5ad(datasets_dir / KANG)
    ingest_h5ad(datasets_dir / KANG, d / "store", progress=False)
    ref = d / "ref"
    fit(adata[adata.obs["condition"] == "ctrl"].copy(), "cell_type", "batch",
        tiny_config("train.num_threads=1", "train.max_epochs=1")).save(ref)
    return ref, d / "store", adata


@pytest.fixture(scope="module")
def census(census_store_3k, tmp_path_factory):
    """(reference trained on the Census-shaped store's cells, one dataset_id, that dataset's cells as AnnData)."""
    import cellxgene_census

    with cellxgene_census.open_soma(uri=str(census_store_3k)) as c:
        train = cellxgene_census.get_anndata(c, "Homo sapiens", column_names={"obs": ["cell_type", "dataset_id"]})
        dataset = str(train.obs["dataset_id"].value_counts().index[-1])
        query = cellxgene_census.get_anndata(c, "Homo sapiens", obs_value_filter=f"dataset_id == '{dataset}'",
                                             column_names={"obs": ["soma_joinid"]})
    ref = tmp_path_factory.mktemp("census_ref") / "ref"
    fit(train, "cell_type", "dataset_id", tiny_config("train.num_threads=1", "train.max_epochs=1")).save(ref)
    return ref, dataset, query


def _h5ad_map(ref, adata: ad.AnnData, tmp_path, name: str) -> ad.AnnData:
    adata.write_h5ad(tmp_path / f"{name}_query.h5ad")
    assert main(["map", "--model", str(ref), "--query", str(tmp_path / f"{name}_query.h5ad"),
                 "--out", str(tmp_path / f"{name}.h5ad"), "--quiet"]) == 0
    return ad.read_h5ad(tmp_path / f"{name}.h5ad")


def _latent(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.startswith("z") and c[1:].isdigit()]].to_numpy()


def test_experiment_with_filter_equals_h5ad_map(kang, tmp_path):
    ref, store, adata = kang
    stim = np.flatnonzero(adata.obs["condition"].to_numpy() == "stim")  # ingest: soma_joinid = row
    expected = _h5ad_map(ref, adata[stim].copy(), tmp_path, "h5ad")

    out = tmp_path / "stream.h5ad"
    assert main(["map", "--model", str(ref), "--query", str(store), "--obs-filter", STIM, "--out", str(out),
                 "--chunk-cells", "100", "--quiet"]) == 0
    got = ad.read_h5ad(out)
    assert list(got.obs_names) == list(expected.obs_names)  # only the filtered cells, obs_name from the store
    assert np.array_equal(got.obs["soma_joinid"].to_numpy(), stim)
    assert (got.obs["condition"] == "stim").all() and got.n_vars == adata.n_vars
    assert np.array_equal(got.obs["scpermut_label"].astype(str), expected.obs["scpermut_label"].astype(str))
    assert np.allclose(got.obsm["X_scpermut"], expected.obsm["X_scpermut"], atol=1e-5)
    assert np.allclose(got.obsm["scpermut_probabilities"], expected.obsm["scpermut_probabilities"], atol=1e-5)
    assert got.uns["scpermut"]["n_genes_found"] == expected.uns["scpermut"]["n_genes_found"]
    assert (got.X != adata[stim].X).nnz == 0  # the counts over all the store's genes travel with the result

    pout = tmp_path / "stream.parquet"
    assert main(["map", "--model", str(ref), "--query", str(store), "--obs-filter", STIM, "--out", str(pout),
                 "--chunk-cells", "100", "--quiet"]) == 0
    f = pq.ParquetFile(pout)
    assert f.metadata.num_row_groups == -(-len(stim) // 100)  # one row group per chunk of 100 cells
    t = f.read().to_pandas()
    assert np.array_equal(t["soma_joinid"].to_numpy(), stim)
    assert list(t["obs_name"]) == list(expected.obs_names)
    assert np.array_equal(t["label"].to_numpy(), expected.obs["scpermut_label"].astype(str).to_numpy())
    assert np.allclose(t["confidence"], expected.obs["scpermut_confidence"], atol=1e-5)
    assert np.allclose(_latent(t), expected.obsm["X_scpermut"], atol=1e-5)
    # the reference's abstention rule (fitted at training), applied per chunk alike
    assert "scpermut_unknown" in expected.obs
    assert np.array_equal(t["unknown"].to_numpy(), expected.obs["scpermut_unknown"].to_numpy())
    assert np.allclose(t["unknown_score"], expected.obs["scpermut_unknown_score"], atol=1e-5)
    classes = list(expected.uns["scpermut"]["classes"])
    assert np.allclose(t[[f"p_{c}" for c in classes]].to_numpy(), expected.obsm["scpermut_probabilities"], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h5ad.h5ad", "h5ad_query.h5ad", "stream.h5ad",
                                                           "stream.parquet"]  # no temporary left behind


def test_census_collection_parquet_keyed_by_soma_joinid(census, census_store_3k, tmp_path):
    ref_dir, dataset, query = census
    ref = load_reference(ref_dir)
    expected = ref.map(query)  # the same cells, read by cellxgene_census into memory
    out = tmp_path / "q.parquet"
    summary = map_store(ref, str(census_store_3k), out, obs_filter=f"dataset_id == '{dataset}'",
                        organism="Homo sapiens", chunk_cells=256, progress=False)
    assert summary.n_cells == query.n_obs < 3000 and "homo_sapiens" in summary.where
    t = pq.read_table(out).to_pandas()
    assert len(t) == query.n_obs and "obs_name" not in t.columns  # Census has no obs_name
    assert np.array_equal(t["soma_joinid"].to_numpy(), np.sort(query.obs["soma_joinid"].to_numpy()))
    order = np.argsort(query.obs["soma_joinid"].to_numpy())
    assert np.array_equal(t["label"].to_numpy(), expected.labels[order])
    assert np.allclose(_latent(t), expected.latent[order], atol=1e-5)
    assert np.allclose(t["confidence"], expected.confidence[order], atol=1e-5)
    meta = json.loads(pq.read_schema(out).metadata[b"scpermut"].decode())
    assert meta["classes"] == ref.classes == list(expected.probabilities.columns)
    assert meta["n_genes_found"] == summary.n_genes_found == expected.n_genes_found
    assert meta["n_genes_model"] == expected.n_genes_model == len(ref.genes)
    assert meta["genes_matched_by"] == expected.matched_by and meta["n_classes"] == len(ref.classes)
    assert meta["calibration"] == ref.metrics["calibration"] and meta["model"] == str(ref_dir)


def test_bad_filters_and_outputs_are_clear_errors_writing_nothing(kang, census, census_store_3k, tmp_path, capsys):
    ref, store, adata = kang
    base = ["map", "--model", str(ref), "--query", str(store), "--quiet"]
    cases = [
        (["--obs-filter", "condition == 'nope'", "--out", str(tmp_path / "a.parquet")], "matches no cell"),
        (["--obs-filter", "condition === 'stim'", "--out", str(tmp_path / "b.parquet")], "bad --obs-filter"),
        (["--obs-filter", "no_such_column == 1", "--out", str(tmp_path / "c.h5ad")], "bad --obs-filter"),
        (["--organism", "Homo sapiens", "--out", str(tmp_path / "d.parquet")], "--organism applies"),
        (["--out", str(tmp_path / "e.csv")], ".parquet"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(["map", "--model", str(census[0]), "--query", str(census_store_3k), "--organism", "Danio rerio",
                 "--out", str(tmp_path / "f.parquet")]) == 2
    err = capsys.readouterr().err
    assert "no organism 'danio_rerio'" in err
    with pytest.raises(UsageError, match=r"above the 10 .*\.parquet"):
        map_store(load_reference(ref), str(store), tmp_path / "big.h5ad", obs_filter=STIM, max_h5ad_cells=10,
                  progress=False)
    with pytest.raises(DataError, match="matches no cell"):
        map_store(load_reference(ref), str(store), tmp_path / "g.parquet", obs_filter="condition == 'x'")
    adata[:50].write_h5ad(tmp_path / "small.h5ad")
    assert main(["map", "--model", str(ref), "--query", str(tmp_path / "small.h5ad"), "--obs-filter", STIM,
                 "--out", str(tmp_path / "h.h5ad")]) == 2
    assert "--obs-filter and --organism apply" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.h5ad"]


def test_chunks_are_bounded_by_cells_and_stored_values(census_store_3k):
    from loaders.query_stream import open_query_stream

    with open_query_stream(str(census_store_3k), "soma_joinid >= 100", chunk_cells=500, chunk_nnz=20_000) as s:
        chunks = list(s.chunks())
        assert s.n_cells == 2900 and s.var.index[0].startswith("ENSG")
    assert all(c.x.shape[0] <= 500 and (c.x.nnz <= 20_000 or c.x.shape[0] == 1) for c in chunks)
    assert max(c.x.nnz for c in chunks) > 10_000  # the budget, not the cell cap, cut most chunks
    assert np.array_equal(np.concatenate([c.joinids for c in chunks]), np.arange(100, 3000))
    assert all(c.x.shape[1] == 300 and c.obs_names is None for c in chunks)


def test_bench_map_measures_each_size_in_its_own_process(census, census_store_3k, tmp_path, capsys):
    """`scpermut bench map` end to end at test size: maps the first N cells per size in a fresh process, and its
    numbers are what the outputs hold (cells, rows, row groups, the RSS ratio)."""
    import math

    out = tmp_path / "bench"
    assert main(["bench", "map", "--store", str(census_store_3k), "--model", str(census[0]), "--sizes", "400,3000",
                 "--out", str(out), "--chunk-cells", "500", "--keep-outputs"]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "bench_map.json").read_text())
    assert [run["n_cells"] for run in r["runs"]] == [400, 3000] == [run["requested_cells"] for run in r["runs"]]
    for run in r["runs"]:
        meta = pq.ParquetFile(out / f"map_{run['n_cells']}.parquet").metadata
        assert run["rows_written"] == meta.num_rows == run["n_cells"]
        assert run["row_groups"] == meta.num_row_groups == math.ceil(run["n_cells"] / 500)  # one per chunk
        assert run["cells_per_s"] == pytest.approx(run["n_cells"] / run["map_seconds"])
        assert 0 < run["rss_after_load_mb"] <= run["peak_rss_mb"]
        assert f"map {run['n_cells']:>9,} cells" in printed
    assert r["peak_rss_ratio_largest_smallest"] == pytest.approx(r["runs"][1]["peak_rss_mb"] / r["runs"][0]["peak_rss_mb"])
    assert "peak RSS ratio 3,000 / 400 cells" in printed

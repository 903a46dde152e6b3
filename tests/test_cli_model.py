"""`scpermut train` / `map` end to end on real counts, and bad input: clear error, exit 2, no partial output."""
from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from model_data import CELLBENCH, TINY, cellbench_sng, tiny_config

from scpermut_dist.api import fit
from scpermut_dist.commands.main import main

SETS = [arg for item in TINY for arg in ("--set", item)]


def _scpermut(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scpermut_dist.commands.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_train_then_map_end_to_end(datasets_dir, tmp_path):
    ckpt, out = tmp_path / "model", tmp_path / "mapped.h5ad"
    res = _scpermut("train", "--h5ad", str(datasets_dir / CELLBENCH), "--label-key", "cell_line", "--batch-key", "batch",
                    "--out", str(ckpt), "--set", "data.obs_value_filter=demuxlet_cls == 'SNG'", "--set", "train.num_threads=1", *SETS)
    assert res.returncode == 0, res.stderr
    assert "cells/s" in res.stdout and "full_model epoch 2" in res.stdout and "validation" in res.stdout
    assert (ckpt / "manifest.json").is_file() and (ckpt / "weights.pt").is_file()
    query = cellbench_sng(datasets_dir)
    truth = query.obs["cell_line"].astype(str).to_numpy()
    query.obs = query.obs[["total_counts"]]  # a query needs no label and no batch column
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["map", "--model", str(ckpt), "--query", str(tmp_path / "query.h5ad"), "--out", str(out)]) == 0
    m = ad.read_h5ad(out)
    classes = sorted(set(truth))
    assert m.n_obs == query.n_obs and list(m.obs_names) == list(query.obs_names)
    assert list(m.obs["scpermut_label"].cat.categories) == classes + ["unknown"]  # abstention is a label
    assert list(m.obs["scpermut_label_raw"].cat.categories) == classes
    raw, label = m.obs["scpermut_label_raw"].astype(str), m.obs["scpermut_label"].astype(str)
    assert ((label == raw) | m.obs["scpermut_unknown"]).all() and (label[m.obs["scpermut_unknown"]] == "unknown").all()
    assert m.obsm["X_scpermut"].shape == (m.n_obs, 16)  # model.latent_dim in TINY
    probs = m.obsm["scpermut_probabilities"]  # columns in the order of uns["scpermut"]["classes"]
    assert probs.shape == (m.n_obs, len(classes)) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.array_equal(probs.argmax(axis=1), pd.Index(classes).get_indexer(m.obs["scpermut_label_raw"]))
    conf = m.obs["scpermut_confidence"].to_numpy()  # the max of the stored probabilities, row by row
    assert conf.dtype == np.float32 and np.allclose(probs.max(axis=1), conf)
    assert conf.min() < conf.max()  # a per-cell value, not a constant (e.g. a saturated 1.0)
    assert m.uns["scpermut"]["n_genes_found"] == 200 and list(m.uns["scpermut"]["classes"]) == classes
    assert (m.obs["scpermut_label_raw"].astype(str).to_numpy() == truth).mean() > 0.5  # 2 epochs, tiny net: still learns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.h5ad", "model", "query.h5ad"]


@pytest.fixture(scope="module")
def ckpt(datasets_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "model"
    fit(cellbench_sng(datasets_dir), "cell_line", "batch", tiny_config("train.max_epochs=1")).save(path)
    return path


def _small(datasets_dir, n=120) -> ad.AnnData:
    a = cellbench_sng(datasets_dir)[:n].copy()
    a.X = sp.csr_matrix(a.X)
    return a


def _run_bad(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err


def _bad_train(tmp_path, adata, capsys, match, label="cell_line", extra=()):
    path = tmp_path / "ref.h5ad"
    if adata is not None:
        adata.write_h5ad(path)
    out = tmp_path / "out"
    _run_bad(["train", "--h5ad", str(path), "--label-key", label, "--batch-key", "batch", "--out", str(out),
              "--quiet", *SETS, *extra], capsys, match)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ref.h5ad"] if path.exists() else [])


def test_train_missing_label_column(datasets_dir, tmp_path, capsys):
    _bad_train(tmp_path, _small(datasets_dir), capsys, "no column(s) ['nope']", label="nope")


def test_train_label_key_with_one_class(datasets_dir, tmp_path, capsys):
    a = _small(datasets_dir)
    a.obs["one"] = "A549"
    _bad_train(tmp_path, a, capsys, "only 'A549'", label="one")


@pytest.mark.parametrize("kind, match", [("nan", "NaN"), ("negative", "negative"), ("lognorm", "non-integer")])
def test_train_bad_counts(datasets_dir, tmp_path, capsys, kind, match):
    a = _small(datasets_dir)
    if kind == "nan":
        a.X.data[5] = np.nan
    elif kind == "negative":
        a.X.data[5] = -3
    else:
        a.X = sp.csr_matrix(np.log1p(a.X.toarray() / a.X.sum(axis=1).A * 1e4).astype(np.float32))
    _bad_train(tmp_path, a, capsys, match)


def test_train_bad_counts_beyond_the_first_rows_are_caught(datasets_dir, tmp_path, capsys):
    a = cellbench_sng(datasets_dir)
    a.X = sp.csr_matrix(a.X)
    a.X.data[-1] = 0.5  # the last cell only
    _bad_train(tmp_path, a, capsys, "non-integer")


def test_train_empty_file_and_bad_options(tmp_path, capsys):
    (tmp_path / "ref.h5ad").write_bytes(b"")
    _bad_train(tmp_path, None, capsys, "not an h5ad file")
    _bad_train(tmp_path, None, capsys, "loss.clas_w", extra=("--set", "loss.clas_w=-2"))
    _bad_train(tmp_path, None, capsys, "unknown config key", extra=("--set", "loss.bogus=1"))


def _bad_map(tmp_path, ckpt, query, capsys, match):
    qpath, out = tmp_path / "q.h5ad", tmp_path / "mapped.h5ad"
    if query is not None:
        query.write_h5ad(qpath)
    else:
        qpath.write_bytes(b"")
    _run_bad(["map", "--model", str(ckpt), "--query", str(qpath), "--out", str(out)], capsys, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5ad"]


def test_map_refuses_non_overlapping_genes(datasets_dir, tmp_path, ckpt, capsys):
    q = _small(datasets_dir)
    q.var_names = [f"GENE{i}" for i in range(q.n_vars)]
    _bad_map(tmp_path, ckpt, q, capsys, "only 0 of the model's 200 genes")


def test_map_refuses_fewer_than_half_the_genes(datasets_dir, tmp_path, ckpt, capsys):
    genes = pd.read_csv(ckpt / "genes.tsv", sep="\t")["feature_id"]
    q = _small(datasets_dir)
    q = q[:, ~q.var_names.isin(genes[:120])].copy()  # 80 of 200 model genes left
    _bad_map(tmp_path, ckpt, q, capsys, "only 80 of the model's 200 genes")


def test_map_bad_query_files(datasets_dir, tmp_path, ckpt, capsys):
    _bad_map(tmp_path, ckpt, None, capsys, "not an h5ad file")
    q = _small(datasets_dir)
    q.X.data[:] = q.X.data + 0.25
    _bad_map(tmp_path, ckpt, q, capsys, "non-integer")
    _run_bad(["map", "--model", str(tmp_path), "--query", str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "o.h5ad")],
             capsys, "not a scpermut checkpoint")
    _small(datasets_dir).write_h5ad(tmp_path / "good.h5ad")
    _run_bad(["map", "--model", str(ckpt), "--query", str(tmp_path / "good.h5ad"), "--out", str(tmp_path / "o.csv")],
             capsys, "ending in .h5ad")  # was: an h5ad written under a .csv name
    assert not (tmp_path / "o.csv").exists()


def test_map_zero_fills_missing_genes_with_a_warning(datasets_dir, tmp_path, ckpt, caplog):
    genes = pd.read_csv(ckpt / "genes.tsv", sep="\t")["feature_id"]
    q = _small(datasets_dir)
    q = q[:, ~q.var_names.isin(genes[:30])].copy()
    q.var["gene_symbols"] = "sym"  # symbols are unknown here: ids must win the match
    q.write_h5ad(tmp_path / "q.h5ad")
    assert main(["map", "--model", str(ckpt), "--query", str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "o.h5ad"),
                 "--quiet"]) == 0
    m = ad.read_h5ad(tmp_path / "o.h5ad")
    assert m.uns["scpermut"]["n_genes_found"] == 170 and m.uns["scpermut"]["genes_matched_by"] == "feature_id"
    assert "30 of 200 model genes are missing" in caplog.text


def test_class_names_with_slashes_survive_the_h5ad_round_trip(datasets_dir, tmp_path):
    import warnings

    from scpermut_dist.mapping.output import write_h5ad_atomic

    adata = cellbench_sng(datasets_dir)
    adata.obs["cell_line"] = adata.obs["cell_line"].astype(str) + "/x+"  # like "CD4+/CD25 T Reg"
    ref = fit(adata, "cell_line", "batch", tiny_config("train.max_epochs=1"))
    query = adata[:50].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        write_h5ad_atomic(ref.annotate(query), tmp_path / "o.h5ad")
    m = ad.read_h5ad(tmp_path / "o.h5ad")
    assert list(m.uns["scpermut"]["classes"]) == ref.classes and ref.classes[0].endswith("/x+")
    assert set(m.obs["scpermut_label_raw"].astype(str)) <= set(ref.classes)
    assert set(m.obs["scpermut_label"].astype(str)) <= set(ref.classes) | {"unknown"}


def test_train_streams_from_a_census_store_and_maps_an_h5ad_query(tmp_path):
    """The same training path on a SOMA source: a Census-shaped collection, filtered, batch = dataset + donor."""
    from loaders.synth import synthesize_census

    store, ckpt = tmp_path / "census", tmp_path / "model"
    synthesize_census(str(store), 3000, 250, seed=5, n_datasets=4, mouse_cells=100, chunk_cells=1000)
    res = _scpermut("train", "--store", str(store), "--organism", "Homo sapiens", "--label-key", "cell_type",
                    "--batch-key", "dataset_id+donor_id", "--obs-filter", "is_primary_data == True",
                    "--out", str(ckpt), "--set", "train.num_threads=1", *SETS)
    assert res.returncode == 0, res.stderr
    manifest = (ckpt / "manifest.json").read_text()
    assert "is_primary_data == True" in manifest
    import json

    man = json.loads(manifest)
    assert all("+" in b for b in man["batches"])  # dataset_id + donor_id combined
    assert man["training_data"]["obs_value_filter"] == "is_primary_data == True"
    genes = pd.read_csv(ckpt / "genes.tsv", sep="\t")
    assert genes["feature_id"].str.startswith("ENSG").all() and len(genes) == 200  # data.n_hvg in TINY

    import tiledbsoma

    with tiledbsoma.open(str(store)) as census:  # a query from the same atlas, as a biologist's h5ad
        exp = census["census_data"]["homo_sapiens"]
        with exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(coords=(slice(0, 299),))) as q:
            query = q.to_anndata(X_name="raw")
    query.var_names = query.var["feature_name"].astype(str).to_numpy()  # symbols: matched by name
    query.obs = pd.DataFrame(index=[f"q{j}" for j in query.obs["soma_joinid"]])
    query.write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / "mapped.h5ad"
    assert main(["map", "--model", str(ckpt), "--query", str(tmp_path / "q.h5ad"), "--out", str(out)]) == 0
    m = ad.read_h5ad(out)
    assert m.uns["scpermut"]["n_genes_found"] == 200 and m.obsm["X_scpermut"].shape[0] == 300


def test_train_rejects_organism_with_h5ad(datasets_dir, tmp_path, capsys):
    rc = main(["train", "--h5ad", str(datasets_dir / CELLBENCH), "--organism", "Homo sapiens", "--label-key",
               "cell_line", "--out", str(tmp_path / "m")])
    assert rc == 2 and "--organism" in capsys.readouterr().err and not (tmp_path / "m").exists()

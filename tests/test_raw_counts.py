"""Counts in `.raw` (the scanpy layout: X log-normalised over kept genes, `.raw` the counts over all genes) are
read with `--layer raw` everywhere an h5ad enters: sources (in memory and backed), ingest, train, map, evaluate,
and the server's h5ad codec."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from model_data import TINY, cellbench_sng

from loaders.errors import DataError
from loaders.sources import H5adSpec
from scpermut_dist.commands.main import main

SETS = [arg for item in TINY for arg in ("--set", item)]
N_KEPT = 600  # genes left in X, as after a highly-variable-gene filter


def _scanpy_layout(counts: ad.AnnData) -> ad.AnnData:
    """X = log1p(CP10k) over the first N_KEPT genes, `.raw` = the counts over all genes."""
    counts = counts.copy()
    counts.X = sp.csr_matrix(counts.X, dtype=np.float32)
    out = counts[:, :N_KEPT].copy()
    totals = np.asarray(counts.X.sum(axis=1)).ravel()
    out.X = sp.csr_matrix(sp.diags(1e4 / totals) @ out.X)
    out.X.data = np.log1p(out.X.data)
    out.raw = counts
    return out


@pytest.fixture(scope="module")
def files(datasets_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw")
    a = cellbench_sng(datasets_dir)
    plates = a.obs["batch"].astype(str)
    ref, query = a[plates != plates.iloc[0]].copy(), a[plates == plates.iloc[0]].copy()
    labels = query.obs["cell_line"].astype(str).to_numpy()
    query.obs = query.obs[[]]
    paths = {"ref": tmp / "ref.h5ad", "query": tmp / "query.h5ad", "noraw": tmp / "noraw.h5ad"}
    _scanpy_layout(ref).write_h5ad(paths["ref"])
    _scanpy_layout(query).write_h5ad(paths["query"])
    no_raw = _scanpy_layout(query[:50])
    del no_raw.raw
    no_raw.write_h5ad(paths["noraw"])
    return paths, ref, query, labels


@pytest.mark.parametrize("backed", [False, True])
def test_sources_read_raw_counts_and_raw_genes(files, backed):
    paths, ref, _, _ = files
    with pytest.raises(DataError, match="non-integer.*--layer raw"):
        H5adSpec(str(paths["ref"]), backed=backed).open()
    src = H5adSpec(str(paths["ref"]), layer="raw", backed=backed).open()
    try:
        assert src.n_genes == ref.n_vars > N_KEPT  # .raw's genes, not X's
        assert list(src.var["feature_name"]) == list(ref.var_names)
        rows = np.array([0, 7, src.n_cells - 1])
        np.testing.assert_array_equal(src.read_counts(rows).toarray(), ref.X[rows].toarray())
    finally:
        src.close()
    with pytest.raises(DataError, match=r"no layer 'raw'.*nor a \.raw|no layer 'raw'"):
        H5adSpec(str(paths["noraw"]), layer="raw", backed=backed).open()


def test_ingest_reads_raw(files, tmp_path):
    import tiledbsoma as soma

    from loaders.ingest import ingest_h5ad

    paths, ref, _, _ = files
    summary = ingest_h5ad(paths["ref"], tmp_path / "store", layer="raw", progress=False)
    assert (summary["n_cells"], summary["n_genes"]) == ref.shape
    with soma.Experiment.open(str(tmp_path / "store")) as exp:
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        x = exp.ms["RNA"].X["raw"].read().tables().concat()
    assert list(var["var_name"]) == list(ref.var_names)
    assert float(np.sum(x["soma_data"].to_numpy())) == float(ref.X.sum())


def test_train_and_map_from_raw_write_onto_the_original_file(files, tmp_path, capsys):
    paths, _, query, labels = files
    model, out = tmp_path / "model", tmp_path / "mapped.h5ad"
    argv = ["train", "--h5ad", str(paths["ref"]), "--label-key", "cell_line", "--batch-key", "batch",
            "--layer", "raw", "--out", str(model), "--quiet", *SETS]
    assert main(argv) == 0
    assert main(["map", "--model", str(model), "--query", str(paths["query"]), "--layer", "raw",
                 "--out", str(out), "--quiet"]) == 0
    mapped = ad.read_h5ad(out)
    assert mapped.n_vars == N_KEPT and mapped.raw is not None  # the user's file, annotated, X and .raw as they were
    np.testing.assert_allclose(mapped.raw.X.sum(), query.X.sum())
    assert mapped.uns["scpermut"]["n_genes_found"] == 200  # every model gene is in .raw ...
    assert main(["map", "--model", str(model), "--query", str(paths["query"]), "--out", str(tmp_path / "x.h5ad"),
                 "--quiet"]) == 2  # X is log-normalised: refused, with the way out
    assert "--layer raw" in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()
    assert (mapped.obs["scpermut_label_raw"].astype(str).to_numpy() == labels).mean() > 0.5
    before = (model / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main([a for a in argv if a != "--quiet"] + ["--set", "train.max_epochs=1"]) == 0  # over the same --out
    assert "holds a checkpoint; this training replaces it" in capsys.readouterr().out
    assert (model / "manifest.json").read_bytes() != before


def test_evaluate_loader_and_server_codec_read_raw(files):
    from scpermut_dist.commands.evaluate import load_filtered
    from scpermut_dist.serve.client import h5ad_bytes
    from scpermut_dist.serve.codec import decode_h5ad

    paths, ref, query, _ = files
    loaded = load_filtered(str(paths["ref"]), "batch != 'none'", layer="raw")
    assert loaded.var_names.equals(ref.var_names) and loaded.obs["cell_line"].equals(ref.obs["cell_line"])
    assert (loaded.X != ref.X).nnz == 0
    body = paths["query"].read_bytes()  # a client's own file, posted with layer=raw
    decoded = decode_h5ad(body, layer="raw")
    assert decoded.var_names.equals(query.var_names) and (sp.csr_matrix(decoded.X) != query.X).nnz == 0
    sent = decode_h5ad(h5ad_bytes(ad.read_h5ad(paths["query"]), "raw"))  # what `map --server --layer raw` posts
    assert sent.var_names.equals(query.var_names) and (sp.csr_matrix(sent.X) != query.X).nnz == 0


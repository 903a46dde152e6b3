"""Query gene alignment per gene, library size over all genes, default unlabelled values, bad query inputs.

A tiny model trained on the real Kang PBMC counts (symbols as var_names, plus an Ensembl-style id column so
the model knows both namings) is mapped through the real CLI and the real mapping functions.
"""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from model_data import tiny_config

from loaders.errors import DataError
from loaders.normalize import Normalization
from loaders.sources import AnnDataSource, spec_from_uri
from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.mapping.align import map_anndata, plan_query, prepare_query_chunk
from scpermut_dist.mapping.genes import align_genes
from scpermut_dist.train.prepared import PreparedArrays, load_prepared, save_prepared
from scpermut_dist.train.preprocess import prepare_reference

KANG = "kang2018_pbmc_ifnb_4samples.h5ad"


def _kang(datasets_dir) -> ad.AnnData:
    a = ad.read_h5ad(datasets_dir / KANG)
    a.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(a.n_vars)]  # ids beside the symbols
    return a


@pytest.fixture(scope="module")
def kang(datasets_dir):
    return _kang(datasets_dir)


@pytest.fixture(scope="module")
def ckpt(kang, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "model"
    fit(kang, "cell_type", "batch", tiny_config("train.max_epochs=1", "train.num_threads=1")).save(path)
    return path


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_reference(ckpt)


@pytest.fixture(scope="module")
def baseline(ref, kang):
    return ref.map(kang)


def _query(kang, n: int = 300) -> ad.AnnData:
    q = kang[:n].copy()
    q.obs = q.obs[[]]  # a query needs no label and no batch
    return q


def _map(tmp_path, ckpt, q, *extra) -> tuple[int, ad.AnnData | None]:
    """`scpermut map` on `q` written to tmp_path/q.h5ad; (exit code, the output if one was written)."""
    qpath, out = tmp_path / "q.h5ad", tmp_path / "out.h5ad"
    out.unlink(missing_ok=True)
    q.write_h5ad(qpath)
    rc = main(["map", "--model", str(ckpt), "--query", str(qpath), "--out", str(out), "--quiet", *extra])
    return rc, (ad.read_h5ad(out) if out.exists() else None)


@pytest.fixture
def cli(tmp_path, ckpt):
    return lambda q, *extra: _map(tmp_path, ckpt, q, *extra)


# ---- gene alignment -------------------------------------------------------------------------------------------
def test_a_query_mixing_versioned_ids_and_symbols_of_any_case_matches_every_gene(cli, kang, baseline):
    q = _query(kang)
    ids, symbols = q.var["gene_ids"].to_numpy(), q.var_names.to_numpy()
    every_other = np.arange(q.n_vars) % 2 == 0
    q.var_names = np.where(every_other, [f"{i}.12" for i in ids], [s.lower() for s in symbols])
    q.var = q.var[[]]
    rc, m = cli(q)
    assert rc == 0
    info = m.uns["scpermut"]
    assert info["n_genes_found"] == info["n_genes_model"] == 200
    assert info["genes_matched_by"] == "feature_id+feature_name_case_insensitive"
    assert np.array_equal(m.obsm["scpermut_probabilities"], baseline.probabilities.to_numpy()[:300])


def test_case_insensitive_symbols_only_where_unambiguous(ref):
    genes = ref.genes.iloc[:4].reset_index(drop=True)
    s0, s1, s2, s3 = genes["feature_name"]
    var = pd.DataFrame(index=[s0.lower(), s1, s1.lower(), s2.swapcase(), "other"])
    a = align_genes(var, genes, min_gene_fraction=0.0)
    # s0: by case; s1: exactly (its lower-case twin is not summed into it); s2: by case; s3: absent
    assert a.first_positions().tolist() == [0, 1, 3, -1]
    assert a.counts["feature_name"] == 1 and a.counts["feature_name_case_insensitive"] == 2
    twins = genes.assign(feature_name=[s0, s0.lower(), s2, s3])  # two model symbols fold alike: ambiguous
    mixed = s0[0] + s0[1:].lower()  # e.g. Isg15: neither twin exactly
    assert mixed not in (s0, s0.lower())
    b = align_genes(pd.DataFrame(index=[mixed, s2]), twins, min_gene_fraction=0.0)
    assert b.first_positions().tolist() == [-1, -1, 1, -1]  # model gene s2 <- query column 1 only


def test_duplicated_query_genes_are_summed_or_refused_never_dropped(ref, kang, baseline, caplog):
    q = _query(kang)
    gene = ref.genes["feature_name"].iloc[5]
    col = q.var_names.get_loc(gene)
    x = q.X.toarray()
    half = np.floor(x[:, col] / 2)
    extra = ad.AnnData(sp.csr_matrix(half[:, None].astype(np.float32)), obs=q.obs,
                       var=pd.DataFrame(index=[q.var["gene_ids"].iloc[col]]))  # the same gene, by its id
    x[:, col] -= half
    q.X = sp.csr_matrix(x)
    split = ad.concat([q, extra], axis=1)
    res = ref.map(split)
    assert "1 model genes appear more than once" in caplog.text and gene in caplog.text
    assert np.array_equal(res.probabilities.to_numpy(), baseline.probabilities.to_numpy()[:300])
    with pytest.raises(DataError, match="appear more than once"):
        map_anndata(ref.members, ref.classes, ref.genes, ref.normalization, split, duplicates="error")


def test_gene_key_names_the_var_column_holding_genes(cli, kang, baseline, capsys):
    q = _query(kang)
    q.var["my_genes"] = q.var_names.to_numpy()
    q.var_names = [f"row{i}" for i in range(q.n_vars)]
    q.var = q.var[["my_genes"]]
    rc, m = cli(q)
    assert rc == 2 and m is None
    err = capsys.readouterr().err
    assert "only 0 of the model's 200 genes" in err and "--gene-key" in err
    rc, m = cli(q, "--gene-key", "my_genes")
    assert rc == 0 and m.uns["scpermut"]["genes_matched_by"] == "feature_name"
    assert np.array_equal(m.obsm["scpermut_probabilities"], baseline.probabilities.to_numpy()[:300])
    rc, m = cli(q, "--gene-key", "nope")
    assert rc == 2 and m is None and "'my_genes'" in capsys.readouterr().err


def test_the_gene_floor_is_configurable_and_the_refusal_names_the_model_naming(cli, kang, ref, capsys):
    q = _query(kang)
    model = ref.genes["feature_name"]
    q.var_names = [f"{g}_renamed" if g in set(model[:80]) else g for g in q.var_names]  # 120 of 200 left
    q.var = q.var[[]]  # no id column to find them by
    rc, m = cli(q)
    assert rc == 0 and m.uns["scpermut"]["n_genes_found"] == 120
    rc, m = cli(q, "--min-gene-fraction", "0.7")
    assert rc == 2 and m is None
    err = capsys.readouterr().err
    assert "only 120 of the model's 200 genes" in err and "need at least 70%" in err
    assert f"Ensembl gene ids (feature_id, e.g. {ref.genes['feature_id'].iloc[0]}" in err
    assert f"gene symbols (feature_name, e.g. {model.iloc[0]}" in err
    rc, m = cli(q, "--min-gene-fraction", "1.5")
    assert rc == 2 and m is None and "between 0 and 1" in capsys.readouterr().err


# ---- library size over all genes ------------------------------------------------------------------------------
def test_missing_model_genes_do_not_shift_the_normalised_values_of_the_rest(ref, kang):
    q = _query(kang)
    model = ref.genes["feature_name"].to_numpy()
    dropped = model[np.random.default_rng(0).permutation(len(model))[:80]]  # 40% of the model genes
    q_missing = q.copy()
    q_missing.var_names = [f"{g}-absent" if g in set(dropped) else g for g in q.var_names]
    q_missing.var = q_missing.var[[]]
    full = prepare_query_chunk(q.X, plan_query(q.var, ref.genes, ref.normalization))
    part = prepare_query_chunk(q_missing.X, plan_query(q_missing.var, ref.genes, ref.normalization))
    kept = ~np.isin(model, dropped)
    np.testing.assert_array_equal(part[:, kept], full[:, kept])
    assert not part[:, ~kept].any() and full[:, ~kept].any()
    # what the old normalisation (library size over the genes present) did: everything scaled up
    old = Normalization(ref.normalization.target_sum, True, "model_genes")
    old_part = prepare_query_chunk(q_missing.X, plan_query(q_missing.var, ref.genes, old))
    assert (old_part[:, kept] > part[:, kept] + 1e-3).sum() > 0.5 * (part[:, kept] > 0).sum()


def test_the_reference_library_size_is_over_all_genes_from_anndata_h5ad_and_soma(kang, tmp_path):
    from loaders.ingest import ingest_h5ad

    kang.write_h5ad(tmp_path / "kang.h5ad")
    ingest_h5ad(tmp_path / "kang.h5ad", tmp_path / "kang_soma")
    data = tiny_config("data.label_key=cell_type", "data.batch_keys=batch").data
    preps = [prepare_reference(lambda sel: AnnDataSource(kang, sel), data),
             prepare_reference(lambda sel: spec_from_uri(str(tmp_path / "kang.h5ad"), sel), data),
             prepare_reference(lambda sel: spec_from_uri(str(tmp_path / "kang_soma"), sel), data)]
    totals = np.asarray(kang.X.sum(axis=1)).ravel()
    for prep in preps:
        assert prep.totals.dtype == np.float32 and np.array_equal(prep.totals, totals)
        assert prep.normalization.library_size == "all_genes"
        assert prep.normalization.target_sum == float(np.median(totals))
        assert prep.normalization == preps[0].normalization
        assert prep.genes.equals(preps[0].genes)
    save_prepared(PreparedArrays.from_prepared(preps[2], "fp"), tmp_path / "prepared")  # what Ray ranks receive
    back = load_prepared(tmp_path / "prepared", "fp")
    assert back.totals.dtype == np.float32 and np.array_equal(back.totals, totals)
    assert back.normalization == preps[2].normalization
    import tiledbsoma

    with tiledbsoma.open(str(tmp_path / "kang_soma")) as exp:
        raw_sum = exp.obs.read(column_names=["raw_sum"]).concat().to_pandas()["raw_sum"].to_numpy()
    assert np.array_equal(raw_sum, totals)  # the same library size a Census store records
    assert np.asarray(preps[0].source.read_counts(np.arange(kang.n_obs)).sum(axis=1)).ravel().max() < totals.max()


def test_a_checkpoint_without_library_size_keeps_the_old_normalisation(ckpt, kang, tmp_path):
    import shutil

    old = tmp_path / "old_model"
    shutil.copytree(ckpt, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["normalization"]["library_size"] == "all_genes"
    del manifest["normalization"]["library_size"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    ref_old = load_reference(old)
    assert ref_old.normalization.library_size == "model_genes"
    q = _query(kang)
    res = ref_old.map(q)
    x = q[:, ref_old.genes["feature_name"]].X  # old behaviour: library size over the model's genes
    lib = np.asarray(x.sum(axis=1)).ravel()
    want = np.log1p(x.toarray() * (ref_old.normalization.target_sum / lib)[:, None].astype(np.float32))
    got = prepare_query_chunk(q.X, plan_query(q.var, ref_old.genes, ref_old.normalization))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert res.probabilities.shape == (300, len(ref_old.classes))
    import torch

    from scpermut_dist.mapping.predict import predict_proba

    temps = (ref_old.metrics.get("calibration") or {}).get("temperature")  # calibrated T per member, or raw
    _, want_p = predict_proba(ref_old.members, torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32)),
                              temperatures=temps)
    np.testing.assert_allclose(res.probabilities, want_p, rtol=1e-5, atol=1e-6)  # the old normalisation fed the model


# ---- unlabelled reference values ------------------------------------------------------------------------------
def test_unknown_like_labels_are_unlabelled_by_default_and_explicit_values_add(kang):
    a = kang[:400].copy()
    labels = a.obs["cell_type"].astype(str).to_numpy().copy()
    junk = ["unknown", "Unknown", "nan", "NA", "N/A", "none", "None", "", " NaN "]
    labels[: len(junk) * 10] = np.repeat(junk, 10)
    labels[100:110] = "Doublet"
    obs = pd.DataFrame({"cell_type": labels.astype(object), "batch": a.obs["batch"].to_numpy()},
                       index=a.obs_names)
    obs.loc[obs.index[120:130], "cell_type"] = None  # missing values
    a.obs = obs
    truth = set(kang.obs["cell_type"].astype(str))
    data = tiny_config("data.label_key=cell_type", "data.batch_keys=batch").data
    prep = prepare_reference(lambda sel: AnnDataSource(a, sel), data)
    assert set(prep.classes) == truth | {"Doublet"}
    assert (prep.label_codes[:90] == -1).all() and (prep.label_codes[120:130] == -1).all()
    assert (prep.label_codes[130:] >= 0).all()
    more = prepare_reference(lambda sel: AnnDataSource(a, sel),
                             data.model_copy(update={"unlabeled_value": "doublet"}))
    assert set(more.classes) == truth and (more.label_codes[100:110] == -1).all()
    assert (more.label_codes[:90] == -1).all() and (more.label_codes[90:100] >= 0).all()


# ---- bad query inputs -----------------------------------------------------------------------------------------
def _bad(kind: str, kang) -> ad.AnnData:
    q = _query(kang, 100)
    x = q.X.copy()
    if kind == "negative":
        x.data[7] = -2
    elif kind == "nan":
        x.data[-1] = np.nan  # the last cell: every value is checked, not a prefix
    elif kind == "inf":
        x.data[7] = np.inf
    elif kind == "non-integer":
        x.data[7] = 1.5
    elif kind == "log-normalised":
        x = sp.csr_matrix(np.log1p(x.toarray() / np.asarray(x.sum(axis=1)) * 1e4).astype(np.float32))
    elif kind == "empty matrix":
        x = sp.csr_matrix(x.shape, dtype=np.float32)
    elif kind == "no X":
        return ad.AnnData(obs=q.obs, var=q.var)
    elif kind == "no cells":
        return q[:0].copy()
    elif kind == "no genes":
        return q[:, :0].copy()
    elif kind == "too few genes":
        return q[:, q.var_names.isin(kang.var_names[:100])].copy()
    q.X = x
    return q


@pytest.mark.parametrize("kind, match", [
    ("negative", "negative values"), ("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
    ("non-integer", "non-integer"), ("log-normalised", "looks normalised or log-transformed"),
    ("empty matrix", "all zeros"), ("no X", "X is empty"), ("no cells", "no cells"), ("no genes", "no genes"),
    ("too few genes", "of the model's 200 genes are in the query"),
])
def test_bad_query_inputs_give_a_clear_error_and_write_nothing(cli, kang, tmp_path, capsys, kind, match):
    rc, m = cli(_bad(kind, kang))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and match in err, err
    assert m is None and not (tmp_path / "out.h5ad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.h5ad"]

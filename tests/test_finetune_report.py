"""`scpermut map --finetune` (query batches as new DANN classes, classifier frozen, reference untouched) and
`--report DIR` (plots + HTML), on real CellBench counts: plates 1-2 are the reference, plate 3 the query."""
from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from model_data import cellbench_sng, tiny_config

from loaders.sources import AnnDataSource
from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.finetune import (
    FinetuneSettings,
    finetune_reference,
    replay_from_anndata,
    sample_replay,
    with_new_batches,
)
from scpermut_dist.mapping.report import write_report

QUERY_PLATE = "CELseq2_5cl_p3"


@pytest.fixture(scope="module")
def data(datasets_dir) -> tuple[ad.AnnData, ad.AnnData]:
    a = cellbench_sng(datasets_dir)
    ref_cells = a[a.obs["batch"] != QUERY_PLATE].copy()
    query = a[a.obs["batch"] == QUERY_PLATE].copy()
    query.obs["plate_half"] = np.where(np.arange(query.n_obs) % 2, "h1", "h0")
    return ref_cells, query


@pytest.fixture(scope="module")
def ref_dir(data, tmp_path_factory) -> Path:
    """A tiny reference trained on plates 1-2, its replay sample built by `sample_replay`, saved."""
    ref_cells, _ = data
    ref = fit(ref_cells, "cell_line", "batch", tiny_config("train.max_epochs=5", "train.num_threads=1"))
    ref.extras = {**ref.extras, "replay": replay_from_anndata(ref_cells, ref, "cell_line", "batch", max_cells=300)}
    path = tmp_path_factory.mktemp("ft") / "reference"
    ref.save(path)
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_sample_replay_is_stratified_and_keeps_raw_counts(data):
    ref_cells, _ = data
    source = AnnDataSource(ref_cells)
    labels = np.where(np.arange(source.n_cells) < 20, 0, 1)  # a rare type of 20 cells, the rest one type
    labels[20:30] = -1  # unlabelled cells are their own stratum
    totals = np.arange(source.n_cells, dtype=np.float64) + 1000.0
    rep = sample_replay(source, np.arange(source.n_cells), labels, np.zeros(source.n_cells), totals, max_cells=100)
    x = sp.csr_matrix((rep["data"], rep["indices"], rep["indptr"]), shape=tuple(rep["shape"]))
    assert x.shape == (100, ref_cells.n_vars)
    assert np.bincount(rep["label"] + 1).tolist() == [10, 20, 70]  # -1: all 10, rare: all 20, the rest fills up
    rows = rep["cell"]
    assert np.all(np.diff(rows) > 0) and np.array_equal(rep["totals"], totals[rows])  # each cell's own total
    assert (x != source.read_counts(rows)).nnz == 0
    assert rep["data"].dtype == np.float32 and rep["indptr"].dtype == np.int64
    again = sample_replay(source, np.arange(source.n_cells), labels, np.zeros(source.n_cells), totals, max_cells=100)
    assert np.array_equal(again["totals"], rep["totals"])  # seeded


def test_new_batches_extend_the_dann_head_and_keep_every_weight(ref_dir):
    module = load_reference(ref_dir).module
    new = with_new_batches(module, 3)
    old_sd, new_sd = module.state_dict(), new.state_dict()
    assert new.dims["n_batches"] == module.dims["n_batches"] + 3
    for key, value in old_sd.items():
        if key.startswith("dann.head.out."):
            assert new_sd[key].shape[0] == value.shape[0] + 3
            assert torch.equal(new_sd[key][: value.shape[0]], value)
        else:
            assert torch.equal(new_sd[key], value), key


def test_finetune_refuses_a_reference_without_replay(data, ref_dir):
    ref = load_reference(ref_dir)
    ref.extras = {}
    with pytest.raises(UsageError, match="replay"):
        finetune_reference(ref, data[1], settings=FinetuneSettings(epochs=1))


def test_finetune_keeps_classifier_and_reference_and_aligns_replay(data, ref_dir):
    ref = load_reference(ref_dir)
    before = {k: v.clone() for k, v in ref.module.state_dict().items()}
    outcome = finetune_reference(ref, data[1], batch_key="plate_half", settings=FinetuneSettings(epochs=2))
    adapted = outcome.reference
    assert adapted.batches == [*ref.batches, "query:h0", "query:h1"]
    sd = adapted.module.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items() if k.startswith("classifier."))
    assert not torch.equal(sd["encoder.bottleneck.0.weight"], before["encoder.bottleneck.0.weight"])
    assert all(torch.equal(v, ref.module.state_dict()[k]) for k, v in before.items())  # the input object too
    assert [r["epoch"] for r in outcome.history] == [1, 2] and "loss_anchor" in outcome.history[0]
    assert outcome.replay_accuracy["after"] >= outcome.replay_accuracy["before"] - 0.1  # the anchor holds
    # The point of the fine-tune: reference (replay) and query cells mix at least as well in the adapted latent.
    from scpermut_dist.evaluation.metrics import batch_mixing_entropy
    from scpermut_dist.mapping.finetune import normalize, replay_matrix
    from scpermut_dist.mapping.predict import predict_proba

    replay = ref.extras["replay"]
    x_replay = normalize(ref.normalization, replay_matrix(replay, len(ref.genes)), replay["totals"])
    x_replay = torch.from_numpy(x_replay.toarray().astype(np.float32))
    origin = np.concatenate([np.asarray(ref.batches, dtype=object)[np.asarray(replay["batch"])],
                             np.full(data[1].n_obs, "query", dtype=object)])
    mixing = {name: batch_mixing_entropy(np.vstack([predict_proba(r.module, x_replay)[0], r.map(data[1]).latent]),
                                         origin)
              for name, r in (("before", ref), ("after", adapted))}
    # measured 0.977 -> 0.983 here (mixing is near 1 already); 0.002 absorbs another CPU's rounding, not a regression
    assert mixing["after"] >= mixing["before"] - 0.002, mixing
    # What lives in the latent space is re-fitted for the adapted encoder: the neighbour sample (labelled
    # replay cells, their new latents) and the unknown rule's validation distances.
    replay = ref.extras["replay"]
    neighbors = adapted.extras["neighbors"]
    assert adapted.summary["finetune"]["refreshed"] == ["neighbors", "unknown"]
    assert np.array_equal(neighbors["cell"], replay["cell"][replay["label"] >= 0])
    assert not np.array_equal(adapted.extras["unknown"]["val_distance"], ref.extras["unknown"]["val_distance"])
    assert np.array_equal(adapted.extras["unknown"]["val_confidence"], ref.extras["unknown"]["val_confidence"])
    mapped = adapted.map(data[1])
    assert mapped.unknown.mean() < 0.5 and len(mapped.neighbor_label) == data[1].n_obs
    once = finetune_reference(adapted, data[1], settings=FinetuneSettings(epochs=1)).reference
    twice = finetune_reference(once, data[1], settings=FinetuneSettings(epochs=1)).reference  # names never merge
    assert twice.batches == [*adapted.batches, "query", "query#2"] and twice.module.dims["n_batches"] == len(twice.batches)


def test_map_finetune_from_the_cli_writes_a_new_loadable_checkpoint(data, ref_dir, tmp_path):
    _, query = data
    query.write_h5ad(tmp_path / "query.h5ad")
    digests = _digests(ref_dir)
    out, report = tmp_path / "mapped.h5ad", tmp_path / "report"
    rc = main(["map", "--model", str(ref_dir), "--query", str(tmp_path / "query.h5ad"), "--out", str(out),
               "--finetune", "--query-batch-key", "plate_half", "--finetune-epochs", "2", "--report", str(report),
               "--quiet"])
    assert rc == 0
    assert _digests(ref_dir) == digests  # the reference checkpoint's bytes never change
    ft_dir = tmp_path / "mapped.finetuned_model"  # default: next to --out
    adapted, ref = load_reference(ft_dir), load_reference(ref_dir)
    assert adapted.module.dims["n_batches"] == len(ref.batches) + 2
    assert adapted.batches[-2:] == ["query:h0", "query:h1"] and adapted.classes == ref.classes
    assert "replay" in adapted.extras and adapted.summary["finetune"]["new_batches"] == ["query:h0", "query:h1"]
    ref_sd, ad_sd = ref.module.state_dict(), adapted.module.state_dict()
    assert all(torch.equal(ad_sd[k], v) for k, v in ref_sd.items() if k.startswith("classifier."))
    mapped = ad.read_h5ad(out)
    assert mapped.uns["scpermut"]["model"] == str(ft_dir)  # mapped with the adapted model
    assert np.allclose(mapped.obsm["X_scpermut"], adapted.map(query).latent, atol=1e-5)
    truth = query.obs["cell_line"].astype(str).to_numpy()
    unknown = mapped.obs["scpermut_unknown"].to_numpy(dtype=bool)
    assert unknown.mean() < 0.3 and (mapped.obs["scpermut_label"].astype(str).to_numpy() == truth)[~unknown].mean() > 0.9
    assert (report / "index.html").is_file() and (report / "umap.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.finetuned_model", "mapped.h5ad", "query.h5ad",
                                                          "report"]


def test_finetune_out_may_not_overlap_the_reference(data, ref_dir, tmp_path, capsys):
    data[1].write_h5ad(tmp_path / "query.h5ad")
    digests = _digests(ref_dir)
    for bad in (ref_dir, ref_dir / "inner"):
        rc = main(["map", "--model", str(ref_dir), "--query", str(tmp_path / "query.h5ad"),
                   "--out", str(tmp_path / "m.h5ad"), "--finetune", "--finetune-out", str(bad)])
        assert rc == 2 and "overlaps the reference" in capsys.readouterr().err
    assert _digests(ref_dir) == digests and not (tmp_path / "m.h5ad").exists()
    rc = main(["map", "--model", str(ref_dir), "--query", str(tmp_path / "query.h5ad"),
               "--out", str(tmp_path / "m.h5ad"), "--finetune-epochs", "2"])
    assert rc == 2 and "need --finetune" in capsys.readouterr().err


def _is_png(p: Path) -> bool:
    return p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_the_reference_umap_and_alone(data, ref_dir, tmp_path):
    _, query = data
    ref = load_reference(ref_dir)
    result = ref.map(query)
    out = write_report(tmp_path / "rep", result, ref, query_name="plate 3")
    for name in ("umap.png", "confidence.png", "types.png"):
        assert _is_png(out / name), name
    page = (out / "index.html").read_text()
    for t in set(result.labels):
        assert html.escape(t) in page
    assert f"{result.n_genes_found} of {result.n_genes_model}" in page and "unknown" in page
    summary = json.loads((out / "report.json").read_text())
    assert sum(r["cells"] for r in summary["per_type"]) == query.n_obs
    assert summary["umap"]["method"] == "UMAP"  # fitted on the checkpoint's reference sample, the query transformed
    assert summary["umap"]["reference_cells"] == len(ref.extras["neighbors"]["latent"]) > 0
    assert summary["unknown"]["cells"] == int(np.sum(result.unknown)) and summary["thresholds"] == result.thresholds
    # Without that sample: a UMAP of the query alone, said so on the page; the earlier report is replaced.
    del ref.extras["neighbors"]
    again = write_report(tmp_path / "rep", ref.map(query), ref, query_name="plate 3")
    summary = json.loads((again / "report.json").read_text())
    assert summary["umap"]["reference_cells"] == 0 and "no reference latent sample" in (again / "index.html").read_text()
    assert _is_png(again / "umap.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left behind


def test_bad_report_path_is_refused_before_mapping(data, ref_dir, tmp_path, capsys):
    data[1].write_h5ad(tmp_path / "query.h5ad")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for bad, msg in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "is a file"),
                     (tmp_path / "busy", "not an earlier scpermut report")):
        rc = main(["map", "--model", str(ref_dir), "--query", str(tmp_path / "query.h5ad"),
                   "--out", str(tmp_path / "m.h5ad"), "--report", str(bad)])
        assert rc == 2
        err = capsys.readouterr().err
        assert "--report" in err and msg in err
    assert not (tmp_path / "m.h5ad").exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"

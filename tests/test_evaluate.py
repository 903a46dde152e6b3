"""`scpermut evaluate` and the LOBO harness, end to end on small real data."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scpermut_dist.commands.main import main
from scpermut_dist.config import RunConfig
from scpermut_dist.evaluation import lobo as evaluate

TINY = ["train.max_epochs=2", "model.hidden_sizes=[32]", "model.latent_dim=8", "data.n_hvg=200",
        "model.classifier_hidden=16", "model.dann_hidden=16", "train.batch_size=64"]


@pytest.fixture(scope="module")
def kang_small(datasets_dir, tmp_path_factory):
    """360 Kang PBMCs from 3 samples, written as a real h5ad."""
    a = ad.read_h5ad(datasets_dir / "kang2018_pbmc_ifnb_4samples.h5ad")
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(a.obs["batch"] == b), 120, replace=False)
                           for b in ("ctrl101", "stim101", "ctrl107")])
    a = a[np.sort(keep)].copy()
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    a.write_h5ad(path)
    return path


def _cli(*argv):
    return main(["evaluate", *argv])


def test_evaluate_end_to_end_with_scpermut_and_baselines(kang_small, tmp_path):
    out = tmp_path / "report"
    args = ["--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch", "--out", str(out),
            "--quiet"]
    for s in TINY:
        args += ["--set", s]
    assert _cli(*args) == 0
    report = json.loads((out / "metrics.json").read_text())
    methods = {"scpermut", "logreg_celltypist", "knn_pca"}
    assert set(report["methods"]) == methods
    assert len(report["folds"]) == 3
    for fold in report["folds"]:
        assert fold["query_batch"] not in fold["ref_batches"]
        assert len(fold["ref_batches"]) == 2 and fold["n_query"] == 120 and fold["n_ref"] == 240
        for name in methods:
            m = fold["methods"][name]
            for key in ("balanced_accuracy", "accuracy", "macro_f1", "mcc", "cohen_kappa", "ari", "nmi"):
                assert 0.0 <= m[key] <= 1.0 or key in ("mcc", "cohen_kappa", "ari")
            assert set(m["per_class_f1"]) >= set(pd.read_csv(out / "predictions.csv").query(
                f"fold == {fold['fold']}")["true"])
            assert m["size_bins"]
        assert 0.0 <= fold["methods"]["scpermut"]["batch_entropy"] <= 1.0
        for png in fold["plots"]:
            assert (out / png).stat().st_size > 1000
        assert any(p.startswith("latent_") for p in fold["plots"])
    for name in methods:
        mean = report["mean"][name]
        assert {"balanced_accuracy", "accuracy", "macro_f1", "per_class_f1"} <= set(mean)
        folds_ba = [f["methods"][name]["balanced_accuracy"] for f in report["folds"]]
        assert mean["balanced_accuracy"] == pytest.approx(np.mean(folds_ba))
    assert report["summary"]["best_baseline"] in ("logreg_celltypist", "knn_pca")
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 360 and set(preds.columns) >= {"cell", "fold", "batch", "true", *methods}
    assert report["dataset"]["config"]["train"]["max_epochs"] == 2
    assert not list(tmp_path.glob(".report*"))  # no temp folder left behind


def test_several_seeds_are_methods_and_the_summary_gives_their_mean(kang_small, tmp_path):
    out = tmp_path / "seeds"
    args = ["--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch", "--out", str(out),
            "--quiet", "--no-umap", "--methods", "scpermut,logreg_celltypist", "--seeds", "3,4"]
    for s in TINY:
        args += ["--set", s]
    assert _cli(*args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["methods"] == ["scpermut", "scpermut_seed4", "logreg_celltypist"]
    s = report["summary"]
    assert s["best_baseline"] == "logreg_celltypist"  # seeds are not baselines
    bas = [report["mean"][n]["balanced_accuracy"] for n in ("scpermut", "scpermut_seed4")]
    assert s["scpermut_seed_mean"]["balanced_accuracy"] == pytest.approx(np.mean(bas))
    assert s["scpermut_seed_mean_minus_best_baseline_balanced_accuracy"] == pytest.approx(
        np.mean(bas) - report["mean"]["logreg_celltypist"]["balanced_accuracy"])
    assert report["dataset"]["config"]["train"]["seed"] == 3 and report["dataset"]["seeds"] == [3, 4]
    assert "query-in-training" not in report["protocol"]


def test_query_in_training_adds_the_query_unlabelled_as_its_own_batch(kang_small, tmp_path):
    """The authors' transductive protocol: query cells join training without labels, genes from the reference."""
    a = ad.read_h5ad(kang_small)
    cfg = RunConfig.from_yaml(None, TINY + ["data.n_hvg=150"])
    is_q = (a.obs["batch"] == "stim101").to_numpy()
    ref, query = a[~is_q].copy(), a[is_q].copy()
    query.obs = query.obs.drop(columns=["cell_type"])
    fold = evaluate.Fold(0, "stim101", "cell_type", "batch")
    out = evaluate.scpermut_method(cfg, with_query=True)(ref, query, fold)
    seen = out.info["training_data"]
    assert seen["n_cells"] == a.n_obs and seen["n_labelled"] == ref.n_obs
    assert seen["batch_counts"]["query:stim101"] == query.n_obs and "stim101" not in seen["batch_counts"]
    assert evaluate.QUERY_UNLABELED not in seen["class_counts"]
    assert seen["n_genes"] == len(evaluate.reference_genes(ref, fold, cfg)) == 150  # HVGs of the reference
    assert len(out.labels) == query.n_obs and set(out.labels) <= set(ref.obs["cell_type"])
    plain = evaluate.scpermut_method(cfg)(ref, query, fold).info["training_data"]
    assert plain["n_cells"] == ref.n_obs and "query:stim101" not in plain["batch_counts"]


def test_report_states_when_the_query_joined_training(kang_small, tmp_path):
    a = ad.read_h5ad(kang_small)
    const = {"const": lambda ref, query, fold: evaluate.MethodOutput(np.full(query.n_obs, "B cells", dtype=object))}
    plain = evaluate.run_lobo(a, "cell_type", "batch", tmp_path / "p", methods=const, progress=False, plots_umap=False)
    trans = evaluate.run_lobo(a, "cell_type", "batch", tmp_path / "t", methods=const, progress=False, plots_umap=False,
                              meta={"query_in_training": True})
    assert "query-in-training" not in plain["protocol"] and "query-in-training" in trans["protocol"]


def test_methods_never_see_query_labels_or_batch(kang_small, tmp_path):
    """A probe method records what the harness hands it on each fold."""
    a = ad.read_h5ad(kang_small)
    seen = []

    def probe(ref, query, fold):
        seen.append((fold.query_batch, set(ref.obs["batch"]), set(query.obs["batch"]), set(query.obs.columns)))
        return evaluate.MethodOutput(np.full(query.n_obs, ref.obs["cell_type"].iloc[0], dtype=object))

    report = evaluate.run_lobo(a, "cell_type", "batch", tmp_path / "r", methods={"probe": probe}, progress=False)
    assert [s[0] for s in seen] == sorted(a.obs["batch"].unique())
    for qb, ref_batches, query_batches, query_cols in seen:
        assert query_batches == {qb} and qb not in ref_batches
        assert "cell_type" not in query_cols
    assert report["mean"]["probe"]["balanced_accuracy"] < 0.5  # constant prediction over 5 types


def test_failed_run_leaves_existing_report_untouched(kang_small, tmp_path):
    a = ad.read_h5ad(kang_small)
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.json").write_text("{\"old\": true}")

    def broken(ref, query, fold):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate.run_lobo(a, "cell_type", "batch", out, methods={"broken": broken}, progress=False)
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_obs_filter_selects_cellbench_singlets(datasets_dir, tmp_path):
    out = tmp_path / "cb"
    assert _cli("--h5ad", str(datasets_dir / "cellbench_5cl_3plates.h5ad"), "--label-key", "cell_line",
                "--batch-key", "batch", "--obs-filter", "demuxlet_cls == 'SNG'", "--out", str(out),
                "--methods", "logreg_celltypist", "--quiet") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["dataset"]["n_cells"] == 571
    assert sum(f["n_query"] for f in report["folds"]) == 571
    assert report["mean"]["logreg_celltypist"]["balanced_accuracy"] > 0.9


@pytest.mark.parametrize("argv, message", [
    (["--batch-key", "donor_one"], "single value"),
    (["--batch-key", "nope"], "no column"),
    (["--obs-filter", "cell_type == 'nothing'"], "matches no cell"),
    (["--obs-filter", "no_such_col > 1"], "bad --obs-filter"),
    (["--methods", "scpermut,svm"], "unknown"),
    (["--set", "loss.nonsense=1"], "unknown config key"),
    (["--seeds", "1,x"], "integers separated by commas"),
    (["--seeds", "1", "--methods", "knn_pca"], "scPermut among --methods"),
])
def test_clear_errors_and_no_output(kang_small, tmp_path, capsys, argv, message):
    a = ad.read_h5ad(kang_small)
    a.obs["donor_one"] = "101"
    path = tmp_path / "k.h5ad"
    a.write_h5ad(path)
    out = tmp_path / "out"
    base = {"--h5ad": str(path), "--label-key": "cell_type", "--batch-key": "batch", "--out": str(out)}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    args = [x for kv in base.items() for x in kv] + ["--quiet", "--no-umap"]
    assert _cli(*args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_replace_a_folder_that_is_not_a_report(kang_small, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert _cli("--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch",
                "--out", str(tmp_path), "--methods", "knn_pca", "--quiet") == 2
    assert "not an earlier report" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_plots_write_pngs_and_fall_back_to_pca_for_tiny_latents(tmp_path):
    from scpermut_dist.evaluation import plots

    z = np.random.default_rng(0).normal(size=(6, 4))
    how = plots.latent_views(z, list("aabbcc"), list("xyxyxy"), tmp_path / "l.png", is_query=[0, 0, 0, 1, 1, 1])
    assert how == "PCA" and (tmp_path / "l.png").stat().st_size > 1000
    plots.confusion_matrices({"m": (np.array(["a", "b"]), np.array(["a", "c"]))}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    cm = plots._row_normalised(["a", "a", "b"], ["a", "b", "b"], ["a", "b"], ["a", "b"])
    assert np.allclose(cm, [[0.5, 0.5], [0.0, 1.0]])

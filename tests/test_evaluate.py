"""`scpermut evaluate` and the LOBO harness, end to end on small real data."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    matthews_corrcoef,
    normalized_mutual_info_score,
)

from scpermut_dist.commands.main import main
from scpermut_dist.config import RunConfig
from scpermut_dist.evaluation import lobo as evaluate
from scpermut_dist.evaluation import metrics

TINY = ["train.max_epochs=2", "model.hidden_sizes=[32]", "model.latent_dim=8", "data.n_hvg=200",
        "model.classifier_hidden=16", "model.dann_hidden=16", "train.batch_size=64", "model.ensemble_size=1"]


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
    kang = ad.read_h5ad(kang_small)
    report = json.loads((out / "metrics.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    methods = {"scpermut", "logreg_celltypist", "knn_pca", "celltypist"}
    assert set(report["methods"]) == methods
    assert len(report["folds"]) == 3
    for fold in report["folds"]:
        assert fold["query_batch"] not in fold["ref_batches"]
        assert len(fold["ref_batches"]) == 2 and fold["n_query"] == 120 and fold["n_ref"] == 240
        for name in methods:
            m = fold["methods"][name]
            fold_preds = preds.query(f"fold == {fold['fold']}")
            t, p = fold_preds["true"].astype(str), fold_preds[name].astype(str)
            # every metric is sklearn's on the predictions written out, each in its own range
            for key, fn in (("balanced_accuracy", balanced_accuracy_score), ("accuracy", accuracy_score),
                            ("mcc", matthews_corrcoef), ("cohen_kappa", cohen_kappa_score),
                            ("ari", adjusted_rand_score), ("nmi", normalized_mutual_info_score)):
                assert m[key] == pytest.approx(fn(t, p)), key
            assert m["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
            for key in ("balanced_accuracy", "accuracy", "macro_f1", "nmi"):
                assert 0.0 <= m[key] <= 1.0, key
            assert -1.0 <= m["mcc"] <= 1.0 and -1.0 <= m["cohen_kappa"] <= 1.0 and -0.5 <= m["ari"] <= 1.0
            assert m["seconds"] > 0
            assert set(m["per_class_f1"]) >= set(pd.read_csv(out / "predictions.csv").query(
                f"fold == {fold['fold']}")["true"])
            # size bins: the metrics of each bin's cells, bins from the fold's reference frequencies
            freq = metrics.reference_class_freq(kang.obs["cell_type"][kang.obs["batch"] != fold["query_batch"]])
            want = metrics.size_bin_metrics(t.to_numpy(), p.to_numpy(), freq)
            assert set(m["size_bins"]) == set(want) and sum(b["n_cells"] for b in m["size_bins"].values()) == 120
            for name_bin, wb in want.items():
                gb, in_bin = m["size_bins"][name_bin], t.isin(wb["types"]).to_numpy()
                assert gb["types"] == wb["types"] and gb["n_cells"] == in_bin.sum()
                assert gb["accuracy"] == pytest.approx((t == p).to_numpy()[in_bin].mean())
                for key in ("balanced_accuracy", "macro_f1", "macro_f1_of_types"):
                    assert gb[key] == pytest.approx(wb[key]), (name_bin, key)
        assert 0.0 <= fold["methods"]["scpermut"]["batch_entropy"] <= 1.0
        for png in fold["plots"]:
            assert (out / png).stat().st_size > 1000
        assert any(p.startswith("latent_") for p in fold["plots"])
    for name in methods:
        mean = report["mean"][name]
        assert {"balanced_accuracy", "accuracy", "macro_f1", "per_class_f1"} <= set(mean)
        folds_ba = [f["methods"][name]["balanced_accuracy"] for f in report["folds"]]
        assert mean["balanced_accuracy"] == pytest.approx(np.mean(folds_ba))
    assert report["summary"]["best_baseline"] in ("logreg_celltypist", "knn_pca", "celltypist")
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
    (["--semi-supervised", "1.5", "--methods", "knn"], "between 0 and 1"),
    (["--semi-supervised", "0.5", "--holdout-type", "B cells"], "its own protocol"),
    (["--semi-supervised", "0.5", "--mask-seeds", "a", "--methods", "knn"], "--mask-seeds"),
    (["--holdout-type", "Martians", "--methods", "knn"], "not a type of 'cell_type'"),
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


@pytest.fixture(scope="module")
def cellbench_3cl(datasets_dir, tmp_path_factory):
    """CellBench 3 cell lines x 2 platforms, singlets, as a real h5ad."""
    a = ad.read_h5ad(datasets_dir / "cellbench_3cl_2platforms.h5ad")
    a = a[a.obs["demuxlet_cls"] == "SNG"].copy()
    path = tmp_path_factory.mktemp("cb3") / "cb3.h5ad"
    a.write_h5ad(path)
    return a, path


def test_celltypist_is_a_baseline_with_time_to_result_and_quiet_output(cellbench_3cl, tmp_path, capsys):
    from pathlib import Path

    home_ct = Path.home() / ".celltypist"
    existed = home_ct.exists()
    a, path = cellbench_3cl
    out = tmp_path / "ct"
    assert _cli("--h5ad", str(path), "--label-key", "cell_line", "--batch-key", "batch", "--out", str(out),
                "--methods", "logreg,celltypist", "--quiet", "--no-umap") == 0
    printed = capsys.readouterr()
    report = json.loads((out / "metrics.json").read_text())
    assert report["methods"] == ["logreg_celltypist", "celltypist"]  # the alias resolves to the canonical name
    assert len(report["folds"]) == a.obs["batch"].nunique() == 2
    for fold in report["folds"]:
        m = fold["methods"]["celltypist"]
        assert m["balanced_accuracy"] > 0.9 and m["seconds"] > 0  # cell lines: easy for a linear model
    mean_s = report["summary"]["celltypist"]["seconds"]
    assert mean_s == pytest.approx(np.mean([f["methods"]["celltypist"]["seconds"] for f in report["folds"]]))
    assert "s/fold" in printed.out and "time to result" in printed.out and "celltypist" in printed.out
    assert "🏋" not in printed.out + printed.err and "Training data" not in printed.out + printed.err
    assert home_ct.exists() == existed  # its model stays in memory, nothing in the home folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_celltypist_baseline_matches_the_package_run_by_hand(cellbench_3cl):
    """Same labels as celltypist.train + annotate on 1e4-normalised log1p data, run directly."""
    import scanpy as sc

    from scpermut_dist.evaluation.celltypist_baseline import (
        _import_celltypist,
        _sklearn_compat,
        celltypist_baseline,
    )

    a, _ = cellbench_3cl
    b0 = min(a.obs["batch"].astype(str).unique())
    ref, query = a[a.obs["batch"] != b0].copy(), a[a.obs["batch"] == b0].copy()
    res = celltypist_baseline(ref, ref.obs["cell_line"].to_numpy(), query)
    ct = _import_celltypist()
    r2, q2 = ref.copy(), query.copy()
    for x in (r2, q2):
        sc.pp.normalize_total(x, target_sum=1e4)
        sc.pp.log1p(x)
    with _sklearn_compat(ct):
        model = ct.train(r2, labels=r2.obs["cell_line"].astype(str).to_numpy(), n_jobs=1)
    direct = ct.annotate(q2, model=model).predicted_labels["predicted_labels"].astype(str).to_numpy()
    assert (res.labels == direct).mean() >= 0.99
    assert set(model.classifier.classes_) == set(ref.obs["cell_line"].astype(str))
    assert model.classifier.coef_.shape[0] == len(model.classifier.classes_)  # one-vs-rest: a row per class
    assert res.confidence.shape == (query.n_obs,) and ((res.confidence > 0) & (res.confidence < 1)).all()


def test_label_mask_is_stratified_seeded_and_hides_only_labelled_cells():
    from scpermut_dist.evaluation.semisupervised import hide_labels

    labels = np.array(["a"] * 50 + ["b"] * 10 + ["c"] * 2 + [None] * 8, dtype=object)
    batches = np.array(["x", "y"] * 35)
    h = hide_labels(labels, batches, 0.7, seed=1)
    assert np.array_equal(h, hide_labels(labels, batches, 0.7, seed=1))
    assert not np.array_equal(h, hide_labels(labels, batches, 0.7, seed=2))
    assert not h[labels == None].any()  # unlabelled cells are never "hidden"
    for b in ("x", "y"):
        for t, n in (("a", 25), ("b", 5)):
            g = (batches == b) & (labels == t)
            assert g.sum() == n and h[g].sum() == min(round(0.7 * n), n - 1)  # each type keeps labels per batch
    assert 0.6 < h[labels != None].mean() < 0.75


def test_semi_supervised_never_lets_a_hidden_label_reach_training(cellbench_3cl, tmp_path, monkeypatch):
    from scpermut_dist import api
    from scpermut_dist.evaluation import semisupervised as semi

    a, _ = cellbench_3cl
    handed = []
    real_fit = api.fit

    def spy_fit(adata, label_key, *args, **kwargs):  # the real fit, recording the AnnData it receives
        handed.append((adata.obs.copy(), kwargs.get("unlabeled_value")))
        return real_fit(adata, label_key, *args, **kwargs)

    monkeypatch.setattr(api, "fit", spy_fit)
    seen = []

    def probe(ref, query, fold):  # what a baseline receives
        seen.append((set(ref.obs_names), set(query.obs_names), set(query.obs.columns)))
        return evaluate.MethodOutput(np.full(query.n_obs, "A549", dtype=object))

    cfg = RunConfig.from_yaml(None, TINY + ["train.num_threads=1"])
    methods = {"scpermut": semi.scpermut_semisupervised_method(cfg), "probe": probe,
               **{k: v for k, v in evaluate.baseline_methods().items() if k in ("logreg_celltypist", "celltypist")}}
    report = semi.run_semisupervised(a, "cell_line", "batch", tmp_path / "semi", methods=methods, fraction=0.7,
                                     mask_seeds=[5], progress=False, plots_umap=False)
    fold = report["folds"][0]
    hidden = semi.hide_labels(a.obs["cell_line"].to_numpy(dtype=object), a.obs["batch"], 0.7, 5)
    names = a.obs_names.to_numpy()
    assert fold["mask_seed"] == 5 and fold["n_hidden"] == hidden.sum() and fold["n_query"] == hidden.sum()
    assert abs(fold["hidden_fraction"] - 0.7) < 0.02
    # scPermut: every cell, hidden ones marked unlabelled in their own batch, the others with their label
    (obs, unlabeled), = handed
    assert unlabeled == semi.HIDDEN and len(obs) == a.n_obs
    lab = obs["cell_line"].astype(str)
    assert set(lab[lab == semi.HIDDEN].index) == set(names[hidden])
    assert (lab[names[~hidden]].to_numpy() == a.obs["cell_line"].astype(str).to_numpy()[~hidden]).all()
    assert (obs["batch"].astype(str)[names].to_numpy() == a.obs["batch"].astype(str).to_numpy()).all()
    info = fold["methods"]["scpermut"]["info"]["training_data"]
    assert info["n_labelled"] == (~hidden).sum() and semi.HIDDEN not in info["class_counts"]
    # baselines: trained on the labelled cells only, the hidden cells arrive without a label column
    (ref_names, query_names, query_cols), = seen
    assert ref_names == set(names[~hidden]) and query_names == set(names[hidden]) and "cell_line" not in query_cols
    preds = pd.read_csv(tmp_path / "semi" / "predictions.csv")
    assert set(preds["cell"]) == set(names[hidden])
    truth = a.obs["cell_line"].astype(str)[preds["cell"]].to_numpy()
    assert (preds["true"].to_numpy() == truth).all()
    for n in ("scpermut", "logreg_celltypist", "celltypist"):
        m = fold["methods"][n]
        assert m["n_cells"] == hidden.sum() and set(m["per_class"]) == set(a.obs["cell_line"].astype(str))
        # scored on the hidden cells' true labels, as sklearn scores the predictions written out
        p = preds[n].astype(str)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, p))
        assert m["macro_f1"] == pytest.approx(f1_score(truth, p, average="macro", zero_division=0))
        assert m["seconds"] > 0
    assert fold["methods"]["logreg_celltypist"]["balanced_accuracy"] > 0.9
    assert "semi-supervised" in report["protocol"] and report["dataset"]["mask_seeds"] == [5]


def test_semi_supervised_cli_one_split_per_mask_seed(cellbench_3cl, tmp_path, capsys):
    _, path = cellbench_3cl
    out = tmp_path / "s"
    assert _cli("--h5ad", str(path), "--label-key", "cell_line", "--batch-key", "batch", "--out", str(out),
                "--methods", "logreg", "--semi-supervised", "0.7", "--mask-seeds", "0,1", "--quiet") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert [f["mask_seed"] for f in report["folds"]] == [0, 1]
    assert report["dataset"]["semi_supervised"] == 0.7
    preds = pd.read_csv(out / "predictions.csv")
    a = set(preds.query("fold == 0")["cell"])
    assert a != set(preds.query("fold == 1")["cell"])  # different masks
    assert "hidden_seed0" in capsys.readouterr().out


def test_rare_types_have_per_class_precision_recall_f1_per_fold_and_pooled(kang_small, tmp_path, capsys):
    a = ad.read_h5ad(kang_small)
    out = tmp_path / "rare"
    assert _cli("--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch", "--out", str(out),
                "--methods", "logreg,knn", "--quiet") == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    counts = a.obs["cell_type"].astype(str).value_counts()
    rarest = sorted(counts.index, key=lambda c: (counts[c], c))[:3]
    assert list(report["rare_types"]) == rarest
    preds = pd.read_csv(out / "predictions.csv")
    for name in ("logreg_celltypist", "knn_pca"):
        for fold in report["folds"]:
            m = fold["methods"][name]
            assert list(m["rare_types"]) == list(fold["rare_types"]) and len(fold["rare_types"]) >= 3
            for t, r in m["rare_types"].items():
                assert r == m["per_class"].get(t, r) and r["support"] == (
                    preds.query(f"fold == {fold['fold']}")["true"] == t).sum()
        pooled = report["pooled"][name]["rare_types"]
        for t in rarest:
            hit = (preds["true"] == t) & (preds[name] == t)
            assert pooled[t]["support"] == counts[t]
            assert pooled[t]["recall"] == pytest.approx(hit.sum() / counts[t])
            assert pooled[t]["precision"] == pytest.approx(hit.sum() / max((preds[name] == t).sum(), 1))
    assert "rare types, pooled" in printed and rarest[0][:16] in printed


def test_metrics_rare_types_takes_the_rarest_and_all_below_the_threshold():
    from scpermut_dist.evaluation import metrics

    freq = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.04, "e": 0.005, "f": 0.005}
    assert metrics.rare_types(freq) == ["e", "f", "d"]
    assert metrics.rare_types(freq, n=1, below=0.05) == ["e", "f", "d"]
    assert metrics.rare_types(freq, n=2, below=0.001) == ["e", "f"]
    d = metrics.unknown_detection([1, 1, 0, 0, 0], [0.9, 0.8, 0.1, 0.85, 0.2], [True, False, False, True, False])
    assert d["auroc"] == pytest.approx(5 / 6) and d["fraction_novel_unknown"] == 0.5
    assert d["fraction_known_unknown"] == pytest.approx(1 / 3)
    assert metrics.unknown_detection([0, 0], [0.1, 0.2])["auroc"] is None


def test_holdout_type_reports_auroc_and_unknown_fraction(kang_small, tmp_path, capsys):
    a = ad.read_h5ad(kang_small)
    out = tmp_path / "ho"
    args = ["--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch", "--out", str(out),
            "--methods", "scpermut,logreg,celltypist", "--holdout-type", "B cells", "--quiet", "--no-umap"]
    for s in TINY:
        args += ["--set", s]
    assert _cli(*args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert "'B cells' removed from every reference" in report["protocol"]
    printed = capsys.readouterr().out
    assert "held-out type 'B cells'" in printed and "ece_after=" in printed
    preds = pd.read_csv(out / "predictions.csv")
    for fold in report["folds"]:
        q = preds.query(f"fold == {fold['fold']}")
        n_b = int((q["true"] == "B cells").sum())
        assert fold["n_ref"] == int(((a.obs["batch"] != fold["query_batch"]) & (a.obs["cell_type"] != "B cells")).sum())
        assert "B cells" not in fold["methods"]["scpermut"]["info"]["training_data"]["class_counts"]
        for name in ("scpermut", "logreg_celltypist", "celltypist"):
            m = fold["methods"][name]
            assert m["n_cells"] == len(q) - n_b  # scored on the types the reference knows
            assert "B cells" not in set(q[name])
            h = m["holdout"]
            assert h["n_novel"] == n_b and 0.0 <= h["auroc"] <= 1.0
            from sklearn.metrics import roc_auc_score

            assert h["auroc"] == pytest.approx(roc_auc_score(q["true"] == "B cells", q[f"{name}_unknown_score"]))
        assert fold["methods"]["scpermut"]["holdout"]["score"] in ("1-confidence", "unknown_score")
        novel = (q["true"] == "B cells").to_numpy()
        for name in ("scpermut", "celltypist"):  # the abstentions written out, among the held-out type's cells
            h, flagged = fold["methods"][name]["holdout"], q[f"{name}_unknown"].astype(bool).to_numpy()
            assert h["fraction_novel_unknown"] == pytest.approx(flagged[novel].mean()), name
            assert h["fraction_known_unknown"] == pytest.approx(flagged[~novel].mean()), name
            assert fold["methods"][name]["fraction_unknown"] == pytest.approx(flagged[~novel].mean()), name
        assert fold["methods"]["logreg_celltypist"]["holdout"]["fraction_novel_unknown"] is None  # no unknown rule
    summary = report["holdout"]["scpermut"]
    assert summary["auroc"] == pytest.approx(np.mean([f["methods"]["scpermut"]["holdout"]["auroc"]
                                                      for f in report["folds"]]))
    # ECE before/after calibration, read from each fold's trained reference (metrics["calibration"])
    eces = [f["methods"]["scpermut"]["info"]["calibration"] for f in report["folds"]]
    for k in ("ece_before", "ece_after"):
        assert report["calibration"]["scpermut"][k] == pytest.approx(np.mean([e[k] for e in eces]))
    assert "ece_after" not in report["calibration"]["celltypist"]  # no temperature: only its query calibration
    # every method's calibration on the query cells it labels, from predictions.csv's confidences (15 bins, by hand)
    assert "calibration on the query cells" in printed
    for name in ("scpermut", "logreg_celltypist", "celltypist"):
        per_fold = []
        for fold in report["folds"]:
            q = preds.query(f"fold == {fold['fold']} and true != 'B cells'")
            conf, correct = q[f"{name}_confidence"].to_numpy(), (q[name] == q["true"]).to_numpy()
            ece = sum(abs(correct[b].sum() - conf[b].sum()) for b in
                      (((conf > i / 15) | (i == 0)) & (conf <= (i + 1) / 15) for i in range(15))) / len(q)
            assert fold["methods"][name]["query_calibration"]["ece"] == pytest.approx(ece), name
            assert fold["methods"][name]["query_calibration"]["accuracy"] == pytest.approx(correct.mean()), name
            per_fold.append(ece)
        assert report["calibration"][name]["query_ece"] == pytest.approx(np.mean(per_fold)), name


def test_finetune_reports_the_adapted_model_beside_the_reference_only_one(kang_small, tmp_path):
    out = tmp_path / "ft"
    args = ["--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch", "--out", str(out),
            "--methods", "scpermut,knn", "--finetune", "--quiet", "--no-umap"]
    for s in TINY:
        args += ["--set", s]
    assert _cli(*args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["methods"] == ["scpermut", "scpermut_finetuned", "knn_pca"]
    assert report["summary"]["best_baseline"] == "knn_pca"  # a variant of scPermut is never its baseline
    preds = pd.read_csv(out / "predictions.csv")
    for fold in report["folds"]:
        base, tuned = fold["methods"]["scpermut"], fold["methods"]["scpermut_finetuned"]
        ft = tuned["info"]["finetune"]
        assert ft["n_query_cells"] == fold["n_query"] and len(ft["new_batches"]) == 1
        assert "finetune" not in base["info"]
        assert tuned["seconds"] > base["seconds"]  # fit + fine-tune + map vs fit + map of the same model
        q = preds.query(f"fold == {fold['fold']}")
        t = q["true"].astype(str)
        for name, m in (("scpermut", base), ("scpermut_finetuned", tuned)):
            p = q[name].astype(str)  # each scored on its own predictions
            assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p)), name
            assert m["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0)), name
            # both embed reference + query: the latent metrics compare their mixing
            assert 0.0 <= m["batch_entropy"] <= 1.0
    assert {"scpermut", "scpermut_finetuned"} <= set(preds.columns)
    assert _cli("--h5ad", str(kang_small), "--label-key", "cell_type", "--batch-key", "batch", "--out",
                str(tmp_path / "x"), "--methods", "knn", "--finetune") == 2
    assert not (tmp_path / "x").exists()

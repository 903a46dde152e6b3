"""The focal/DANN ablation: its data, its split, its pairing, and a --quick run end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scpermut_dist.commands.main import main
from scpermut_dist.evaluation import ablation


def test_generated_data_is_imbalanced_with_batches_and_rare_types():
    a = ablation.make_dataset(4000, 100, seed=0)
    freq = a.obs[ablation.LABEL].value_counts(normalize=True)
    assert freq.max() > 0.1
    assert ((freq >= 0.001) & (freq < 0.01)).sum() >= 2  # several rare (0.1-1 %) types
    assert a.obs[ablation.BATCH].nunique() >= 2
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    assert np.all(x >= 0) and np.allclose(x, np.round(x))  # raw counts


def test_planted_rare_types_are_subtypes_by_default():
    sub = ablation.make_dataset(4000, 200, seed=0)
    distinct = ablation.make_dataset(4000, 200, seed=0, rare_subtype_markers=None)
    assert (sub.obs[ablation.LABEL].to_numpy() == distinct.obs[ablation.LABEL].to_numpy()).all()  # same cells
    assert (sub.X != distinct.X).nnz > 0  # only the rare types' expression differs
    rare = ~np.isin(sub.obs[ablation.LABEL].astype(str), ["ionocyte", "hematopoietic stem cell",
                                                         "pulmonary neuroendocrine cell", "innate lymphoid cell"])
    assert (sub.X[np.flatnonzero(rare)] != distinct.X[np.flatnonzero(rare)]).nnz == 0


def test_query_split_is_stratified_and_keeps_every_type_in_the_reference():
    labels = np.array(["a"] * 100 + ["b"] * 8 + ["c"] * 2)
    q = ablation.split_query(labels, fraction=0.25, seed=0)
    assert q[:100].sum() == 25 and q[100:108].sum() == 2 and q[108:].sum() == 1
    assert np.array_equal(q, ablation.split_query(labels, fraction=0.25, seed=0))
    for c in "abc":
        assert (~q & (labels == c)).any()


def test_comparisons_are_paired_by_seed():
    runs = []
    for seed, (f, ce, e_d, e_nd) in enumerate([(0.8, 0.6, 0.9, 0.5), (0.7, 0.75, 0.8, 0.6)]):
        base = {"balanced_accuracy": 0.9, "query_silhouette_label": 0.1, "bin_0.1-1%_f1": 0.5, "seed": seed,
                "query_batch_entropy_within_type": 0.7}
        runs += [{"variant": "focal_dann", "rare_f1_mean": f, "query_batch_entropy": e_d, **base},
                 {"variant": "ce_dann", "rare_f1_mean": ce, "query_batch_entropy": e_d, **base},
                 {"variant": "focal_no_dann", "rare_f1_mean": f, "query_batch_entropy": e_nd, **base}]
    c = ablation.compare(runs)
    assert c["focal_vs_ce_rare_f1"]["delta_per_seed"] == pytest.approx([0.2, -0.05])
    assert c["focal_vs_ce_rare_f1"]["n_seeds_a_better"] == 1
    assert c["dann_vs_no_dann_batch_entropy"]["delta_mean"] == pytest.approx(0.3)
    assert "query batch entropy" in ablation.format_table({"comparisons": c, "seeds": [0, 1], "dataset": {
        "rare_types": ["r"], "query_cells_per_rare_type": {"r": 3}}})


def test_a_run_of_one_comparison_reports_only_that_comparison():
    base = {"balanced_accuracy": 0.9, "query_silhouette_label": 0.1, "bin_0.1-1%_f1": 0.5, "seed": 3,
            "query_batch_entropy": 0.8, "query_batch_entropy_within_type": 0.7}
    runs = [{"variant": "focal_dann", "rare_f1_mean": 0.4, **base}, {"variant": "ce_dann", "rare_f1_mean": 0.3, **base}]
    c = ablation.compare(runs)
    assert set(c) == {"focal_vs_ce_rare_f1", "focal_vs_ce_bin_0.1-1%_f1", "focal_vs_ce_balanced_accuracy"}
    table = ablation.format_table({"comparisons": c, "seeds": [3], "dataset": {
        "rare_types": ["r"], "query_cells_per_rare_type": {"r": 3}}})
    assert "rare-type F1" in table and "batch entropy" not in table
    with pytest.raises(ValueError, match="choose one of"):
        ablation.run_ablation("unused", quick=True, only="nonsense")


def test_the_alpha_cap_comparison_caps_only_its_capped_variant(capsys):
    assert ablation.variant_overrides("alpha_cap", 3.0) == {"focal_dann": ["loss.focal_alpha_max=null"],
                                                            "focal_capped_dann": ["loss.focal_alpha_max=3.0"]}
    assert ablation.variant_overrides(None)["focal_dann"] == []
    assert "focal_capped_dann" not in ablation.variant_overrides(None)
    from scpermut_dist.config import RunConfig
    capped_config = RunConfig().apply_overrides(["loss.focal_alpha_max=2"])  # as if from --config
    arms = {v: capped_config.apply_overrides(o).loss.focal_alpha_max
            for v, o in ablation.variant_overrides("alpha_cap", 3.0).items()}
    assert arms == {"focal_dann": None, "focal_capped_dann": 3.0}
    base = {"query_silhouette_label": 0.1, "query_batch_entropy": 0.8, "query_batch_entropy_within_type": 0.7}
    runs = [{"variant": "focal_dann", "seed": s, "rare_f1_mean": f, "bin_0.1-1%_f1": f, "balanced_accuracy": 0.8, **base}
            for s, f in ((0, 0.3), (1, 0.5))]
    runs += [{"variant": "focal_capped_dann", "seed": s, "rare_f1_mean": f, "bin_0.1-1%_f1": f,
              "balanced_accuracy": 0.7, **base} for s, f in ((0, 0.4), (1, 0.2))]
    c = ablation.compare(runs)
    assert set(c) == {"uncapped_vs_capped_rare_f1", "uncapped_vs_capped_bin_0.1-1%_f1",
                      "uncapped_vs_capped_balanced_accuracy", "uncapped_vs_capped_false_rare_calls"}
    assert c["uncapped_vs_capped_rare_f1"]["delta_per_seed"] == pytest.approx([-0.1, 0.3])
    assert c["uncapped_vs_capped_balanced_accuracy"]["delta_mean"] == pytest.approx(0.1)
    table = ablation.format_table({"comparisons": c, "seeds": [0, 1], "dataset": {
        "rare_types": ["r"], "query_cells_per_rare_type": {"r": 3}}})
    assert "capped" in table and "CE" not in table
    assert main(["bench", "ablation", "--out", "unused", "--alpha-cap", "3"]) == 2  # the cap needs --only alpha_cap
    assert "--only alpha_cap" in capsys.readouterr().err
    assert main(["bench", "ablation", "--out", "unused", "--only", "alpha_cap", "--alpha-cap", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err
    assert main(["bench", "ablation", "--out", "unused", "--only", "alpha_cap", "--set", "loss.focal_alpha_max=5"]) == 2
    assert "ablation varies" in capsys.readouterr().err


METRIC_OF = {"rare_f1": "rare_f1_mean", "bin_0.1-1%_f1": "bin_0.1-1%_f1", "balanced_accuracy": "balanced_accuracy",
             "batch_entropy": "query_batch_entropy", "batch_entropy_within_type": "query_batch_entropy_within_type",
             "silhouette": "query_silhouette_label", "false_rare_calls": "false_rare_calls"}


def _check_runs_and_comparisons(report):
    """rare_f1_mean is the mean of the rare types' F1s, each F1 is 2PR/(P+R) of its precision and recall, and
    every comparison is its two variants' run values, paired by seed (NaN is written as null)."""
    rare = report["dataset"]["rare_types"]
    for r in report["runs"]:
        f1 = r["per_class_f1"]
        assert r["rare_f1_mean"] == pytest.approx(np.mean([f1[c] for c in rare]))
        for c in rare:
            p, q = r["rare_precision"][c], r["rare_recall"][c]
            assert f1[c] == pytest.approx(2 * p * q / (p + q) if p + q else 0.0, abs=1e-12), c
    run = {(r["variant"], r["seed"]): r for r in report["runs"]}
    for name, c in report["comparisons"].items():
        prefix = next(p for p in ("focal_vs_ce_", "dann_vs_no_dann_", "uncapped_vs_capped_") if name.startswith(p))
        key = METRIC_OF[name[len(prefix):]]
        a, b = [k for k in c if k not in ("delta_mean", "delta_per_seed", "n_seeds_a_better")]
        va, vb = ([run[(v, s)][key] for s in report["seeds"]] for v in (a, b))
        assert c[a]["per_seed"] == va and c[b]["per_seed"] == vb, name
        if None in va + vb:
            continue
        assert c["delta_per_seed"] == pytest.approx([x - y for x, y in zip(va, vb)]), name
        assert c["delta_mean"] == pytest.approx(np.mean(c["delta_per_seed"]))
        assert c["n_seeds_a_better"] == sum(x > y for x, y in zip(va, vb))


def test_a_variant_scores_rare_types_from_its_predictions(monkeypatch):
    """run_variant's scoring on a model stub with known predictions (a --quick run predicts no rare type at
    all, so its rare F1s are all 0 and cannot tell the formulas apart)."""
    import types

    import anndata as ad

    from scpermut_dist import api

    truth = np.array(["a"] * 6 + ["r1"] * 2 + ["r2"] * 2)
    pred = np.array(["a"] * 5 + ["r1", "r1", "a", "r2", "r2"])
    z = np.random.default_rng(0).normal(size=(10, 3))
    stub = types.SimpleNamespace(map=lambda q: types.SimpleNamespace(labels=pred, latent=z))
    monkeypatch.setattr(api, "fit", lambda *a, **k: stub)
    query = ad.AnnData(obs=pd.DataFrame({ablation.BATCH: ["x", "y"] * 5}, index=[f"c{i}" for i in range(10)]))
    r = ablation.run_variant(None, query, truth, None, ["r1", "r2"], {"a": 0.9, "r1": 0.05, "r2": 0.005}, True)
    # r1: TP 1 (cell 6), FP 1 (cell 5), FN 1 (cell 7); r2: all right; a: 5 of 6 right, 1 false a (cell 7)
    assert r["rare_precision"] == pytest.approx({"r1": 0.5, "r2": 1.0})
    assert r["rare_recall"] == pytest.approx({"r1": 0.5, "r2": 1.0})
    assert r["per_class_f1"] == pytest.approx({"a": 5 / 6, "r1": 0.5, "r2": 1.0})
    assert r["rare_f1_mean"] == pytest.approx(0.75) and r["false_rare_calls"] == pytest.approx(1 / 6)
    assert r["bin_0.1-1%_f1"] == pytest.approx(1.0)  # only r2 (0.5 %) is in that bin
    assert r["balanced_accuracy"] == pytest.approx((5 / 6 + 0.5 + 1.0) / 3)


def test_quick_ablation_writes_its_json(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["bench", "ablation", "--out", str(out), "--quick", "--quiet", "--n-cells", "1500",
                 "--batch-strength", "1.5"]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert set(report) >= {"dataset", "variants", "seeds", "runs", "comparisons"}
    assert {r["variant"] for r in report["runs"]} == {"focal_dann", "ce_dann", "focal_no_dann"}  # no cap unless asked
    for r in report["runs"]:
        assert {"balanced_accuracy", "macro_f1", "per_class_f1", "rare_f1_mean", "bin_0.1-1%_f1", "size_bin_f1",
                "query_batch_entropy", "query_batch_entropy_within_type", "query_silhouette_label", "seconds",
                "rare_precision", "rare_recall"} <= set(r)
        assert all(c in r["per_class_f1"] for c in report["dataset"]["rare_types"])
    assert all(n >= 1 for n in report["dataset"]["query_cells_per_rare_type"].values())
    assert set(report["comparisons"]) >= {"focal_vs_ce_rare_f1", "dann_vs_no_dann_batch_entropy"}
    _check_runs_and_comparisons(report)
    assert report["dataset"]["rare_types"] and report["dataset"]["batch_strength"] == 1.5 != ablation.BATCH_STRENGTH
    assert "loss.dann_w=0" in report["variants"]["focal_no_dann"]
    assert "rare-type F1" in capsys.readouterr().out


def test_ablation_rejects_overriding_the_keys_under_test(tmp_path, capsys):
    assert main(["bench", "ablation", "--out", str(tmp_path / "x"), "--quick", "--set", "loss.dann_w=0.5"]) == 2
    assert "ablation varies" in capsys.readouterr().err
    assert main(["bench", "ablation", "--out", str(tmp_path / "x"), "--quick", "--rare-markers", "2"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["bench", "ablation", "--out", str(tmp_path / "x"), "--quick", "--batch-strength", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_trimming_rare_types_gives_them_atlas_scale_alphas():
    labels = np.array(["a"] * 900 + ["b"] * 90 + ["r"] * 10)
    q = ablation.split_query(labels, fraction=0.25, seed=0)
    trimmed = ablation.trim_rare_types(labels, q, ["r"], keep=2, seed=0)
    assert (~trimmed & (labels == "r")).sum() == 2  # two reference cells left
    assert (trimmed & (labels == "r")).sum() == 8  # the rest are scored in the query
    assert np.array_equal(trimmed[labels != "r"], q[labels != "r"])  # other types untouched
    assert not q[labels == "r"].all()  # the input mask is not modified in place
    from scpermut_dist.evaluation.metrics import reference_class_freq
    from scpermut_dist.model.losses import balanced_alpha
    freq = reference_class_freq(labels[~trimmed])
    alpha = ablation.balanced_alpha_of(freq)
    assert alpha["r"] > 100 > alpha["a"]
    assert alpha["r"] == pytest.approx(float(balanced_alpha(np.array([freq[c] for c in sorted(freq)]))[-1]))
    with pytest.raises(ValueError, match="at least one reference cell"):
        ablation.trim_rare_types(labels, q, ["r"], keep=0)


def test_false_rare_calls_counts_other_types_called_rare():
    truth = np.array(["a", "a", "a", "a", "r", "r"])
    pred = np.array(["r", "a", "a", "unknown", "r", "a"])
    assert ablation.false_rare_calls(truth, pred, ["r"]) == pytest.approx(0.25)  # 1 of the 4 "a" cells
    assert np.isnan(ablation.false_rare_calls(truth, pred, []))


def test_the_atlas_rare_variant_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["bench", "ablation", "--out", str(out), "--quick", "--quiet", "--n-cells", "1500",
                 "--only", "alpha_cap", "--rare-ref-cells", "2"]) == 0
    d = json.loads((out / "ablation.json").read_text())["dataset"]
    assert d["rare_ref_cells"] == 2 and d["alpha_max"] > 20
    report = json.loads((out / "ablation.json").read_text())
    runs = report["runs"]
    assert all(0.0 <= r["false_rare_calls"] <= 1.0 for r in runs)
    assert set(report["comparisons"]) == {"uncapped_vs_capped_rare_f1", "uncapped_vs_capped_bin_0.1-1%_f1",
                                          "uncapped_vs_capped_balanced_accuracy", "uncapped_vs_capped_false_rare_calls"}
    _check_runs_and_comparisons(report)
    assert all(d["alpha_of_rare_type"][c] > 20 for c in d["rare_types"])
    assert "2 reference cells each" in capsys.readouterr().out
    assert main(["bench", "ablation", "--out", str(out), "--only", "alpha_cap", "--rare-ref-cells", "0"]) == 2
    assert "at least one reference cell" in capsys.readouterr().err

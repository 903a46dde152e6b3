"""Calibrated confidence, "unknown" abstention, reference neighbours and checkpoint extras."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
from model_data import cellbench_sng, tiny_config
from sklearn.metrics import roc_auc_score

from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.calibration import (
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from scpermut_dist.mapping.neighbors import NeighborIndex, sample_reference_cells
from scpermut_dist.mapping.unknown import fit_unknown, rule_from_extra

HELD_OUT = "H838"


def test_ece_of_a_hand_made_case():
    # two bins: conf 0.9 (2 cells, 1 right: |0.5-0.9|) and conf 0.6 (2 cells, 2 right: |1-0.6|)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_temperature_scaling_repairs_an_over_confident_logit_set():
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0  # ~60 % accurate ...
    logits *= 6.0  # ... but almost always ~100 % confident
    before = expected_calibration_error(softmax(logits), y)
    t = fit_temperature(logits, y)
    after = expected_calibration_error(softmax(logits, t), y)
    assert t == pytest.approx(6.0, rel=0.15)
    assert before > 0.2 and after < 0.03
    assert np.array_equal(softmax(logits, t).argmax(1), logits.argmax(1))  # labels unchanged
    assert fit_temperature(np.zeros((0, c)), np.zeros(0, int)) == 1.0


def _clusters(rng, centers, n):
    return np.concatenate([rng.normal(c, 0.3, size=(n, len(c))) for c in centers])


def test_neighbor_vote_majority_agreement_and_leave_self_out():
    rng = np.random.default_rng(1)
    z = _clusters(rng, [(0, 0), (5, 0), (0, 5)], 50)
    labels = np.repeat([0, 1, 2], 50)
    index = NeighborIndex(z, labels, cell=np.arange(150) + 1000)
    vote = index.vote(np.array([[0.0, 0.0], [5.0, 0.0], [2.5, 0.0]]), k=10)
    assert list(vote.label[:2]) == [0, 1] and list(vote.agreement[:2]) == [1.0, 1.0]
    assert vote.distance[2] > vote.distance[0]  # between clusters: farther from the reference
    _, idx = index.kneighbors(z[:5], k=3, exclude_cells=np.arange(5) + 1000)
    assert not (idx == np.arange(5)[:, None]).any()  # a stored cell is not its own neighbour
    mixed = NeighborIndex(np.zeros((4, 2)) + np.arange(4)[:, None] * 1e-3, np.array([0, 0, 0, 1]))
    v = mixed.vote(np.zeros((1, 2)), k=4)
    assert v.label[0] == 0 and v.agreement[0] == pytest.approx(0.75)


def test_reference_sample_is_stratified_with_rare_types_whole():
    labels = np.repeat([0, 1, 2, -1], [1000, 30, 500, 100])
    cells = np.arange(len(labels))
    s = sample_reference_cells(labels, cells, max_cells=300, seed=0)
    counts = np.bincount(labels[s], minlength=3)
    assert len(s) <= 300 and counts[1] == 30 and counts[0] == counts[2] == 135 and (labels[s] >= 0).all()
    assert len(np.unique(s)) == len(s)
    assert len(sample_reference_cells(labels, cells, max_cells=10_000)) == 1530  # all labelled cells


def test_unknown_rule_score_matches_flag_and_ranks_an_outlier_type_higher():
    rng = np.random.default_rng(2)
    rule, extra = fit_unknown(rng.uniform(0.6, 1.0, 500), rng.gamma(4, 0.25, 500), quantile=0.95)
    assert rule.distance == pytest.approx(np.quantile(extra["val_distance"], 0.95))
    conf = np.concatenate([rng.uniform(0.6, 1.0, 200), rng.uniform(0.3, 0.9, 200)])
    dist = np.concatenate([rng.gamma(4, 0.25, 200), rng.gamma(4, 0.25, 200) + 2.0])
    score, flag = rule.score(conf, dist), rule.flag(conf, dist)
    assert np.array_equal(flag, score > 1)
    assert roc_auc_score(np.repeat([0, 1], 200), score) > 0.95
    stricter = rule_from_extra(extra, quantile=0.5)
    assert stricter.distance < rule.distance and stricter.flag(conf, dist).sum() > flag.sum()
    assert rule_from_extra(extra, 0.95, confidence=0.0).flag(np.zeros(1), np.zeros(1))[0] == False
    with pytest.raises(UsageError, match="quantile"):
        rule_from_extra(extra, quantile=1.5)


@pytest.fixture(scope="module")
def holdout(datasets_dir, tmp_path_factory):
    """A reference trained without one cell line (its checkpoint saved), and a query holding that line."""
    a = cellbench_sng(datasets_dir)
    rng = np.random.default_rng(0)
    held = (a.obs["cell_line"] == HELD_OUT).to_numpy()
    query = held | (rng.random(a.n_obs) < 0.3)
    ref = fit(a[~query].copy(), "cell_line", "batch", tiny_config("train.max_epochs=8"))
    path = tmp_path_factory.mktemp("holdout") / "ck"
    ref.save(path)
    return path, a[query].copy()


def test_training_stores_calibration_neighbours_and_unknown_rule(holdout):
    path, _ = holdout
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["extras"] == ["neighbors", "replay", "unknown"]  # replay: for map --finetune
    cal = manifest["metrics"]["calibration"]
    assert len(cal["temperature"]) == 1 and cal["bins"] == 15 and cal["n_cells"] > 0
    assert cal["ece_after"] < cal["ece_before"] / 2  # a short-trained tiny model is far from calibrated
    unknown = manifest["metrics"]["unknown"]
    ref = load_reference(path)
    # the thresholds are the stored validation values' quantiles (q for distance, 1 - q for confidence,
    # capped at 0.9), over member 0's validation cells
    val = ref.extras["unknown"]
    assert unknown["quantile"] == 0.99 and unknown["n_cells"] == len(val["val_confidence"]) == cal["n_cells"]
    assert len(val["val_distance"]) == cal["n_cells"]
    assert unknown["distance"] == pytest.approx(float(np.quantile(val["val_distance"], 0.99)), rel=1e-6)
    assert unknown["confidence"] == pytest.approx(min(float(np.quantile(val["val_confidence"], 0.01)), 0.9), rel=1e-6)
    assert unknown["distance"] > 0 and 0 < unknown["confidence"] < 1
    # flagged share: at least each test's own share, at most their sum (pairing is not stored)
    by_conf = float((val["val_confidence"] < unknown["confidence"]).mean())
    by_dist = float((val["val_distance"] > unknown["distance"]).mean())
    assert max(by_conf, by_dist) <= unknown["val_flagged_fraction"] <= by_conf + by_dist
    nb = ref.extras["neighbors"]
    assert nb["latent"].dtype == np.float16 and nb["latent"].shape[1] == ref.module.dims["latent_dim"]
    assert len(nb["label"]) == len(nb["batch"]) == len(nb["cell"]) == manifest["metrics"]["neighbors"]["n_cells"]
    assert manifest["metrics"]["neighbors"]["val_accuracy"] > 0.8


def test_unknown_score_separates_a_held_out_type(holdout):
    path, query = holdout
    ref = load_reference(path)
    res = ref.map(query)
    held = (query.obs["cell_line"] == HELD_OUT).to_numpy()
    assert roc_auc_score(held, res.unknown_score) > 0.9
    assert res.unknown[held].mean() > res.unknown[~held].mean()
    assert np.array_equal(res.unknown, res.unknown_score > 1)
    assert set(res.labels[res.unknown]) == {"unknown"} and HELD_OUT not in set(res.labels_raw)
    truth = query.obs["cell_line"].to_numpy()
    assert (res.neighbor_label[~held] == truth[~held]).mean() > 0.9
    never = ref.map(query, unknown_confidence=0.0, unknown_quantile=0.999999)
    # the overrides reached the rule: no confidence test, the distance threshold at the 0.999999 quantile
    val = ref.extras["unknown"]
    assert never.thresholds["confidence"] == 0.0 and never.thresholds["quantile"] == 0.999999
    assert never.thresholds["distance"] == pytest.approx(float(np.quantile(val["val_distance"], 0.999999)))
    assert res.thresholds["quantile"] == 0.99 and res.thresholds["distance"] < never.thresholds["distance"]
    # looser on both tests: a strict subset of the default's abstentions
    assert not (never.unknown & ~res.unknown).any() and never.unknown.sum() < res.unknown.sum()
    assert np.array_equal(never.labels_raw, res.labels_raw)  # thresholds never change the model's argmax


def test_old_checkpoint_without_extras_still_loads_and_maps(holdout, tmp_path):
    import shutil

    path, query = holdout
    old = tmp_path / "old"
    shutil.copytree(path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in manifest.pop("extras"):
        (old / f"{name}.npz").unlink()
    for key in ("calibration", "unknown", "neighbors"):
        manifest["metrics"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    ref = load_reference(old)
    assert ref.extras == {}
    res = ref.map(query)
    assert res.unknown is None and res.neighbor_label is None and not res.calibrated
    annotated = ref.annotate(query.copy(), res)
    assert "scpermut_unknown" not in annotated.obs and "unknown" not in annotated.obs["scpermut_label"].cat.categories
    conf_only = ref.map(query, unknown_confidence=0.9)
    assert np.array_equal(conf_only.unknown, conf_only.confidence < 0.9)
    with pytest.raises(UsageError, match="unknown-quantile"):
        ref.map(query, unknown_quantile=0.9)


def test_checkpoint_extras_round_trip_and_refuse_objects(holdout, tmp_path):
    ref = load_reference(holdout[0])
    ref.extras["replay"] = {"counts": np.arange(12, dtype=np.int32).reshape(3, 4), "names": np.array(["a", "bc"])}
    ref.save(tmp_path / "ck")
    back = load_reference(tmp_path / "ck")
    assert sorted(back.extras) == ["neighbors", "replay", "unknown"]
    assert np.array_equal(back.extras["replay"]["counts"], ref.extras["replay"]["counts"])
    assert list(back.extras["replay"]["names"]) == ["a", "bc"]
    ref.extras["bad"] = {"x": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(UsageError, match="dtype object"):
        ref.save(tmp_path / "ck")
    assert sorted(load_reference(tmp_path / "ck").extras) == ["neighbors", "replay", "unknown"]  # intact
    ref.extras.pop("bad")
    ref.extras["../x"] = {"x": np.zeros(1)}
    with pytest.raises(UsageError, match="checkpoint extra"):
        ref.save(tmp_path / "ck2")


def test_scpermut_map_writes_the_new_obs_columns(holdout, tmp_path, capsys):
    path, query = holdout
    query.write_h5ad(tmp_path / "q.h5ad")
    out = tmp_path / "o.h5ad"
    assert main(["map", "--model", str(path), "--query", str(tmp_path / "q.h5ad"), "--out", str(out), "--quiet"]) == 0
    got = ad.read_h5ad(out)
    for col in ("scpermut_label", "scpermut_confidence", "scpermut_label_raw", "scpermut_unknown",
                "scpermut_unknown_score", "scpermut_neighbor_label", "scpermut_neighbor_agreement"):
        assert col in got.obs, col
    assert "unknown" in got.obs["scpermut_label"].cat.categories
    assert got.obs["scpermut_unknown"].dtype == bool and got.obsm["X_scpermut"].shape[0] == query.n_obs
    info = got.uns["scpermut"]
    assert info["unknown_thresholds"]["quantile"] == 0.99 and info["gene_overlap"] == 1.0
    assert len(info["calibration"]["temperature"]) == 1 and info["confidence"].startswith("calibrated")
    out2 = tmp_path / "o2.h5ad"
    assert main(["map", "--model", str(path), "--query", str(tmp_path / "q.h5ad"), "--out", str(out2), "--quiet",
                 "--unknown-quantile", "0.5"]) == 0
    got2 = ad.read_h5ad(out2)
    # the option reached the rule (uns) and, at the median of validation cells, flags strictly more
    val = load_reference(path).extras["unknown"]
    t2 = got2.uns["scpermut"]["unknown_thresholds"]
    assert t2["quantile"] == 0.5 and t2["distance"] == pytest.approx(float(np.quantile(val["val_distance"], 0.5)))
    assert t2["confidence"] == pytest.approx(min(float(np.quantile(val["val_confidence"], 0.5)), 0.9))
    assert t2["distance"] < info["unknown_thresholds"]["distance"]
    assert got2.obs["scpermut_unknown"].sum() > got.obs["scpermut_unknown"].sum()
    assert not (got.obs["scpermut_unknown"].to_numpy() & ~got2.obs["scpermut_unknown"].to_numpy()).any()
    assert main(["map", "--model", str(path), "--query", str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "o3.h5ad"),
                 "--unknown-quantile", "2"]) == 2
    assert "quantile" in capsys.readouterr().err and not (tmp_path / "o3.h5ad").exists()

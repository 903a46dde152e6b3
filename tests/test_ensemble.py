"""Ensembles (model.ensemble_size): members from other seeds, mean probabilities, one checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_data import cellbench_sng, tiny_config

from scpermut_dist.api import fit, load_reference
from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.predict import predict_proba


@pytest.fixture(scope="module")
def runs(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    cfg = tiny_config("train.max_epochs=2", "train.seed=3")
    return adata, fit(adata, "cell_line", "batch", cfg), fit(adata, "cell_line", "batch",
                                                             cfg.apply_overrides(["model.ensemble_size=3"]))


def test_member_zero_is_the_single_model_and_the_others_differ(runs):
    _, single, ens = runs
    assert len(ens.members) == 3 and ens.summary["ensemble_size"] == 3
    sd0, sd_single = ens.members[0].state_dict(), single.module.state_dict()
    assert all(torch.equal(sd0[k], sd_single[k]) for k in sd_single)
    for other in ens.members[1:]:
        assert any(not torch.equal(sd0[k], other.state_dict()[k]) for k in sd0 if sd0[k].is_floating_point())
    assert {r["member"] for r in ens.history} == {0, 1, 2}
    assert ens.summary["cells_seen"] == sum(r["cells"] for r in ens.history)
    per_member = ens.summary["members"]  # each member validated on its own held-out cells
    assert len({m["seed"] for m in per_member}) == 3 and per_member[0]["seed"] == 3
    assert per_member[0]["val_balanced_accuracy"] == single.metrics["val_balanced_accuracy"]
    assert ens.metrics["val_balanced_accuracy"] == pytest.approx(np.mean([m["val_balanced_accuracy"] for m in per_member]))
    assert "members" not in single.summary


def test_mapping_averages_the_members_probabilities_and_embeds_with_member_zero(runs):
    adata, single, ens = runs
    res, res_single = ens.map(adata), single.map(adata)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()  # library size over all of the query's genes
    x = torch.from_numpy(ens.normalization.apply_dense(adata[:, ens.genes["feature_id"]].X, totals))
    temps = ens.metrics["calibration"]["temperature"]  # one fitted temperature per member
    assert len(temps) == 3
    per_member = [predict_proba(m, x, temperatures=[t])[1] for m, t in zip(ens.members, temps)]
    assert np.allclose(res.probabilities.to_numpy(), np.mean(per_member, axis=0), atol=1e-6)
    assert np.array_equal(res.latent, res_single.latent)
    assert np.allclose(res.probabilities.to_numpy().sum(axis=1), 1.0, atol=1e-5)
    probs = res.probabilities.to_numpy()  # confidence = max of the MEAN probabilities, not a mean of members' maxima
    assert np.allclose(res.confidence, probs.max(axis=1), atol=1e-6)
    # labels_raw: the argmax of the mean probabilities, before any abstention ("unknown")
    assert np.array_equal(res.labels_raw.astype(str), np.asarray(ens.classes)[probs.argmax(axis=1)])
    assert np.array_equal(res.labels.astype(str), np.where(res.unknown, "unknown", res.labels_raw.astype(str)))
    assert res.confidence.min() < res.confidence.max()  # a per-cell value, not a saturated constant


def test_an_ensemble_checkpoint_round_trips_to_identical_predictions(runs, tmp_path):
    adata, _, ens = runs
    ens.save(tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["ensemble_size"] == 3
    loaded = load_reference(tmp_path / "ck")
    assert len(loaded.members) == 3
    a, b = ens.map(adata), loaded.map(adata)
    assert np.array_equal(a.probabilities.to_numpy(), b.probabilities.to_numpy())
    assert np.array_equal(a.latent, b.latent)
    manifest["ensemble_size"] = 2  # weights and manifest disagree: refused, not silently truncated
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="ensemble members"):
        load_reference(tmp_path / "ck")


def test_scpermut_map_writes_an_ensembles_mapping_to_h5ad(runs, tmp_path):
    """The CLI path a user takes with the default (an ensemble on a small reference): the per-member calibration
    is a list of dicts in the manifest, which h5ad cannot store as such (this failed before)."""
    import anndata as ad

    from scpermut_dist.commands.main import main

    adata, _, ens = runs
    ens.save(tmp_path / "ck")
    query = adata.copy()
    del query.obs["cell_line"]
    query.write_h5ad(tmp_path / "q.h5ad")
    assert main(["map", "--model", str(tmp_path / "ck"), "--query", str(tmp_path / "q.h5ad"), "--out",
                 str(tmp_path / "out.h5ad"), "--quiet"]) == 0
    cal = ad.read_h5ad(tmp_path / "out.h5ad").uns["scpermut"]["calibration"]
    members = ens.metrics["calibration"]["members"]
    assert sorted(cal["members"]) == ["0", "1", "2"]
    assert [cal["members"][str(i)]["temperature"] for i in range(3)] == pytest.approx([m["temperature"] for m in members])


def test_auto_ensemble_size_follows_the_reference_size():
    from scpermut_dist.config import AUTO_ENSEMBLE_MAX_CELLS, AUTO_ENSEMBLE_TIERS, ConfigError, RunConfig, \
        resolve_ensemble_size

    auto = RunConfig().model
    assert auto.ensemble_size == "auto"  # the default
    (small, n_small), (medium, n_medium) = AUTO_ENSEMBLE_TIERS
    assert resolve_ensemble_size(auto, 1_500) == n_small == 5  # Kang, CellBench: five members
    assert resolve_ensemble_size(auto, small) == n_small and resolve_ensemble_size(auto, small + 1) == n_medium
    assert resolve_ensemble_size(auto, AUTO_ENSEMBLE_MAX_CELLS) == n_medium > 1
    assert resolve_ensemble_size(auto, AUTO_ENSEMBLE_MAX_CELLS + 1) == 1  # an atlas: one member
    fixed = RunConfig().apply_overrides(["model.ensemble_size=2"]).model
    assert resolve_ensemble_size(fixed, 10) == 2 and resolve_ensemble_size(fixed, 10**8) == 2
    for bad in ("0", "17", "many", "true"):
        with pytest.raises(ConfigError, match="ensemble_size must be 'auto' or an integer"):
            RunConfig().apply_overrides([f"model.ensemble_size={bad}"])


def test_the_default_trains_an_ensemble_on_a_small_reference(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    ref = fit(adata, "cell_line", "batch", tiny_config("train.max_epochs=1", "model.ensemble_size=auto"))
    from scpermut_dist.config import resolve_ensemble_size

    expected = resolve_ensemble_size(ref.config.model, adata.n_obs)
    assert expected == 5 and len(ref.members) == expected and ref.summary["ensemble_size"] == expected

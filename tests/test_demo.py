"""`scpermut demo` (what `make demo` runs): store generated when missing, a held-out donor trained without and mapped."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

from scpermut_dist.commands.demo import SMALL_CONFIG
from scpermut_dist.commands.main import main

HOLDOUT = "donor_id == 'donor_0'"


def _tiny_config(tmp_path: Path) -> Path:
    """The demo's own config (launch/configs/small.yaml) at test size, its store in tmp_path (not yet there)."""
    cfg = yaml.safe_load(SMALL_CONFIG.read_text())
    cfg["data"].update(source=str(tmp_path / "stores" / "tiny"), generate={"cells": 2000, "genes": 200, "seed": 0},
                       n_hvg=150)
    cfg["model"].update(hidden_sizes=[64, 32], latent_dim=16)
    cfg["train"].update(max_epochs=2, batch_size=128, num_threads=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _primary_obs(store: Path, value_filter: str):
    import tiledbsoma

    with tiledbsoma.open(str(store)) as census:
        obs = census["census_data"]["homo_sapiens"].obs
        return obs.read(value_filter=value_filter, column_names=["cell_type", "donor_id"]).concat().to_pandas()


def test_demo_generates_its_store_trains_without_the_held_out_donor_and_maps_it(ray_cluster, tmp_path, capsys):
    config, out = _tiny_config(tmp_path), tmp_path / "demo"
    store = tmp_path / "stores" / "tiny"
    assert not store.exists()
    assert main(["demo", "--out", str(out), "--workers", "2", "--config", str(config), "--holdout", HOLDOUT,
                 "--quiet"]) == 0
    assert store.exists()  # data.generate: made on first use

    held_out = _primary_obs(store, f"is_primary_data == True and {HOLDOUT}")
    trained_on = _primary_obs(store, f"is_primary_data == True and not ({HOLDOUT})")
    assert len(held_out) > 0
    summary = json.loads((out / "run" / "model" / "manifest.json").read_text())["summary"]
    assert summary["n_train_cells"] + summary["n_val_cells"] == len(trained_on)  # the donor never reached training

    metrics = json.loads((out / "metrics.json").read_text())
    mapped = ad.read_h5ad(out / "query_mapped.h5ad")
    assert metrics["query_cells"] == mapped.n_obs == len(held_out)
    assert sorted(mapped.obs["truth"]) == sorted(held_out["cell_type"].astype(str))
    truth, called = mapped.obs["truth"].astype(str), mapped.obs["scpermut_label"].astype(str)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, called))
    assert metrics["balanced_accuracy"] > 2.0 / truth.nunique()  # learnt something in two epochs per stage
    assert mapped.obsm["X_scpermut"].shape == (mapped.n_obs, 16)
    assert np.isfinite(mapped.obs["scpermut_confidence"]).all()
    assert "never seen in training" in capsys.readouterr().out

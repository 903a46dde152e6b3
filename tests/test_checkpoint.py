"""Checkpoints: self-describing, round-trip to identical predictions, loadable alone, saved atomically."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from model_data import cellbench_sng, tiny_config

import scpermut_dist.mapping.checkpoint as ckpt_mod
from scpermut_dist.api import fit, load_reference
from scpermut_dist.errors import UsageError


@pytest.fixture(scope="module")
def trained(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    return adata, fit(adata, "cell_line", "batch", tiny_config())


def test_checkpoint_round_trips_to_identical_predictions(trained, tmp_path):
    adata, ref = trained
    ref.save(tmp_path / "ck")
    loaded = load_reference(tmp_path / "ck")
    a, b = ref.map(adata), loaded.map(adata)
    assert np.array_equal(a.probabilities.to_numpy(), b.probabilities.to_numpy())
    assert np.array_equal(a.latent, b.latent) and list(a.labels) == list(b.labels)
    assert loaded.classes == ref.classes == sorted(adata.obs["cell_line"].unique())
    assert loaded.genes.equals(ref.genes) and loaded.normalization == ref.normalization
    assert loaded.config == ref.config and loaded.history == json.loads(json.dumps(ref.history))
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["format_version"] == ckpt_mod.FORMAT_VERSION and "torch" in manifest["packages"]
    assert manifest["training_data"]["n_cells"] == adata.n_obs
    assert manifest["training_data"]["class_counts"]["A549"] == int((adata.obs["cell_line"] == "A549").sum())
    assert set(manifest["training_data"]["batch_counts"]) == set(adata.obs["batch"].unique())
    assert manifest["summary"]["cells_per_s"] > 0
    # the manifest holds the in-memory reference's metrics (values, not just keys)
    assert manifest["metrics"] == json.loads(json.dumps(ref.metrics, default=ckpt_mod._json_default))
    assert manifest["metrics"]["val_balanced_accuracy"] == pytest.approx(ref.metrics["val_balanced_accuracy"])
    assert manifest["metrics"]["calibration"]["temperature"] == pytest.approx(ref.metrics["calibration"]["temperature"])
    genes = (tmp_path / "ck" / "genes.tsv").read_text().splitlines()
    assert genes[0] == "feature_id\tfeature_name" and genes[1].startswith("ENSG") and len(genes) == 201


def test_checkpoint_loads_without_ray_or_training_data(trained, tmp_path):
    _, ref = trained
    ref.save(tmp_path / "ck")
    code = ("import sys; from scpermut_dist.api import load_reference; r = load_reference(sys.argv[1]); "
            "assert 'ray' not in sys.modules; print(len(r.classes), r.module.dims['n_genes'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "200"]


def _weights(path):
    return torch.load(path / "weights.pt", weights_only=True)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(trained, tmp_path, monkeypatch):
    adata, ref = trained
    ref.save(tmp_path / "ck")
    old = _weights(tmp_path / "ck")
    with torch.no_grad():
        for p in ref.module.parameters():
            p.add_(1.0)
    real = ckpt_mod._write_text

    def crash(path, text):
        if path.name == "history.json":  # weights.pt and config.yaml are already written by now
            raise OSError("disk full (injected)")
        real(path, text)

    monkeypatch.setattr(ckpt_mod, "_write_text", crash)
    with pytest.raises(OSError, match="injected"):
        ref.save(tmp_path / "ck")
    monkeypatch.setattr(ckpt_mod, "_write_text", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind
    still = _weights(tmp_path / "ck")
    assert all(torch.equal(old[k], still[k]) for k in old)
    load_reference(tmp_path / "ck").map(adata[:20])
    with torch.no_grad():
        for p in ref.module.parameters():
            p.sub_(1.0)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_saving_over_a_checkpoint_replaces_it(trained, tmp_path, monkeypatch, exchange):
    _, ref = trained
    ref.save(tmp_path / "ck")
    if not exchange:
        monkeypatch.setattr(ckpt_mod, "_rename_exchange", lambda a, b: False)
    ref.summary["marker"] = 42
    try:
        ref.save(tmp_path / "ck")
    finally:
        del ref.summary["marker"]
    assert load_reference(tmp_path / "ck").summary["marker"] == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(trained, tmp_path):
    _, ref = trained
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="not a scpermut checkpoint"):
        ref.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(UsageError, match="not a scpermut checkpoint"):
        load_reference(tmp_path / "mine")

"""Mapping a file that was already mapped: only the new model's results remain (local `scpermut map`).

The `--server` path is checked in test_serve.py (`test_remapping_on_the_server_leaves_nothing_of_the_old_model`).
"""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from model_data import cellbench_sng, tiny_config

from scpermut_dist.api import fit, load_reference
from scpermut_dist.commands.main import main
from scpermut_dist.mapping.output import clear_annotations

SUBSET = 3  # model B: the first three cell lines only


def written(adata: ad.AnnData) -> set[str]:
    """Every obs column, obsm key and uns key in `adata` that `scpermut map` writes."""
    return ({f"obs/{c}" for c in adata.obs.columns if c.startswith("scpermut_")}
            | {f"obsm/{k}" for k in adata.obsm if k == "X_scpermut" or k.startswith("scpermut_")}
            | {f"uns/{k}" for k in adata.uns if k.startswith("scpermut")})


def assert_same_mapping(remapped: ad.AnnData, fresh: ad.AnnData) -> None:
    """`remapped` (mapped by A, then by B) holds exactly what B alone writes into the unmapped query."""
    assert written(remapped) == written(fresh)
    for col in [c for c in fresh.obs.columns if c.startswith("scpermut_")]:
        a, b = remapped.obs[col], fresh.obs[col]
        if isinstance(b.dtype, pd.CategoricalDtype):
            assert list(a.cat.categories) == list(b.cat.categories), col
        if b.dtype.kind == "f":
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-6, err_msg=col)
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), col
    for key in fresh.obsm:
        if key == "X_scpermut" or key.startswith("scpermut_"):
            np.testing.assert_allclose(remapped.obsm[key], fresh.obsm[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert list(remapped.uns["scpermut"]["classes"]) == list(fresh.uns["scpermut"]["classes"])


@pytest.fixture(scope="module")
def models(datasets_dir, tmp_path_factory) -> dict:
    """Model A on all five cell lines, model B on three of them; the query is CellBench without labels."""
    root = tmp_path_factory.mktemp("remap")
    cells = cellbench_sng(datasets_dir)
    lines = sorted(cells.obs["cell_line"].astype(str).unique())
    cfg = tiny_config("train.max_epochs=1", "train.num_threads=1")
    fit(cells, "cell_line", "batch", cfg).save(root / "a")
    subset = cells[cells.obs["cell_line"].astype(str).isin(lines[:SUBSET]).to_numpy()].copy()
    fit(subset, "cell_line", "batch", cfg).save(root / "b")
    query = cells[::4].copy()
    query.obs = query.obs[["total_counts"]]
    query.write_h5ad(root / "query.h5ad")
    return {"root": root, "a": root / "a", "b": root / "b", "query": root / "query.h5ad", "lines": lines}


def test_local_remap_keeps_only_the_new_models_results(models, tmp_path):
    a_out, b_out, fresh_out = tmp_path / "a.h5ad", tmp_path / "ab.h5ad", tmp_path / "b.h5ad"
    assert main(["map", "--model", str(models["a"]), "--query", str(models["query"]), "--out", str(a_out),
                 "--quiet"]) == 0
    first = ad.read_h5ad(a_out)
    assert first.obsm["scpermut_probabilities"].shape[1] == len(models["lines"]) == 5
    first.uns["scpermut_label_colors"] = ["#000000"] * 6  # what scanpy leaves after plotting the old labels
    first.obs["scpermut_extra"] = 1.0  # any scpermut_ column, even one a newer version wrote
    first.write_h5ad(a_out)
    assert "obs/scpermut_label_raw" in written(first) and "obs/scpermut_neighbor_label" in written(first)

    assert main(["map", "--model", str(models["b"]), "--query", str(a_out), "--out", str(b_out), "--quiet"]) == 0
    assert main(["map", "--model", str(models["b"]), "--query", str(models["query"]), "--out", str(fresh_out),
                 "--quiet"]) == 0
    remapped, fresh = ad.read_h5ad(b_out), ad.read_h5ad(fresh_out)
    classes_b = models["lines"][:SUBSET]
    assert remapped.obsm["scpermut_probabilities"].shape == (remapped.n_obs, SUBSET)
    assert list(remapped.uns["scpermut"]["classes"]) == classes_b
    assert set(remapped.obs["scpermut_label_raw"].astype(str)) <= set(classes_b)
    assert list(remapped.obs["scpermut_label_raw"].cat.categories) == classes_b
    assert "scpermut_extra" not in remapped.obs and "scpermut_label_colors" not in remapped.uns
    assert remapped.uns["scpermut"]["model"] == str(models["b"])
    assert_same_mapping(remapped, fresh)
    assert remapped.obs["total_counts"].tolist() == fresh.obs["total_counts"].tolist()  # the user's own obs stay


def test_reference_annotate_replaces_an_earlier_result(models):
    query = ad.read_h5ad(models["query"])
    ref_a, ref_b = load_reference(models["a"]), load_reference(models["b"])
    fresh = ref_b.annotate(query.copy())
    twice = ref_b.annotate(ref_a.annotate(query.copy()))
    assert twice.obsm["scpermut_probabilities"].shape == (query.n_obs, SUBSET)
    assert_same_mapping(twice, fresh)
    assert sorted(clear_annotations(twice)) == sorted(written(fresh))
    assert written(twice) == set() and list(twice.obs.columns) == list(query.obs.columns)


@pytest.mark.parametrize("rule", [True, False])
def test_a_server_answer_writes_what_a_local_map_writes(models, rule):
    """Through the wire format (parquet) and `annotate_from_frame`, with and without an unknown rule: the same
    obs/obsm keys and values as `annotate` (a reference without a rule gets no `scpermut_unknown` either way)."""
    import dataclasses

    from scpermut_dist.mapping.output import annotate
    from scpermut_dist.serve.client import annotate_from_frame
    from scpermut_dist.serve.codec import Payload, frame_from_parquet

    query = ad.read_h5ad(models["query"])
    result = load_reference(models["b"]).map(query)
    if not rule:
        result = dataclasses.replace(result, unknown=None, unknown_score=None, thresholds=None)
    assert (result.unknown is not None) == rule
    frame = frame_from_parquet(Payload.from_result(result, query.obs_names, "b").to_parquet())
    local = annotate(query.copy(), result, {"model": "b"})
    remote = annotate_from_frame(query.copy(), frame, "http://127.0.0.1:1", "b")
    assert ("obs/scpermut_unknown" in written(local)) == rule
    assert_same_mapping(remote, local)

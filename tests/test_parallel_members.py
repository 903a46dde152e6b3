"""Ensemble members side by side in worker processes (train.parallel): the same model as in turn, on real data."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from model_data import CELLBENCH, TINY, cellbench_sng, tiny_config

from loaders.errors import DataError
from loaders.selection import CellSelection
from loaders.sources import AnnDataSource
from scpermut_dist.api import fit, load_reference
from scpermut_dist.config import ConfigError, RunConfig
from scpermut_dist.train.parallel import member_processes, portable_reference, train_members_in_parallel
from scpermut_dist.train.preprocess import prepare_reference
from scpermut_dist.train.reference import member_splits

TIMING = ("seconds", "cells_per_s")  # what differs between two runs of the same training


@pytest.fixture(scope="module")
def in_turn_and_parallel(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    cfg = tiny_config("model.ensemble_size=3", "train.num_threads=1", "train.seed=2")
    in_turn = fit(adata, "cell_line", "batch", cfg.apply_overrides(["train.parallel_members=1"]))
    parallel = fit(adata, "cell_line", "batch", cfg.apply_overrides(["train.parallel_members=2"]))
    return adata, in_turn, parallel


def test_members_in_parallel_are_the_members_in_turn_bit_for_bit(in_turn_and_parallel):
    _, in_turn, parallel = in_turn_and_parallel
    assert len(parallel.members) == len(in_turn.members) == 3
    for a, b in zip(in_turn.members, parallel.members):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING} for r in h]  # noqa: E731
    assert strip(parallel.history) == strip(in_turn.history)  # in member order, whatever order they finished in
    assert [r["member"] for r in parallel.history] == sorted(r["member"] for r in parallel.history)
    assert parallel.metrics == in_turn.metrics  # per-member validation, calibration, unknown rule
    assert parallel.summary["members"] == in_turn.summary["members"]


def test_parallel_members_map_like_in_turn_and_round_trip(in_turn_and_parallel, tmp_path):
    adata, in_turn, parallel = in_turn_and_parallel
    a, b = in_turn.map(adata), parallel.map(adata)
    assert np.array_equal(a.probabilities.to_numpy(), b.probabilities.to_numpy())
    parallel.save(tmp_path / "ref")
    again = load_reference(tmp_path / "ref").map(adata)
    assert np.array_equal(again.probabilities.to_numpy(), b.probabilities.to_numpy())


@pytest.mark.parametrize("cores,members,sets,expected", [
    (2, 5, [], (2, 1)),  # auto shares the cores evenly
    (16, 5, [], (5, 3)),
    (8, 5, ["train.num_threads=4"], (2, 4)),  # as many processes as the cores allow at num_threads each
    (1, 5, [], (1, None)),  # one core: in turn
    (8, 1, [], (1, None)),  # one member: nothing to parallelise
    (8, 5, ["train.parallel_members=1", "train.num_threads=2"], (1, 2)),
    (8, 5, ["train.parallel_members=3"], (3, 2)),
    (8, 2, ["train.parallel_members=3"], (2, 4)),
    (8, 5, ["train.device=cuda"], (1, None)),  # one GPU: members in turn
])
def test_how_many_member_processes(cores, members, sets, expected):
    assert member_processes(RunConfig().apply_overrides(sets).train, members, cores=cores) == expected


def test_parallel_members_setting_is_checked():
    with pytest.raises(ConfigError, match="parallel_members"):
        RunConfig().apply_overrides(["train.parallel_members=0"])


def test_an_anndata_source_travels_as_its_selected_cells_and_genes(datasets_dir):
    adata = cellbench_sng(datasets_dir)
    genes = tuple(adata.var_names[:50])
    source = AnnDataSource(adata, CellSelection(obs_value_filter="batch != 'plate1'", label_key="cell_line",
                                                batch_keys=("batch",), genes=genes))
    small = source.compact()
    rows = np.random.default_rng(0).choice(source.n_cells, 40, replace=False)
    assert (small.read_counts(rows) != source.read_counts(rows)).nnz == 0
    assert small.adata is None and small.obs.equals(source.obs) and small.var.equals(source.var)
    assert np.array_equal(small.chunk_ids(), source.chunk_ids())
    assert len(pickle.dumps(small)) < len(pickle.dumps(source)) / 5


def test_an_h5ad_travels_compacted(datasets_dir):
    from loaders.sources import spec_from_uri

    cfg = tiny_config("data.label_key=cell_line", "data.batch_keys=[batch]")
    prep = prepare_reference(lambda sel: spec_from_uri(str(datasets_dir / CELLBENCH), sel), cfg.data)
    portable = portable_reference(prep)
    assert portable.source is portable.spec and portable.source.adata is None  # model genes only, no file re-read
    assert portable.source.n_genes == len(prep.genes) == 200 and portable.source.n_cells == prep.source.n_cells
    assert (portable.source.read_counts(prep.cells[:30]) != prep.source.read_counts(prep.cells[:30])).nnz == 0


def test_a_failing_member_fails_the_run_with_its_own_error(datasets_dir):
    from loaders.sources import AnnDataSource as Source

    adata = cellbench_sng(datasets_dir)
    cfg = tiny_config("model.ensemble_size=2", "data.label_key=cell_line", "data.batch_keys=[batch]")
    prep = prepare_reference(lambda sel: Source(adata, sel), cfg.data)
    splits = member_splits(prep, cfg)
    splits[1].train_all = splits[1].train_all[:0]  # member 1 has no cell to train on
    with pytest.raises(DataError, match="no all training cells"):
        train_members_in_parallel(prep, splits, cfg, processes=2, threads=1)


def test_cli_trains_members_in_parallel_from_a_soma_store(tmp_path, capsys):
    """A store's reader does not cross processes: each worker opens the spec itself."""
    from loaders.synth import synthesize_census
    from scpermut_dist.commands.main import main

    store, out = tmp_path / "census", tmp_path / "model"
    synthesize_census(str(store), 2000, 250, seed=5, n_datasets=2, mouse_cells=0, chunk_cells=1000)
    sets = [a for item in TINY for a in ("--set", item)]
    rc = main(["train", "--store", str(store), "--organism", "Homo sapiens", "--label-key", "cell_type",
               "--batch-key", "dataset_id", "--out", str(out), *sets, "--set", "model.ensemble_size=2",
               "--set", "train.parallel_members=2", "--set", "train.num_threads=1"])
    assert rc == 0
    printed = capsys.readouterr().out  # each member's epochs, reported when it finishes, tagged with the member
    assert "member 0 full_model epoch 2" in printed and "member 1 classifier_branch epoch 2" in printed
    assert "2 ensemble members" in printed
    ref = load_reference(out)
    assert len(ref.members) == 2 and {r["member"] for r in ref.history} == {0, 1}
    sa, sb = (m.state_dict() for m in ref.members)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


def test_the_core_count_honours_a_cpu_limit(monkeypatch):
    """A container's CPU quota or LOKY_MAX_CPU_COUNT caps the cores auto shares, not the host's count."""
    import os

    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert member_processes(RunConfig().train, 5) == (1, None)
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "3")
    assert member_processes(RunConfig().train, 5) == (min(3, len(os.sched_getaffinity(0))), 1)


def test_training_in_turn_uses_no_more_threads_than_the_cpu_limit(datasets_dir, monkeypatch):
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(cellbench_sng(datasets_dir), "cell_line", "batch", tiny_config("train.max_epochs=1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_mapping_uses_no_more_threads_than_the_cpu_limit(datasets_dir, tmp_path, monkeypatch):
    from scpermut_dist.commands.main import main

    adata = cellbench_sng(datasets_dir)
    fit(adata, "cell_line", "batch", tiny_config("train.max_epochs=1")).save(tmp_path / "ref")
    adata.write_h5ad(tmp_path / "q.h5ad")
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["map", "--model", str(tmp_path / "ref"), "--query", str(tmp_path / "q.h5ad"),
                     "--out", str(tmp_path / "m.h5ad")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
